"""The planner's gRPC side from outside: a real planner process with bearer tokens, a real
redis-server. GetPlan is an admin method: only the admin identity reads plans; another valid
token gets PERMISSION_DENIED, never the plan. The hypothesis fuzz of GetPlan (CLASP_FUZZ_EXAMPLES
examples, 30 here; `make fuzz` runs more): every request gets OK or a specific code naming the
field, and the planner stays SERVING."""

from __future__ import annotations

import os

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from clasp.planner import LayerPlan
from clasp_serve.v1 import clasp_pb2 as pb
from clasp_serve.v1 import clasp_pb2_grpc as pb_grpc
from serving.plan_wire import encode_plan, plan_key
from test_services import PASSWORD, Redis, Service, free_port, wait_for

ADMIN, ALICE = "admin-token-0123456789abcdef", "alice-token-0123456789abcdef"
FUZZ_EXAMPLES = int(os.environ.get("CLASP_FUZZ_EXAMPLES", "30"))
PLAN = LayerPlan((frozenset(), frozenset({7}), frozenset({7, 12})), (1.0, 0.99, 0.97), step=6)
KNOWN = {"known-1": encode_plan(PLAN, "known-1", 3, "SmolLM2-135M-Instruct:30x576:49152", 30, 0.01, 1.0),
         "known.2_B": encode_plan(PLAN, "known.2_B", 2**64 - 1, "another:30x576:49152", 30, 0.5, 2.0)}
DAMAGED = "damaged"  # its key holds bytes that are no Plan


def _serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError:
            return False
    return status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def planner(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("planner-rpc")
    store = Redis(tmp)
    store.start()
    admin_redis = redis.Redis(port=store.port, password=PASSWORD)
    for session, raw in KNOWN.items():
        admin_redis.set(plan_key(session), raw)
    admin_redis.set(plan_key(DAMAGED), b"\x08\xff\xff not a plan")
    tokens = tmp / "tokens"
    tokens.write_text(f"admin:{ADMIN}\nalice:{ALICE}\n")
    port = free_port()
    service = Service("planner_service", ["--port", str(port), "--metrics-port", "0", "--auth-token-file", str(tokens)],
                      tmp / "planner.log", store.port)
    target = f"127.0.0.1:{port}"
    try:
        wait_for(lambda: _serving(target), 180, "the planner to serve")  # health needs no token (probes)
        yield dict(target=target, log=tmp / "planner.log", service=service)
    finally:
        service.stop()
        store.stop()


def get_plan(planner, request, token: str | None):
    """GetPlan with this token (None: no metadata); request is a GetPlanRequest or raw bytes."""
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with grpc.insecure_channel(planner["target"]) as channel:
        if isinstance(request, bytes):
            call = channel.unary_unary("/clasp.v1.Planner/GetPlan", request_serializer=lambda b: b,
                                       response_deserializer=pb.Plan.FromString)
            return call(request, metadata=metadata, timeout=10)
        return pb_grpc.PlannerStub(channel).GetPlan(request, metadata=metadata, timeout=10)


def error_of(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value


def test_getplan_is_an_admin_rpc(planner):
    """Any authenticated caller could read any session's plan."""
    assert get_plan(planner, pb.GetPlanRequest(session_id="known-1"), ADMIN) == pb.Plan.FromString(KNOWN["known-1"])
    for session in ("known-1", "nobody", DAMAGED, "x}:plan"):  # alice never learns whether a plan exists
        e = error_of(lambda: get_plan(planner, pb.GetPlanRequest(session_id=session), ALICE))
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "alice" in e.details(), e.details()
    for token in (None, "wrong-token-0123456789abcdef"):
        e = error_of(lambda: get_plan(planner, pb.GetPlanRequest(session_id="known-1"), token))
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    for session, code in (("nobody", grpc.StatusCode.NOT_FOUND), (DAMAGED, grpc.StatusCode.NOT_FOUND),
                          ("x}:plan", grpc.StatusCode.INVALID_ARGUMENT), ("", grpc.StatusCode.INVALID_ARGUMENT)):
        e = error_of(lambda: get_plan(planner, pb.GetPlanRequest(session_id=session), ADMIN))
        assert e.code() == code and "session_id" in e.details(), (session, e.code(), e.details())


_session_ids = st.one_of(st.sampled_from([*KNOWN, DAMAGED, "nobody", ""]),
                         st.from_regex(r"[A-Za-z0-9._-]{1,128}", fullmatch=True),
                         st.text(alphabet="abcXYZ019._-{}:*/ \n\t\x00é", max_size=40),
                         st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=300))


@st.composite
def getplan_calls(draw):
    who = draw(st.sampled_from(["admin"] * 6 + ["alice", "none", "wrong"]))
    if draw(st.integers(0, 7)) == 0:
        request = draw(st.one_of(st.binary(max_size=64), st.just(b"\x0a\xff\xff\xff\xff"), st.just(b"\xff" * 7)))
    else:
        request = pb.GetPlanRequest(session_id=draw(_session_ids))
    return who, request


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=getplan_calls())
def test_fuzz_getplan_fields(planner, case):
    """OK (a stored plan, exactly), or a code naming the field: never INTERNAL, UNKNOWN or a hang."""
    who, request = case
    token = {"admin": ADMIN, "alice": ALICE, "none": None, "wrong": "wrong-token-0123456789abcdef"}[who]
    try:
        plan = get_plan(planner, request, token)
    except grpc.RpcError as e:
        code = e.code()
        event(f"{who}: {code.name}")
        if who in ("none", "wrong"):
            assert code == grpc.StatusCode.UNAUTHENTICATED, (code, e.details())
        elif who == "alice":
            assert code == grpc.StatusCode.PERMISSION_DENIED, (code, e.details())
        else:
            assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (code, e.details(), request)
            assert "session_id" in e.details() or "GetPlan request" in e.details(), e.details()
        return
    event(f"{who}: OK")
    assert who == "admin"
    session = request.session_id if isinstance(request, pb.GetPlanRequest) else pb.GetPlanRequest.FromString(
        request).session_id
    assert plan == pb.Plan.FromString(KNOWN[session])


def test_after_the_getplan_fuzz_still_serving(planner):
    assert _serving(planner["target"])
    assert get_plan(planner, pb.GetPlanRequest(session_id="known.2_B"), ADMIN).version == 2**64 - 1
    log = planner["log"].read_text()
    assert "Traceback" not in log and "internal error" not in log
    assert planner["service"].proc.poll() is None
