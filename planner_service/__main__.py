"""python -m planner_service: the CLaSp planner. Every flag also reads a CLASP_* environment variable."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket

import grpc
import redis
import structlog
from prometheus_client import CollectorRegistry, start_http_server

from clasp.config import FP32_KERNEL_HELP, FP32_KERNELS, PACK_WEIGHTS, PACK_WEIGHTS_HELP, ClaspConfig
from clasp.engine import Engine
from clasp_serve.v1 import clasp_pb2 as pb
from clasp_serve.v1 import clasp_pb2_grpc as pb_grpc
from planner_service.contexts import SessionContexts
from planner_service.worker import PlannerMetrics, PlannerWorker
from serving.env import env
from serving.plan_wire import parse_plan, plan_key
from serving.redis_client import redis_client
from serving.security import GuardInterceptor, add_port, add_security_flags, auth_from_env
from serving.service import (ErrorInterceptor, StopSignal, StoppedBeforeReady, add_health_and_reflection,
                             listen_address, metrics_address, run_service, set_serving, torch_executor)

SERVICE = pb.DESCRIPTOR.services_by_name["Planner"].full_name
log = structlog.get_logger("planner")


class PlannerServicer(pb_grpc.PlannerServicer):
    """GetPlan: a session's stored plan, for inspection. With tokens it is an admin method (only
    --admin-identities): plans are the service's internal state, which no user needs (Generate's
    final message reports its skip set and plan versions), and a session id is not owned by
    anyone (any caller may name any session), so no per-session rule could be enforced."""

    def __init__(self, client) -> None:
        self.client = client

    async def GetPlan(self, request: pb.GetPlanRequest, context) -> pb.Plan:
        if not request.session_id:
            raise ValueError("session_id: required")
        key = plan_key(request.session_id)  # ValueError naming session_id for an id that is not one
        try:
            raw = await asyncio.to_thread(self.client.get, key)
        except (redis.RedisError, OSError) as e:
            log.warning("GetPlan: redis unavailable", error=str(e)[:200])
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the plan store (Redis) is unavailable")
        if raw is None:
            raise LookupError(f"session_id: no plan for session {request.session_id!r}")
        try:
            return parse_plan(raw)
        except ValueError:  # not the caller's fault: a damaged key reads as no plan
            log.warning("GetPlan: stored plan does not parse", session_id=request.session_id)
            raise LookupError(f"session_id: no valid plan for session {request.session_id!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m planner_service", description=(
        "CLaSp planner: consumes re-plan requests from a Redis stream, runs the sequence-parallel layer-skip DP "
        "on a rebuilt context, and writes each session's plan to Redis."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default=env("HOST", "127.0.0.1"),
                   help="listen address of gRPC and metrics; 0.0.0.0 or :: for every interface (pods) [CLASP_HOST]")
    p.add_argument("--port", type=int, default=int(env("PLANNER_PORT", 50052)), help="gRPC port [CLASP_PLANNER_PORT]")
    p.add_argument("--metrics-port", type=int, default=int(env("PLANNER_METRICS_PORT", 9092)),
                   help="Prometheus HTTP port, 0 to disable [CLASP_PLANNER_METRICS_PORT]")
    p.add_argument("--redis-url", default=env("REDIS_URL", "redis://127.0.0.1:6379/0"), help="[CLASP_REDIS_URL]")
    p.add_argument("--model", default=env("MODEL") or None, help="local HF model directory; default: embedded [CLASP_MODEL]")
    p.add_argument("--device", default=env("DEVICE", "auto"), help="cpu, cuda or auto [CLASP_DEVICE]")
    p.add_argument("--dtype", default=env("DTYPE", "auto"), help="must match the decoder's [CLASP_DTYPE]")
    p.add_argument("--threads", type=int, default=int(env("THREADS", 0)), help="torch CPU threads [CLASP_THREADS]")
    p.add_argument("--pack-weights", default=env("PACK_WEIGHTS", "auto"), choices=list(PACK_WEIGHTS),
                   help=PACK_WEIGHTS_HELP + " [CLASP_PACK_WEIGHTS]")
    p.add_argument("--fp32-kernel", default=env("FP32_KERNEL", "auto"), choices=("auto",) + FP32_KERNELS,
                   help=FP32_KERNEL_HELP + " [CLASP_FP32_KERNEL]")
    p.add_argument("--max-sessions", type=int, default=int(env("MAX_SESSIONS", 256)),
                   help="session contexts kept (LRU) [CLASP_MAX_SESSIONS]")
    p.add_argument("--max-context-mib", type=int, default=int(env("MAX_CONTEXT_MIB", 1024)),
                   help="KV cache memory of all session contexts together, LRU evicted beyond it "
                        "(the embedded model: 45 KiB per token) [CLASP_MAX_CONTEXT_MIB]")
    p.add_argument("--plan-ttl-s", type=int, default=int(env("PLAN_TTL_S", 3600)), help="plan key TTL [CLASP_PLAN_TTL_S]")
    p.add_argument("--consumer-name", default=env("CONSUMER_NAME", f"{socket.gethostname()}-{os.getpid()}"),
                   help="consumer name in the Redis group [CLASP_CONSUMER_NAME]")
    p.add_argument("--grace-period-s", type=float, default=float(env("GRACE_PERIOD_S", 20)),
                   help="on SIGTERM, time the plan in progress and in-flight RPCs get to finish [CLASP_GRACE_PERIOD_S]")
    p.add_argument("--claim-idle-s", type=float, default=float(env("CLAIM_IDLE_S", 30)),
                   help="claim another planner's unacknowledged requests after this long [CLASP_CLAIM_IDLE_S]")
    p.add_argument("--prune-idle-s", type=float, default=float(env("PRUNE_IDLE_S", 120)),
                   help="remove group consumers idle this long with nothing pending (dead planners) "
                        "[CLASP_PRUNE_IDLE_S]")
    p.add_argument("--admin-identities", default=env("ADMIN_IDENTITIES", "admin"),
                   help="comma-separated token identities that may call GetPlan when tokens are required "
                        "[CLASP_ADMIN_IDENTITIES]")
    p.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"), help="[CLASP_LOG_LEVEL]")
    add_security_flags(p, env)
    return p


async def serve(args: argparse.Namespace) -> None:
    stop = StopSignal()
    registry = CollectorRegistry()
    metrics = PlannerMetrics(registry)
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=metrics_address(args.host), registry=registry)
    auth = auth_from_env(args.auth_token_file)  # GetPlan behind the same tokens as the decoder
    admins = frozenset(filter(None, (a.strip() for a in args.admin_identities.split(","))))
    guard = GuardInterceptor(auth, admin_methods=frozenset({f"/{SERVICE}/GetPlan"}), admins=admins)
    server = grpc.aio.server(interceptors=[guard, ErrorInterceptor()])
    health = add_health_and_reflection(server, [SERVICE], args.reflection)
    client = redis_client(args.redis_url)
    pb_grpc.add_PlannerServicer_to_server(PlannerServicer(client), server)
    await set_serving(health, [SERVICE], False)
    bound = add_port(server, listen_address(args.host, args.port), args)  # TLS with --tls-cert-file
    await server.start()
    torch_thread = torch_executor()
    # The DP scores candidates with the full weights: no draft copy here.
    try:
        engine = await stop.unless_stopped(asyncio.get_running_loop().run_in_executor(
            torch_thread, Engine.load, args.model, ClaspConfig(draft_dtype=None), args.device, args.dtype,
            PACK_WEIGHTS[args.pack_weights], None, None, None if args.fp32_kernel == "auto" else args.fp32_kernel))
    except StoppedBeforeReady:
        await server.stop(0)
        raise
    contexts = SessionContexts(engine.runner, args.max_sessions, args.max_context_mib * 2**20)
    worker = PlannerWorker(client, contexts, engine.identity, args.consumer_name, metrics, plan_ttl_s=args.plan_ttl_s,
                           claim_idle_s=args.claim_idle_s, prune_idle_s=args.prune_idle_s)
    worker.start(torch_thread)
    await set_serving(health, [SERVICE], True)
    log.info("serving", host=args.host, port=bound, model=engine.identity, consumer=args.consumer_name)
    await stop.wait()
    log.info("draining", grace_period_s=args.grace_period_s)
    # The worker takes no new requests; the plan in progress gets the grace period (one it
    # does not finish stays unacknowledged, and another planner claims it).
    await set_serving(health, [SERVICE], False)
    await asyncio.gather(server.stop(args.grace_period_s), asyncio.to_thread(worker.stop, args.grace_period_s))
    torch_thread.shutdown(wait=False)
    log.info("stopped")


def main() -> None:
    run_service(build_parser(), serve)


if __name__ == "__main__":
    main()
