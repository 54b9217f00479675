"""The service pair end to end: real redis-server, planner and decoder processes on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import redis

from clasp.config import ClaspConfig, SamplingParams
from clasp_serve.v1 import clasp_pb2 as pb
from clasp_serve.v1 import clasp_pb2_grpc as pb_grpc
from clients.sdk import AsyncClaspClient, ClaspClient, build_request
from serving.plan_wire import PLAN_REQUEST_STREAM, PLANNER_GROUP, plan_key
from serving.security import REDIS_USER, redis_acl_rules

REPO = Path(__file__).resolve().parents[1]
REDIS_SERVER = Path(sys.executable).parent / "redis-server"
PASSWORD = "test-password-123"
PROMPT = "Explain in detail how a steam engine works."
DP = dict(mode="clasp", num_skip_layers=6, replan_interval=2)  # the DP active, re-planning often


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        threading.Event().wait(0.05)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


class Redis:
    def __init__(self, tmp: Path) -> None:
        self.port, self.tmp, self.proc = free_port(), tmp, None

    def start(self) -> None:
        self.proc = subprocess.Popen([str(REDIS_SERVER), "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--requirepass", PASSWORD, "--user", REDIS_USER, *redis_acl_rules(PASSWORD),
                                      "--save", "", "--appendonly", "no",
                                      "--dir", str(self.tmp)], stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, password=PASSWORD)
        wait_for(lambda: _pings(client), 20, "redis")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def _pings(client) -> bool:
    try:
        return client.ping()
    except redis.RedisError:
        return False


class Service:
    def __init__(self, module: str, args: list[str], log: Path, redis_port: int) -> None:
        # The services log in as the ACL user (only their commands and keys); the tests as the admin.
        env = {**os.environ, "CLASP_REDIS_PASSWORD": PASSWORD, "CLASP_REDIS_USERNAME": REDIS_USER,
               "CLASP_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", module, "--host", "127.0.0.1", "--redis-url",
                                      f"redis://127.0.0.1:{redis_port}/0", *args], cwd=REPO, env=env,
                                     stdout=log.open("w"), stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stack")
    store = Redis(tmp)
    store.start()
    ports = {name: free_port() for name in ("decoder", "decoder_metrics", "planner", "planner_metrics")}
    planner = Service("planner_service", ["--port", str(ports["planner"]), "--metrics-port",
                                          str(ports["planner_metrics"])], tmp / "planner.log", store.port)
    decoder = Service("decoder_service", ["--port", str(ports["decoder"]), "--metrics-port",
                                          str(ports["decoder_metrics"]), "--max-concurrent", "2", "--max-queue", "2"],
                      tmp / "decoder.log", store.port)
    target = f"127.0.0.1:{ports['decoder']}"
    with ClaspClient(target) as client:
        client.wait_ready(180)
    stack = dict(redis=store, planner=planner, decoder=decoder, target=target, ports=ports, tmp=tmp,
                 client=redis.Redis(port=store.port, password=PASSWORD))
    yield stack
    stack["decoder"].stop()  # the stack's current processes: tests restart some of them
    stack["planner"].stop()
    stack["redis"].stop()


def restart_planner(stack):
    stack["planner"] = Service("planner_service", ["--port", str(stack["ports"]["planner"]), "--metrics-port", "0"],
                               stack["tmp"] / "planner2.log", stack["redis"].port)


def metric(stack, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{stack['ports']['decoder_metrics']}/metrics", timeout=5).read()
    return sum(float(line.split()[-1]) for line in text.decode().splitlines()
               if line.startswith(name) and not line.startswith("#"))


def ar_reference(engine, prompt: str, max_new_tokens: int) -> list[int]:
    ids = engine.encode(prompt)
    return engine.generate(ids, SamplingParams(max_new_tokens=max_new_tokens), ClaspConfig(mode="ar")).token_ids


def test_greedy_through_grpc_equals_engine_ar(stack, engine):
    with ClaspClient(stack["target"]) as client:
        for prompt, options in ((PROMPT, DP), ("Name three rivers in Europe.", {})):
            result = client.generate(prompt, max_new_tokens=48, **options)
            assert result.token_ids == ar_reference(engine, prompt, 48)
            assert result.text == engine.tokenizer.decode(result.token_ids, skip_special_tokens=True)
            assert result.finish_reason in ("stop", "length")


def planner_idle(client) -> bool:
    """Every request in the stream was delivered to the planner and acknowledged."""
    last = client.xinfo_stream(PLAN_REQUEST_STREAM)["last-generated-id"]
    group = next(g for g in client.xinfo_groups(PLAN_REQUEST_STREAM) if g["name"] == PLANNER_GROUP.encode())
    return group["last-delivered-id"] == last and group["pending"] == 0


def test_plans_reach_the_decoder_and_carry_over_in_a_session(stack):
    with ClaspClient(stack["target"]) as client:
        first = client.generate(PROMPT, session_id="plans", max_new_tokens=64, **DP)
        assert first.stats["plan_versions"] and first.stats["plan_versions"][0] >= 1
        wait_for(lambda: planner_idle(stack["client"]), 30, "the planner to finish the session's requests")
        stored = pb.Plan.FromString(stack["client"].get(plan_key("plans")))
        assert stored.model.startswith("SmolLM2-135M-Instruct") and stored.version >= first.stats["plan_versions"][-1]
        # The next turn starts from the session's plan and adopts the newest one the planner wrote.
        second = client.generate("Now explain a diesel engine.", session_id="plans", max_new_tokens=40,
                                 mode="clasp", num_skip_layers=6, replan_interval=1000)
        assert second.stats["plan_versions"][0] >= first.stats["plan_versions"][-1]
        assert second.stats["plan_versions"][-1] == stored.version
        assert second.stats["skip_set"] == list(stored.skip_sets[6].layers)


def test_async_client_streams(stack, engine):
    import asyncio

    async def go():
        async with AsyncClaspClient(stack["target"]) as client:
            return await client.generate("Name three rivers in Europe.", max_new_tokens=24)

    result = asyncio.run(go())
    assert result.token_ids == ar_reference(engine, "Name three rivers in Europe.", 24)


@pytest.mark.parametrize("request_kwargs,field", [
    (dict(prompt="   "), "prompt"),
    (dict(prompt="hi", temperature=-1.0), "sampling"),
    (dict(prompt="hi", num_skip_layers=99), "num_skip_layers"),
    (dict(prompt="hi", session_id="has space"), "session_id"),
    (dict(messages=[{"role": "", "content": "hello"}]), "chat.messages[0].role"),
])
def test_invalid_requests_are_invalid_argument(stack, request_kwargs, field):
    with ClaspClient(stack["target"]) as client:
        with pytest.raises(grpc.RpcError) as e:
            list(client.stream(build_request(**request_kwargs)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()


def test_no_input_and_unknown_mode(stack):
    with ClaspClient(stack["target"]) as client:
        for request in (pb.GenerateRequest(), pb.GenerateRequest(prompt="hi", speculation=pb.Speculation(mode=9))):
            with pytest.raises(grpc.RpcError) as e:
                list(client.stream(request))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_deadline_stops_work_and_others_are_unaffected(stack, engine):
    before = metric(stack, "clasp_cancelled_requests_total")
    results = {}

    def other():
        with ClaspClient(stack["target"]) as client:
            results["other"] = client.generate("Name three rivers in Europe.", max_new_tokens=32)

    thread = threading.Thread(target=other)
    thread.start()
    with ClaspClient(stack["target"]) as client:
        with pytest.raises(grpc.RpcError) as e:
            client.generate(PROMPT, max_new_tokens=400, timeout_s=1.0)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: metric(stack, "clasp_cancelled_requests_total") > before, 10, "the server to stop the stream")
    thread.join(120)
    assert results["other"].token_ids == ar_reference(engine, "Name three rivers in Europe.", 32)


def test_abort_by_request_id(stack):
    with ClaspClient(stack["target"]) as client:
        stream = client.stream(build_request(PROMPT, request_id="abort-me", max_new_tokens=400))
        first = next(stream)
        assert first.request_id == "abort-me"
        assert client.abort("abort-me") is True
        final = list(stream)[-1]
        assert final.finish_reason == pb.FINISH_REASON_ABORTED
        assert client.abort("no-such-request") is False


def test_planner_get_plan(stack):
    with ClaspClient(stack["target"]) as client:
        client.generate(PROMPT, session_id="admin", max_new_tokens=16, **DP)
    wait_for(lambda: stack["client"].get(plan_key("admin")), 30, "the session's plan")
    with grpc.insecure_channel(f"127.0.0.1:{stack['ports']['planner']}") as channel:
        planner = pb_grpc.PlannerStub(channel)
        plan = planner.GetPlan(pb.GetPlanRequest(session_id="admin"), timeout=10)
        assert plan.session_id == "admin" and plan.version >= 1 and len(plan.skip_sets) == 7
        assert [len(s.layers) for s in plan.skip_sets] == list(range(7))
        for request, code in ((pb.GetPlanRequest(session_id="nobody"), grpc.StatusCode.NOT_FOUND),
                              (pb.GetPlanRequest(), grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(grpc.RpcError) as e:
                planner.GetPlan(request, timeout=10)
            assert e.value.code() == code and "session_id" in e.value.details()


@pytest.mark.parametrize("kind", ["malformed", "other-model", "out-of-range"])
def test_untrustworthy_plans_are_rejected(stack, engine, kind):
    session = f"untrusted-{kind}"
    bad = pb.Plan(session_id=session, version=10**6, model="SmolLM2-135M-Instruct:30x576:49152", num_layers=30,
                  skip_sets=[pb.SkipSet(layers=list(range(j))) for j in range(7)], scores=[1.0] * 7)
    if kind == "other-model":
        bad.model = "another-model:30x576:49152"
    elif kind == "out-of-range":
        bad.skip_sets[6].layers[:] = [40, 41, 42, 43, 44, 45]
    raw = b"\x08\xff\xff not a plan" if kind == "malformed" else bad.SerializeToString()
    stack["client"].set(plan_key(session), raw)
    before = metric(stack, "clasp_plans_rejected_total")
    with ClaspClient(stack["target"]) as client:
        stream = client.stream(build_request(PROMPT, session_id=session, max_new_tokens=32, mode="clasp",
                                             num_skip_layers=6, replan_interval=1000))
        messages = list(stream)
    assert metric(stack, "clasp_plans_rejected_total") > before
    assert 10**6 not in messages[-1].stats.plan_versions
    assert sorted(messages[-1].stats.skip_set) != list(range(6))
    assert sum((list(m.token_ids) for m in messages), []) == ar_reference(engine, PROMPT, 32)


def test_full_queue_is_resource_exhausted(stack):
    """max_concurrent 2 + max_queue 2: a fifth concurrent stream is refused with a message."""
    clients = [ClaspClient(stack["target"], retries=0) for _ in range(5)]
    streams = [c.stream(build_request(PROMPT, request_id=f"busy-{i}", max_new_tokens=400)) for i, c in
               enumerate(clients[:4])]
    threads = [threading.Thread(target=lambda st=st: list(st)) for st in streams]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: metric(stack, "clasp_queue_depth") == 2 and metric(stack, "clasp_active_requests") == 2,
                 60, "two streams running and two waiting")
        with pytest.raises(grpc.RpcError) as e:
            list(clients[4].stream(build_request(PROMPT, max_new_tokens=8)))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queue" in e.value.details()
    finally:
        for i in range(4):
            wait_for(lambda i=i: clients[i].abort(f"busy-{i}") or _finished(stack, f"busy-{i}"), 60, f"abort busy-{i}")
        for t in threads:
            t.join(60)
        for c in clients:
            c.close()


def _finished(stack, request_id: str) -> bool:
    return metric(stack, "clasp_active_requests") + metric(stack, "clasp_queue_depth") == 0


def test_planner_down_then_redis_down_keeps_output_and_health(stack, engine):
    reference = ar_reference(engine, PROMPT, 96)
    with ClaspClient(stack["target"]) as client:
        stream = client.stream(build_request(PROMPT, session_id="outage", max_new_tokens=96, **DP))
        tokens = list(next(stream).token_ids)
        stack["planner"].stop()  # planner gone mid-generation
        for message in stream:
            tokens.extend(message.token_ids)
        assert tokens == reference

        stream = client.stream(build_request(PROMPT, session_id="outage2", max_new_tokens=96, **DP))
        tokens = list(next(stream).token_ids)
        stack["redis"].stop()  # Redis gone mid-generation
        for message in stream:
            tokens.extend(message.token_ids)
        assert tokens == reference
        client.wait_ready(5)  # still SERVING

        stack["redis"].start()  # back on the same port, empty
        restart_planner(stack)
        result = wait_for(lambda: _plans_again(client), 180, "plans after Redis returned")
        assert result.token_ids == ar_reference(engine, "Describe a sunrise.", 40)


def _plans_again(client):
    result = client.generate("Describe a sunrise.", session_id=f"back-{time.monotonic()}", max_new_tokens=40, **DP)
    return result if result.stats["plan_versions"] else None


def test_sigterm_drains_in_flight_streams(stack, engine):
    """Last: stops the shared decoder. In-flight streams finish; health goes NOT_SERVING first."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reference = ar_reference(engine, PROMPT, 64)
    with ClaspClient(stack["target"]) as client:
        stream = client.stream(build_request(PROMPT, max_new_tokens=64))
        tokens = list(next(stream).token_ids)
        stack["decoder"].proc.terminate()
        health = health_pb2_grpc.HealthStub(client.channel)
        wait_for(lambda: _not_serving(health, health_pb2), 10, "NOT_SERVING while draining")
        with pytest.raises(grpc.RpcError) as e:
            list(ClaspClient(stack["target"], retries=0).stream(build_request("hi", max_new_tokens=4)))
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.value.details()
        for message in stream:
            tokens.extend(message.token_ids)
        assert tokens == reference
    assert stack["decoder"].proc.wait(30) == 0


def _not_serving(health, health_pb2) -> bool:
    try:
        return health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.NOT_SERVING
    except grpc.RpcError:
        return False
