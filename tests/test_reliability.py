"""What broke when the services were attacked from outside, closed in the core and the adapters:
unbounded sizes, a planner poison pill, trusted plan versions, key-shaping ids, dead consumers,
tiny temperatures and one long prompt holding the torch thread. Real model, real redis-server."""

from __future__ import annotations

import concurrent.futures
import math
import os

import pytest
import redis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from clasp.config import MAX_DRAFT_LENGTH, ClaspConfig, SamplingParams
from clasp_serve.v1 import clasp_pb2 as pb
from decoder_service.metrics import DecoderMetrics
from decoder_service.plan_bus import PlanBus
from planner_service.contexts import SessionContexts
from planner_service.worker import PlannerMetrics, PlannerWorker
from serving.plan_wire import PLAN_REQUEST_STREAM, PLANNER_GROUP, check_id, encode_tensor, plan_key
from serving.security import REDIS_USER
from test_services import PASSWORD, Redis, wait_for

MODEL = "SmolLM2-135M-Instruct:30x576:49152"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = Redis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def admin(redis_server):
    return redis.Redis(port=redis_server.port, password=PASSWORD)


@pytest.fixture(scope="module")
def store(redis_server):
    """What the services log in as: the ACL user, limited to their commands and clasp:* keys."""
    return redis.Redis(port=redis_server.port, username=REDIS_USER, password=PASSWORD)


def test_the_services_redis_user_can_do_only_what_they_do(store):
    store.set("clasp:{acl}:plan", b"x", ex=5)
    assert store.mget(["clasp:{acl}:plan"]) == [b"x"]
    for forbidden in (lambda: store.flushall(), lambda: store.keys("*"), lambda: store.set("other", 1),
                      lambda: store.config_get("*"), lambda: store.eval("return 1", 0),
                      lambda: store.delete("clasp:{acl}:plan"), lambda: store.publish("other", "x")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            forbidden()


# ------------------------------------------------------------------ bounds on what a request sets
@pytest.mark.parametrize("field,value", [
    ("max_draft_length", 10**8), ("max_draft_length", 2**32 - 1), ("max_draft_length", MAX_DRAFT_LENGTH + 1),
    ("replan_interval", 2**32 - 1), ("ngram_size", 2**32 - 1), ("prefill_chunk_tokens", 0),
])
def test_every_speculation_size_is_bounded(field, value):
    # 10^8 raised decoder peak memory 3.1 -> 5.3 GB (the controller keeps per-position counts);
    # 2^32-1 was INTERNAL MemoryError.
    with pytest.raises(ValueError, match=field):
        ClaspConfig(**{field: value})
    assert ClaspConfig(max_draft_length=MAX_DRAFT_LENGTH).max_draft_length == MAX_DRAFT_LENGTH


@pytest.mark.parametrize("kwargs,message", [
    (dict(stop=["x"] * 17), "stop strings"), (dict(stop=["x" * 257]), "stop strings"),
    (dict(top_k=2**32 - 1), "top_k"), (dict(temperature=1e38), "temperature"),
    (dict(temperature=math.nan), "temperature"), (dict(top_p=math.nan), "top_p"),
])
def test_sampling_sizes_are_bounded(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("temperature", [1e-38, 1e-45, 1e-6])
def test_denormal_temperatures_decode_greedily(engine, temperature):
    """1e-38 (float32 denormal range) divided the logits into inf and the softmax into NaN: INTERNAL."""
    ids = engine.encode("Name three rivers in Europe.")
    params = SamplingParams(max_new_tokens=8, temperature=temperature, seed=1)
    assert params.greedy
    reference = engine.generate(ids, SamplingParams(max_new_tokens=8), ClaspConfig(mode="ar")).token_ids
    assert engine.generate(ids, params, ClaspConfig(mode="clasp")).token_ids == reference


@pytest.mark.parametrize("value", ["x}:plan", "{x}", "a:b", "*", "has space", "é", "", "x" * 129])
def test_ids_that_would_shape_redis_keys_are_refused(value):
    with pytest.raises(ValueError, match="session_id"):
        plan_key(value)
    with pytest.raises(ValueError, match="request_id"):
        check_id("request_id", value)
    assert plan_key("chat-1.a_B") == "clasp:{chat-1.a_B}:plan"


# ------------------------------------------------------------------ one long prompt
def test_long_prefill_yields_between_pieces_and_stays_exact(engine):
    """A 6000-token prefill held the one torch thread for 32 s; now it yields every piece."""
    ids = engine.encode("Summarize: " + "The quick brown fox jumps over the lazy dog. " * 12)
    params = SamplingParams(max_new_tokens=8)
    whole = engine.generate(ids, params, ClaspConfig(mode="ar", prefill_chunk_tokens=4096)).token_ids
    chunks = list(engine.stream(ids, params, ClaspConfig(mode="clasp", prefill_chunk_tokens=32)))
    empty_before_first = next(i for i, c in enumerate(chunks) if c.token_ids)
    assert empty_before_first == math.ceil(len(ids) / 32) - 1 >= 3
    assert all(c.text == "" for c in chunks[:empty_before_first])
    assert chunks[-1].result.token_ids == whole


# ------------------------------------------------------------------ the planner: poison pills
def _plan_request(engine, session: str, hidden: torch.Tensor | None = None, token_ids=None) -> bytes:
    spec = engine.runner.spec
    ids = token_ids or engine.encode("Tell me about the moon.")
    hidden = hidden if hidden is not None else torch.randn(spec.num_layers + 1, spec.hidden_size)
    return pb.PlanRequest(session_id=session, model=engine.identity, step=1, position=len(ids) - 1, token_ids=ids,
                          hidden_states=encode_tensor(hidden), max_skip=4).SerializeToString()


def _pending(admin) -> int:
    return admin.xpending(PLAN_REQUEST_STREAM, PLANNER_GROUP)["pending"]


def test_poison_plan_requests_are_acknowledged_and_do_not_block_the_batch(engine, store, admin):
    spec = engine.runner.spec
    nan = torch.randn(spec.num_layers + 1, spec.hidden_size)
    nan[3, 7] = math.nan
    inf = torch.full((spec.num_layers + 1, spec.hidden_size), math.inf)
    admin.delete(PLAN_REQUEST_STREAM)
    store.xgroup_create(PLAN_REQUEST_STREAM, PLANNER_GROUP, id="0", mkstream=True)
    poison = {"poison-nan": _plan_request(engine, "poison-nan", hidden=nan),
              "poison-inf": _plan_request(engine, "poison-inf", hidden=inf),
              "poison-vocab": _plan_request(engine, "poison-vocab", token_ids=[1, 2, spec.vocab_size + 5, 3]),
              "poison-key": pb.PlanRequest(session_id="x}:plan", model=engine.identity).SerializeToString()}
    for payload in poison.values():
        store.xadd(PLAN_REQUEST_STREAM, {"request": payload})
    store.xadd(PLAN_REQUEST_STREAM, {"request": b"\xff\xfe not protobuf"})
    store.xadd(PLAN_REQUEST_STREAM, {"request": _plan_request(engine, "valid-after-poison")})
    metrics = PlannerMetrics(CollectorRegistry())
    worker = PlannerWorker(store, SessionContexts(engine.runner, 8), engine.identity, "poison-test", metrics,
                           claim_idle_s=0.2)
    executor = concurrent.futures.ThreadPoolExecutor(1)
    worker.start(executor)
    try:
        wait_for(lambda: store.get(plan_key("valid-after-poison")), 60, "the valid request's plan")
        wait_for(lambda: _pending(admin) == 0, 10, "every entry acknowledged")
    finally:
        worker.stop()
        executor.shutdown()
    for session in ("poison-nan", "poison-inf", "poison-vocab"):
        assert store.get(plan_key(session)) is None
    assert metrics.rejected._value.get() == 5  # four bad requests, one malformed entry, each once
    assert metrics.plans._value.get() == 1


def test_dead_consumers_are_removed(engine, store, admin):
    try:
        store.xgroup_create(PLAN_REQUEST_STREAM, PLANNER_GROUP, id="0", mkstream=True)
    except redis.ResponseError:  # BUSYGROUP: made by the test before
        pass
    admin.xgroup_createconsumer(PLAN_REQUEST_STREAM, PLANNER_GROUP, "dead-planner-1")
    store.xadd(PLAN_REQUEST_STREAM, {"request": b"x"})
    store.xreadgroup(PLANNER_GROUP, "dead-with-pending", {PLAN_REQUEST_STREAM: ">"}, count=1)
    worker = PlannerWorker(store, SessionContexts(engine.runner, 1), engine.identity, "alive",
                           PlannerMetrics(CollectorRegistry()), prune_idle_s=0)
    admin.xgroup_createconsumer(PLAN_REQUEST_STREAM, PLANNER_GROUP, "alive")
    removed = worker.prune_consumers()
    names = {c["name"].decode() for c in store.xinfo_consumers(PLAN_REQUEST_STREAM, PLANNER_GROUP)}
    assert "dead-planner-1" in removed and "dead-planner-1" not in names
    assert {"alive", "dead-with-pending"} <= names  # pending entries wait to be claimed first


# ------------------------------------------------------------------ the decoder: plans from Redis
def _plan(session: str, version: int, last: list[int], model: str = MODEL) -> bytes:
    sets = [list(range(j)) for j in range(len(last))] + [last]
    return pb.Plan(session_id=session, version=version, model=model, num_layers=30,
                   skip_sets=[pb.SkipSet(layers=s) for s in sets], scores=[1.0] * len(sets)).SerializeToString()


def test_plan_versions_are_reported_not_trusted(store):
    """2^64-1 pinned a session; after a Redis restart (counters reset) a remembered version 20
    kept the next 20 plans out. The key holds the newest plan: new bytes are a new plan."""
    bus = PlanBus(store, MODEL, 30, metrics=DecoderMetrics(CollectorRegistry()))
    bus.watch("pinned")
    store.set(plan_key("pinned"), _plan("pinned", 2**64 - 1, [1, 2, 3]))
    bus._refresh_plans()
    assert bus.latest("pinned")[1] == 2**64 - 1
    store.set(plan_key("pinned"), _plan("pinned", 1, [4, 5, 6]))  # after a restart: version 1 again
    bus._refresh_plans()
    sequence, version, plan = bus.latest("pinned")
    assert version == 1 and plan.skip_sets[3] == frozenset({4, 5, 6})
    bus._refresh_plans()
    assert bus.latest("pinned")[0] == sequence  # the same bytes are not a new plan


def test_a_bad_plan_is_rejected_once(store):
    """It was re-fetched and re-rejected every 50 ms: 2480 warnings for 448 writes."""
    metrics = DecoderMetrics(CollectorRegistry())
    bus = PlanBus(store, MODEL, 30, metrics=metrics)
    for session in ("bad-model", "bad-session", "bad-bytes"):
        bus.watch(session)
    store.set(plan_key("bad-model"), _plan("bad-model", 3, [1, 2, 3], model="another:30x576:49152"))
    store.set(plan_key("bad-session"), _plan("someone-else", 3, [1, 2, 3]))
    store.set(plan_key("bad-bytes"), b"\x08\xff\xff not a plan")
    for _ in range(20):
        bus._refresh_plans()
    assert metrics.plans_rejected._value.get() == 3
    assert all(bus.latest(s) is None for s in ("bad-model", "bad-session", "bad-bytes"))
    store.set(plan_key("bad-model"), _plan("bad-model", 4, [7, 8, 9]))  # a good plan next: adopted
    bus._refresh_plans()
    assert bus.latest("bad-model")[2].skip_sets[3] == frozenset({7, 8, 9})


def test_the_committed_dev_password_is_refused(monkeypatch, tmp_path):
    from serving.redis_client import redis_client

    secret = tmp_path / "password"
    secret.write_text("dev-only-insecure-redis-password-change-me\n")  # deploy/base/redis-password.env's
    monkeypatch.setenv("CLASP_REDIS_PASSWORD_FILE", str(secret))
    monkeypatch.delenv("CLASP_ALLOW_DEV_REDIS_PASSWORD", raising=False)
    with pytest.raises(ValueError, match="dev-only"):
        redis_client("redis://127.0.0.1:1/0")
    monkeypatch.setenv("CLASP_ALLOW_DEV_REDIS_PASSWORD", "1")
    assert redis_client("redis://127.0.0.1:1/0").connection_pool.connection_kwargs["password"].startswith("dev-only")


# ------------------------------------------------------------------ fuzz of the Redis payloads
FUZZ_EXAMPLES = int(os.environ.get("CLASP_FUZZ_EXAMPLES", "30"))
_layers = st.lists(st.integers(0, 2**32 - 1), max_size=8)


@st.composite
def stored_plans(draw) -> bytes:
    """What a plan key may hold: random bytes, or a Plan with any field wild."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=200))
    sets = draw(st.one_of(st.just([list(range(j)) for j in range(4)]), st.lists(_layers, max_size=5)))
    plan = pb.Plan(session_id=draw(st.sampled_from(["fuzzed", "other", ""])), version=draw(st.integers(0, 2**64 - 1)),
                   model=draw(st.sampled_from([MODEL, "another:30x576:49152", ""])),
                   num_layers=draw(st.sampled_from([30, 0, 31, 2**32 - 1])),
                   skip_sets=[pb.SkipSet(layers=s) for s in sets],
                   scores=draw(st.lists(st.floats(width=32), min_size=len(sets), max_size=len(sets))),
                   step=draw(st.integers(0, 2**64 - 1)), created_at=draw(st.floats(allow_nan=True)))
    return plan.SerializeToString()


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=stored_plans())
def test_fuzz_plan_keys(store, raw):
    """Whatever a plan key holds, the bus neither raises nor adopts anything but a valid plan."""
    bus = PlanBus(store, MODEL, 30, metrics=DecoderMetrics(CollectorRegistry()))
    bus.watch("fuzzed")
    store.set(plan_key("fuzzed"), raw)
    bus._refresh_plans()
    adopted = bus.latest("fuzzed")
    if adopted is not None:
        plan = adopted[2]
        assert [len(s) for s in plan.skip_sets] == list(range(len(plan.skip_sets)))
        assert all(i < 30 for s in plan.skip_sets for i in s)


@st.composite
def stream_entries(draw, engine) -> dict:
    """A plan-request stream entry: random fields, random bytes, or a PlanRequest with wild fields."""
    spec = engine.runner.spec
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return {draw(st.sampled_from([b"request", b"other"])): draw(st.binary(max_size=100))}
    shape = draw(st.sampled_from([(spec.num_layers + 1, spec.hidden_size), (2, 3), (spec.num_layers + 1, 1)]))
    hidden = torch.randn(shape)
    if draw(st.booleans()):
        hidden[0, 0] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    ids = draw(st.lists(st.integers(0, spec.vocab_size + 10), min_size=0, max_size=12))
    message = pb.PlanRequest(session_id=draw(st.sampled_from(["fz-1", "fz-2", "x}:y", ""])),
                             model=draw(st.sampled_from([engine.identity, "other"])), step=draw(st.integers(0, 2**64 - 1)),
                             position=draw(st.one_of(st.just(max(len(ids) - 1, 0)), st.integers(0, 2**32 - 1))),
                             token_ids=ids, max_skip=draw(st.integers(0, 40)),
                             hidden_states=encode_tensor(hidden) if kind > 1 else draw(st.binary(max_size=64)))
    return {b"request": message.SerializeToString()}


def test_fuzz_plan_request_stream(engine, store, admin):
    """Whatever the stream holds, the planner acknowledges every entry and keeps planning."""
    worker = PlannerWorker(store, SessionContexts(engine.runner, 4), engine.identity, "fuzz",
                           PlannerMetrics(CollectorRegistry()))
    admin.delete(PLAN_REQUEST_STREAM)  # test_dead_consumers_are_removed leaves an entry pending on purpose
    store.xgroup_create(PLAN_REQUEST_STREAM, PLANNER_GROUP, id="0", mkstream=True)

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None)
    @given(entries=st.lists(stream_entries(engine), min_size=1, max_size=3))
    def one_batch(entries):
        for fields in entries:
            store.xadd(PLAN_REQUEST_STREAM, fields)
        worker._process(worker._read())
        assert _pending(admin) == 0

    one_batch()
    store.xadd(PLAN_REQUEST_STREAM, {"request": _plan_request(engine, "after-fuzz")})
    worker._process(worker._read())
    assert store.get(plan_key("after-fuzz")) is not None
