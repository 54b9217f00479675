"""A service process's main pieces: logging, the stop signal, the error-mapping interceptor,
health and reflection, listen addresses and the one torch thread. (The HTTP gateway uses the
logging and env pieces too, so nothing here imports torch at the top.)"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import os
import signal
import socket
import sys

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = structlog.get_logger("grpc")


async def _abort(context: grpc.aio.ServicerContext, error: Exception) -> None:
    if isinstance(error, ValueError):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    if isinstance(error, LookupError):
        await context.abort(grpc.StatusCode.NOT_FOUND, str(error))
    log.exception("internal error", error=str(error))
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps ValueError to INVALID_ARGUMENT, LookupError to NOT_FOUND and the rest to INTERNAL."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):
                try:
                    async for item in inner_stream(request, context):
                        yield item
                except (grpc.aio.AbortError, GeneratorExit):
                    raise
                except Exception as e:
                    await _abort(context, e)

            return grpc.unary_stream_rpc_method_handler(unary_stream, handler.request_deserializer,
                                                        handler.response_serializer)
        if handler.unary_unary:
            inner_unary = handler.unary_unary

            async def unary_unary(request, context):
                try:
                    return await inner_unary(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as e:
                    await _abort(context, e)

            return grpc.unary_unary_rpc_method_handler(unary_unary, handler.request_deserializer,
                                                       handler.response_serializer)
        return handler


def add_health_and_reflection(server: grpc.aio.Server, service_names: list[str],
                              with_reflection: bool = False) -> health.aio.HealthServicer:
    """Register grpc.health.v1 (every service NOT_SERVING until set) and, if asked, server reflection."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    if with_reflection:
        reflection.enable_server_reflection(service_names + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return servicer


async def set_serving(servicer: health.aio.HealthServicer, service_names: list[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        await servicer.set(name, status)


def configure_logging(level: str = "INFO") -> None:
    """structlog JSON lines on stderr, with context variables (request_id, session_id) merged in."""
    logging.basicConfig(stream=sys.stderr, level=level, format="%(message)s")
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso"), structlog.processors.format_exc_info,
                    structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr))


class StoppedBeforeReady(Exception):
    """SIGTERM or SIGINT came while the model was still loading or warming up."""


class StopSignal:
    """SIGTERM and SIGINT, caught from the start of serve(), before the model loads.

    In a container the service is PID 1, for which the kernel ignores a signal that has no
    handler: a SIGTERM during the load would be lost and the pod killed after its grace period.
    """

    def __init__(self) -> None:
        self.received = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.received.set)

    async def wait(self) -> None:
        await self.received.wait()

    async def unless_stopped(self, awaitable):
        """The result of `awaitable`, or StoppedBeforeReady if a stop signal comes first."""
        work = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self.received.wait())
        await asyncio.wait({work, stop}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            stop.cancel()
            return work.result()
        raise StoppedBeforeReady


def listen_address(host: str, port: int) -> str:
    """host:port for grpc, with an IPv6 literal in brackets ("::" -> "[::]:50051")."""
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def metrics_address(host: str) -> str:
    """The address the Prometheus HTTP server binds for a service listening on `host`.

    A wildcard (0.0.0.0 or ::) means every interface, as grpc reads it (its wildcard listener
    takes IPv4 and IPv6): the dual-stack "::" where the kernel has IPv6, else 0.0.0.0.
    """
    host = host.strip("[]")
    if host not in ("0.0.0.0", "::"):
        return host
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(("::", 0))
        return "::"
    except OSError:
        return "0.0.0.0"


def torch_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread a service process runs torch on: model load, warm-up, decoding, planning.

    Every OS thread that enters a torch parallel region gets its own OpenMP thread team, and
    libgomp's idle teams spin. Measured in-process on 2 cores: with the model loaded on the main
    thread and decoding on a worker, clasp fell from 22.4 to 13.0 tok/s (ar 13.4 to 12.5).
    """
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="torch")


def run_service(parser: argparse.ArgumentParser, serve) -> None:
    """A service's main(): parse flags, set up logs and CPU threads, run serve(args) to the end."""
    args = parser.parse_args()
    configure_logging(args.log_level)
    if args.threads:
        import torch  # here, not at the top: the HTTP gateway imports this module and needs no torch

        torch.set_num_threads(args.threads)
    try:
        asyncio.run(serve(args))
    except StoppedBeforeReady:
        # The torch thread is still inside the model load, which cannot be interrupted, and a
        # normal exit would join it: nothing is in flight yet, so leave now.
        log.info("stopped before serving")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
