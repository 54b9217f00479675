"""The Decoder servicer: translate, run the engine a round at a time, translate back."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import grpc
import structlog

from clasp.config import ClaspConfig, SamplingParams
from clasp.engine import Engine
from clasp_serve.v1 import clasp_pb2 as pb
from clasp_serve.v1 import clasp_pb2_grpc as pb_grpc
from decoder_service.convert import chunk_to_pb, final_to_pb, request_from_pb
from decoder_service.metrics import DecoderMetrics
from decoder_service.plan_bus import PlanBus, SessionExchange

log = structlog.get_logger("decoder")


class DecoderServicer(pb_grpc.DecoderServicer):
    def __init__(self, metrics: DecoderMetrics, max_concurrent: int, max_queue: int,
                 default_max_new_tokens: int, executor: concurrent.futures.Executor) -> None:
        self.engine: Engine | None = None  # set by attach() once loaded; the server starts before
        self.bus: PlanBus | None = None
        self.metrics = metrics
        self.default_max_new_tokens = default_max_new_tokens
        self.max_queue = max_queue
        self.slots = asyncio.Semaphore(max_concurrent)
        # The process's one torch thread (it also loaded and warmed the model): concurrent
        # streams interleave round by round on it. See service_common.torch_executor.
        self.executor = executor
        self.waiting = 0
        self.draining = False
        self.aborts: dict[str, asyncio.Event] = {}

    def in_flight(self) -> int:
        """Streams decoding or waiting for a slot."""
        return len(self.aborts) + self.waiting

    def attach(self, engine: Engine, bus: PlanBus | None) -> None:
        self.engine, self.bus = engine, bus

    def warm_up(self) -> None:
        """One short generation of every kind so the first request pays no first-call costs."""
        ids = self.engine.encode("Hello")
        for mode in ("ar", "clasp"):
            self.engine.generate(ids, SamplingParams(max_new_tokens=4), ClaspConfig(mode=mode))

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        event = self.aborts.get(request.request_id)
        if event is not None:
            event.set()
        return pb.AbortResponse(found=event is not None)

    async def Generate(self, request: pb.GenerateRequest, context):
        if self.draining or self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "server is shutting down" if self.draining else "model is still loading")
        req = request_from_pb(request, self.engine, self.engine.config, self.default_max_new_tokens)
        if req.request_id in self.aborts:
            raise ValueError(f"request_id: {req.request_id!r} is already running")
        with structlog.contextvars.bound_contextvars(request_id=req.request_id, session_id=req.session_id):
            if self.waiting >= self.max_queue:
                self.metrics.requests.labels(outcome="rejected").inc()
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"server busy: {self.waiting} requests already waiting (max_queue {self.max_queue})")
            self.waiting += 1
            self.metrics.queue_depth.set(self.waiting)
            try:
                await self.slots.acquire()
            finally:
                self.waiting -= 1
                self.metrics.queue_depth.set(self.waiting)
            abort = self.aborts[req.request_id] = asyncio.Event()
            self.metrics.active.inc()
            try:
                async for message in self._decode(req, context, abort):
                    yield message
            finally:
                self.metrics.active.dec()
                self.aborts.pop(req.request_id, None)
                self.slots.release()

    async def _decode(self, req, context, abort: asyncio.Event):
        loop = asyncio.get_running_loop()
        session = req.session_id or req.request_id  # an unnamed request still plans through the planner
        exchange = SessionExchange(self.bus, session) if self.bus is not None else None
        if exchange is not None:
            self.bus.watch(session)
        stream = self.engine.stream(req.prompt_ids, req.params, req.config,
                                    initial_plan=exchange.initial_plan() if exchange else None,
                                    plan_exchange=exchange)
        started = time.perf_counter()
        first_token_at = None
        num_generated, result, finish = 0, None, None
        pending = None
        try:
            while result is None:
                pending = loop.run_in_executor(self.executor, next, stream)
                chunk = await pending
                pending = None
                result = chunk.result
                num_generated += len(chunk.token_ids)
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                    self.metrics.time_to_first_token_s.observe(first_token_at - started)
                if result is None:
                    # Checked between rounds: cancellation and aborts take effect within one step.
                    remaining = context.time_remaining()
                    if abort.is_set():
                        finish = "aborted"
                    elif remaining is not None and remaining <= 0:
                        finish = "cancelled"
                    if finish:
                        self.metrics.cancelled_rounds.labels(reason=finish).inc()
                        log.info("generation stopped early", reason=finish, num_generated=num_generated)
                        yield chunk_to_pb(req.request_id, chunk.token_ids, chunk.text)
                        break
                yield chunk_to_pb(req.request_id, chunk.token_ids, chunk.text)
            finish = finish or result.finish_reason
            if result is not None:
                self.metrics.observe_result(result.stats, len(result.token_ids),
                                            time.perf_counter() - (first_token_at or started), len(result.plans))
            self.metrics.requests.labels(outcome=finish).inc()
            log.info("generation finished", finish_reason=finish, num_generated=num_generated,
                     seconds=round(time.perf_counter() - started, 3),
                     mean_accepted_length=round(result.stats.mean_accepted_length, 3) if result else None)
            skip_set = result.plans[-1].skip_set if result is not None and result.plans else []
            yield final_to_pb(req.request_id, result, finish, len(req.prompt_ids), num_generated,
                              exchange.versions if exchange else [], skip_set)
        except asyncio.CancelledError:
            self.metrics.cancelled_rounds.labels(reason="cancelled").inc()
            self.metrics.requests.labels(outcome="cancelled").inc()
            log.info("generation cancelled by the client", num_generated=num_generated)
            raise
        finally:
            if exchange is not None:
                self.bus.unwatch(session)
            # The engine's generator may still be inside a round on a worker: close it after.
            if pending is not None and not pending.done():
                pending.add_done_callback(lambda _: stream.close())
            else:
                stream.close()
