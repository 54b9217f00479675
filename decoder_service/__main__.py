"""python -m decoder_service: the gRPC decoder. Every flag also reads a CLASP_* environment variable."""

from __future__ import annotations

import argparse
import asyncio

import grpc
import structlog
from prometheus_client import CollectorRegistry, start_http_server

from clasp.config import (DRAFT_DTYPE_CHOICES, DRAFT_KERNEL_HELP, DRAFT_KERNELS, FP32_KERNEL_HELP, FP32_KERNELS, FUSED_DRAFT, FUSED_DRAFT_HELP, MODES,
                          PACK_WEIGHTS, PACK_WEIGHTS_HELP, ClaspConfig)
from clasp.engine import Engine
from clasp.backends.cpu import single_row_choices
from clasp_serve.v1 import clasp_pb2
from clasp_serve.v1 import clasp_pb2_grpc as pb_grpc
from decoder_service.metrics import DecoderMetrics
from decoder_service.plan_bus import PlanBus
from decoder_service.server import DecoderServicer
from serving.env import env
from serving.redis_client import redis_client
from serving.security import GuardInterceptor, add_port, add_security_flags, auth_from_env
from serving.service import (ErrorInterceptor, StopSignal, StoppedBeforeReady, add_health_and_reflection,
                             listen_address, metrics_address, run_service, set_serving, torch_executor)

SERVICE = clasp_pb2.DESCRIPTOR.services_by_name["Decoder"].full_name
log = structlog.get_logger("decoder")


def build_parser() -> argparse.ArgumentParser:
    d = ClaspConfig()
    p = argparse.ArgumentParser(prog="python -m decoder_service", description=(
        "CLaSp decoder: streams generations over gRPC (clasp.v1.Decoder), drafting with a layer-skipped copy "
        "of the model; publishes re-plan requests to Redis and adopts the planner's plans without waiting."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--host", default=env("HOST", "127.0.0.1"),
                   help="listen address of gRPC and metrics; 0.0.0.0 or :: for every interface (pods) [CLASP_HOST]")
    p.add_argument("--port", type=int, default=int(env("DECODER_PORT", 50051)), help="gRPC port [CLASP_DECODER_PORT]")
    p.add_argument("--metrics-port", type=int, default=int(env("DECODER_METRICS_PORT", 9091)),
                   help="Prometheus HTTP port, 0 to disable [CLASP_DECODER_METRICS_PORT]")
    p.add_argument("--redis-url", default=env("REDIS_URL", ""),
                   help="Redis for plans, e.g. redis://localhost:6379/0; empty: plan in-process [CLASP_REDIS_URL]")
    p.add_argument("--model", default=env("MODEL") or None, help="local HF model directory; default: embedded [CLASP_MODEL]")
    p.add_argument("--device", default=env("DEVICE", "auto"), help="cpu, cuda or auto [CLASP_DEVICE]")
    p.add_argument("--dtype", default=env("DTYPE", "auto"), help="float32, bfloat16, float16 or auto [CLASP_DTYPE]")
    p.add_argument("--threads", type=int, default=int(env("THREADS", 0)), help="torch CPU threads, 0: torch's choice [CLASP_THREADS]")
    p.add_argument("--pack-weights", default=env("PACK_WEIGHTS", "auto"), choices=list(PACK_WEIGHTS),
                   help=PACK_WEIGHTS_HELP + " [CLASP_PACK_WEIGHTS]")
    p.add_argument("--fused-draft", default=env("FUSED_DRAFT", "auto"), choices=list(FUSED_DRAFT),
                   help=FUSED_DRAFT_HELP + " [CLASP_FUSED_DRAFT]")
    p.add_argument("--draft-kernel", default=env("DRAFT_KERNEL", "auto"), choices=("auto",) + DRAFT_KERNELS,
                   help=DRAFT_KERNEL_HELP + " [CLASP_DRAFT_KERNEL]")
    p.add_argument("--fp32-kernel", default=env("FP32_KERNEL", "auto"), choices=("auto",) + FP32_KERNELS,
                   help=FP32_KERNEL_HELP + " [CLASP_FP32_KERNEL]")
    p.add_argument("--max-concurrent", type=int, default=int(env("MAX_CONCURRENT", 8)),
                   help="streams decoding at once, as one batch: each round drafts and verifies all of them in "
                        "shared forward passes; each holds a KV slot of --slot-tokens positions [CLASP_MAX_CONCURRENT]")
    p.add_argument("--slot-tokens", type=int, default=int(env("SLOT_TOKENS", 2048)),
                   help="KV positions per decoding slot: prompt plus new tokens of one stream (max_new_tokens is "
                        "clipped to what is left) [CLASP_SLOT_TOKENS]")
    p.add_argument("--kv-budget-mib", type=int, default=int(env("KV_BUDGET_MIB", 1024)),
                   help="memory for all slots' KV cache, allocated once at start; fewer slots than --max-concurrent "
                        "where they would not fit [CLASP_KV_BUDGET_MIB]")
    p.add_argument("--max-queue", type=int, default=int(env("MAX_QUEUE", 16)),
                   help="streams waiting for a slot before RESOURCE_EXHAUSTED [CLASP_MAX_QUEUE]")
    p.add_argument("--grace-period-s", type=float, default=float(env("GRACE_PERIOD_S", 20)),
                   help="on SIGTERM, time in-flight streams get to finish [CLASP_GRACE_PERIOD_S]")
    p.add_argument("--max-write-stall-s", type=float, default=float(env("MAX_WRITE_STALL_S", 60)),
                   help="cancel a stream whose client has not taken its last message for this long (it holds a "
                        "decoding slot meanwhile); 0: never [CLASP_MAX_WRITE_STALL_S]")
    p.add_argument("--max-new-tokens", type=int, default=int(env("MAX_NEW_TOKENS", 256)),
                   help="default when a request sets none [CLASP_MAX_NEW_TOKENS]")
    p.add_argument("--mode", default=env("MODE", d.mode), choices=MODES, help="default mode [CLASP_MODE]")
    p.add_argument("--num-skip-layers", type=int, default=env("NUM_SKIP_LAYERS"), help="default M [CLASP_NUM_SKIP_LAYERS]")
    p.add_argument("--replan-interval", type=int, default=int(env("REPLAN_INTERVAL", d.replan_interval)),
                   help="default LOI [CLASP_REPLAN_INTERVAL]")
    p.add_argument("--max-draft-length", type=int, default=int(env("MAX_DRAFT_LENGTH", d.max_draft_length)),
                   help="default K [CLASP_MAX_DRAFT_LENGTH]")
    p.add_argument("--draft-dtype", default=env("DRAFT_DTYPE", d.draft_dtype),
                   choices=DRAFT_DTYPE_CHOICES,
                   help="draft weight copy dtype, 'none' to share [CLASP_DRAFT_DTYPE]")
    p.add_argument("--max-prompt-tokens", type=int, default=int(env("MAX_PROMPT_TOKENS", 1792)),
                   help="longest prompt accepted, in tokens (at most the context window) [CLASP_MAX_PROMPT_TOKENS]")
    p.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"), help="[CLASP_LOG_LEVEL]")
    add_security_flags(p, env)
    return p


async def serve(args: argparse.Namespace) -> None:
    stop = StopSignal()
    registry = CollectorRegistry()
    metrics = DecoderMetrics(registry)
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=metrics_address(args.host), registry=registry)
    auth = auth_from_env(args.auth_token_file)
    server = grpc.aio.server(interceptors=[GuardInterceptor(auth), ErrorInterceptor()])
    health = add_health_and_reflection(server, [SERVICE], args.reflection)
    torch_thread = torch_executor()
    servicer = DecoderServicer(metrics, args.max_concurrent, args.max_queue, args.max_new_tokens, torch_thread,
                               args.max_prompt_tokens, auth, args.slot_tokens, args.max_write_stall_s)
    pb_grpc.add_DecoderServicer_to_server(servicer, server)
    await set_serving(health, [SERVICE], False)
    bound = add_port(server, listen_address(args.host, args.port), args)  # TLS with --tls-cert-file
    await server.start()
    log.info("listening; loading model", host=args.host, port=bound, model=args.model or "embedded",
             auth=auth is not None, reflection=args.reflection)

    config = ClaspConfig(mode=args.mode, num_skip_layers=None if args.num_skip_layers is None else int(args.num_skip_layers),
                         replan_interval=args.replan_interval, max_draft_length=args.max_draft_length,
                         draft_dtype=None if args.draft_dtype in (None, "none") else args.draft_dtype)
    loop = asyncio.get_running_loop()
    bus = None
    try:
        engine = await stop.unless_stopped(loop.run_in_executor(
            torch_thread, Engine.load, args.model, config, args.device, args.dtype, PACK_WEIGHTS[args.pack_weights],
            FUSED_DRAFT[args.fused_draft], None if args.draft_kernel == "auto" else args.draft_kernel,
            None if args.fp32_kernel == "auto" else args.fp32_kernel))
        if args.redis_url:
            bus = PlanBus(redis_client(args.redis_url), engine.identity, engine.runner.spec.num_layers, metrics=metrics)
            bus.start()
        # On the torch thread: attaching allocates the slot KV cache, and a torch op on the event
        # loop's thread would give that thread an OpenMP team of its own; with more OpenMP threads
        # than cores, libgomp stops spinning between parallel regions and every decoding step pays
        # for waking its workers (a plain step measured 35 ms instead of 23 ms on 2 cores).
        await loop.run_in_executor(torch_thread, servicer.attach, engine, bus, args.kv_budget_mib << 20)
        servicer.start_batching()
        await stop.unless_stopped(loop.run_in_executor(torch_thread, servicer.warm_up))
    except StoppedBeforeReady:
        await server.stop(0)
        if bus is not None:
            bus.stop()
        raise
    await set_serving(health, [SERVICE], True)
    log.info("serving", model=engine.identity, redis=bool(bus),
             draft_kernel=engine.draft_kernel.as_dict() if engine.draft_kernel else None,
             packed_weights_mib=engine.runner.packed_nbytes >> 20,
             packed_from_rows=engine.runner.packed_min_rows, single_row_as_two=single_row_choices(),
             fp32_kernel=engine.runner.backend.describe().get("fp32_kernel"))

    await stop.wait()
    log.info("draining", grace_period_s=args.grace_period_s, in_flight=servicer.in_flight())
    # Health turns NOT_SERVING and new streams get UNAVAILABLE, while the server still answers
    # probes; in-flight streams get the grace period to finish, then the rest are aborted.
    await set_serving(health, [SERVICE], False)
    await servicer.drain(args.grace_period_s)  # then what is left ends FINISH_REASON_ABORTED
    await server.stop(1.0)
    if bus is not None:
        bus.stop()
    log.info("stopped")


def main() -> None:
    run_service(build_parser(), serve)


if __name__ == "__main__":
    main()
