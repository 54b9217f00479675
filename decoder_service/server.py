"""The Decoder servicer: translate, run the engine a round at a time, translate back.

A client that reads slowly, or not at all, holds back only its own stream. The batch loop puts
the stream's chunks in the stream's own queue (at most one per round of its generation, which
max_new_tokens and the slot bound) and the handler yields them to grpc, which awaits each write:
once the client's HTTP/2 window is full, flow control stops the writes, while the batch, the
torch thread and the other streams go on. The stream keeps its slot permit while its messages
wait, so a message that waits longer than max_write_stall_s cancels the stream: the permit is
freed (the request leaves the batch at the next round if it is still decoding) and the client
sees CANCELLED saying why once it reads again (the status queues behind the unread data).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hmac
import time

import grpc
import structlog

from clasp.config import ClaspConfig, SamplingParams
from clasp.engine import Engine
from clasp.scheduler import DEFAULT_SLOT_TOKENS, Scheduler
from clasp_serve.v1 import clasp_pb2 as pb
from clasp_serve.v1 import clasp_pb2_grpc as pb_grpc
from decoder_service.batch_loop import BatchLoop, Stream, next_chunk
from decoder_service.convert import chunk_to_pb, final_to_pb, request_from_pb
from decoder_service.metrics import DecoderMetrics
from decoder_service.model_info import model_info
from decoder_service.plan_bus import PlanBus, SessionExchange
from serving.security import BearerAuth, caller_identity

log = structlog.get_logger("decoder")


@dataclasses.dataclass
class _Admitted:
    """A request from admission (queued or decoding) to its end: what Abort needs."""

    abort: asyncio.Event
    owner: str | None  # the caller's token identity (None without tokens)
    secret: str  # the request's abort_secret ("" if it set none)
    reason: str = "abort"  # why abort was set: abort or shutdown (for logs)


class DecoderServicer(pb_grpc.DecoderServicer):
    def __init__(self, metrics: DecoderMetrics, max_concurrent: int, max_queue: int,
                 default_max_new_tokens: int, executor: concurrent.futures.Executor,
                 max_prompt_tokens: int | None = None, auth: BearerAuth | None = None,
                 slot_tokens: int = DEFAULT_SLOT_TOKENS, max_write_stall_s: float | None = None) -> None:
        self.engine: Engine | None = None  # set by attach() once loaded; the server starts before
        self.bus: PlanBus | None = None
        self.metrics = metrics
        self.default_max_new_tokens = default_max_new_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.auth = auth
        self.max_write_stall_s = max_write_stall_s  # None or 0: a stream may wait on its client for ever
        self.max_queue = max_queue
        self.max_concurrent = max_concurrent
        self.slot_tokens = slot_tokens
        self.slots = asyncio.Semaphore(max_concurrent)  # permits = decoding slots in the batch
        # The process's one torch thread (it also loaded and warmed the model): every admitted
        # stream decodes in one batch on it (BatchLoop). See serving.service.torch_executor.
        self.executor = executor
        self.batch: BatchLoop | None = None
        self.waiting = 0
        self.draining = False
        # request_id -> every admitted request, queued or decoding: an id is in use from
        # admission to the end (a second request with it is refused), and Abort finds both.
        self.requests: dict[str, _Admitted] = {}
        self._ending: set[asyncio.Future] = set()  # statuses of stalled streams, on their way

    def in_flight(self) -> int:
        """Streams decoding or waiting for a slot."""
        return len(self.requests)

    def attach(self, engine: Engine, bus: PlanBus | None, kv_budget_bytes: int | None = None) -> None:
        """Serve `engine`: allocate the batch's KV cache, max_concurrent slots of slot_tokens positions,
        fewer where that would exceed kv_budget_bytes (call on the event loop, before serving)."""
        spec = engine.runner.spec
        slot_bytes = (2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * engine.runner.dtype.itemsize
                      * min(self.slot_tokens, spec.max_context))
        slots = self.max_concurrent
        if kv_budget_bytes is not None and slots * slot_bytes > kv_budget_bytes:
            slots = kv_budget_bytes // slot_bytes
            if slots < 1:
                raise ValueError(f"kv budget {kv_budget_bytes >> 20} MiB holds no slot of {self.slot_tokens} positions "
                                 f"({slot_bytes >> 20} MiB): raise --kv-budget-mib or lower --slot-tokens")
            log.warning("fewer decoding slots than --max-concurrent: the KV budget holds only these",
                        slots=slots, max_concurrent=self.max_concurrent, slot_mib=slot_bytes >> 20)
            self.max_concurrent, self.slots = slots, asyncio.Semaphore(slots)
        self.batch = BatchLoop(Scheduler(engine, slots, self.slot_tokens), self.executor, self.metrics)
        self.engine, self.bus = engine, bus

    def start_batching(self) -> None:
        """Start the engine loop (on the event loop, once attached)."""
        self.batch.start()

    def warm_up(self) -> None:
        """One short generation of every kind so the first request pays no first-call costs."""
        ids = self.engine.encode("Hello")
        for mode in ("ar", "clasp"):
            self.engine.generate(ids, SamplingParams(max_new_tokens=4), ClaspConfig(mode=mode))

    def _may_abort(self, entry: _Admitted, caller: str | None, secret: str) -> bool:
        """Only the caller that started a request: the same token identity where tokens are required,
        and the request's own secret where it set one; with neither, nobody can prove it."""
        if self.auth is not None and caller != entry.owner:
            return False
        if entry.secret:
            return hmac.compare_digest(entry.secret.encode(), secret.encode())
        return self.auth is not None

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        entry = self.requests.get(request.request_id)
        if entry is None or not self._may_abort(entry, caller_identity(self.auth, context), request.abort_secret):
            return pb.AbortResponse(found=False)  # another caller's request looks like an unknown one
        entry.abort.set()
        return pb.AbortResponse(found=True)

    async def drain(self, grace_period_s: float, abort_wait_s: float = 10.0) -> None:
        """Shutdown: refuse new streams, give in-flight ones the grace period, then abort the rest,
        which end with FINISH_REASON_ABORTED within one round (or one prefill piece)."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_period_s
        while self.in_flight() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if not self.in_flight():
            return
        log.warning("grace period over: aborting in-flight streams", in_flight=self.in_flight())
        for entry in self.requests.values():
            entry.reason = "shutdown"
            entry.abort.set()
        deadline = loop.time() + abort_wait_s
        while self.in_flight() and loop.time() < deadline:
            await asyncio.sleep(0.05)

    async def _wait_for_slot(self, abort: asyncio.Event) -> bool:
        """Wait for a decoding slot or an abort; True with a slot held."""
        acquire = asyncio.ensure_future(self.slots.acquire())
        aborted = asyncio.ensure_future(abort.wait())
        try:
            await asyncio.wait({acquire, aborted}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the client went away while queued
            self._give_up(acquire)
            raise
        finally:
            aborted.cancel()
        if abort.is_set():
            self._give_up(acquire)
            return False
        return True

    def _give_up(self, acquire: asyncio.Future) -> None:
        if acquire.done() and not acquire.cancelled():
            self.slots.release()
        else:
            acquire.cancel()

    async def ModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfoResponse:
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "model is still loading")
        return model_info(self.engine)

    async def Generate(self, request: pb.GenerateRequest, context):
        if self.draining or self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "server is shutting down" if self.draining else "model is still loading")
        req = request_from_pb(request, self.engine, self.engine.config, self.default_max_new_tokens,
                              self.max_prompt_tokens)
        if req.request_id in self.requests:
            raise ValueError(f"request_id: {req.request_id!r} is already in use")
        self.batch.scheduler.check_fits(len(req.prompt_ids))
        with structlog.contextvars.bound_contextvars(request_id=req.request_id, session_id=req.session_id):
            if self.waiting >= self.max_queue:
                self.metrics.requests.labels(outcome="rejected").inc()
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"server busy: {self.waiting} requests already waiting (max_queue {self.max_queue})")
            entry = self.requests[req.request_id] = _Admitted(asyncio.Event(), caller_identity(self.auth, context),
                                                              req.abort_secret)
            try:
                self.waiting += 1
                self.metrics.queue_depth.set(self.waiting)
                try:
                    got_slot = await self._wait_for_slot(entry.abort)
                finally:
                    self.waiting -= 1
                    self.metrics.queue_depth.set(self.waiting)
                if not got_slot:  # aborted while queued: it never runs
                    self.metrics.requests.labels(outcome="aborted").inc()
                    log.info("generation stopped early", reason=entry.reason, num_generated=0, queued=True)
                    yield final_to_pb(req.request_id, None, "aborted", len(req.prompt_ids), 0, [], [])
                    return
                self.metrics.active.inc()
                task = asyncio.current_task()
                try:
                    async for message in self._decode(req, context, entry):
                        with self._client_takes(task, context):
                            yield message
                finally:
                    self.metrics.active.dec()
                    self.slots.release()
            finally:
                self.requests.pop(req.request_id, None)

    @contextlib.contextmanager
    def _client_takes(self, task: asyncio.Task, context):
        """Around one yield, which returns once grpc has written the message (flow control)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        timer = (loop.call_later(self.max_write_stall_s, self._stalled, task, context)
                 if self.max_write_stall_s else None)
        self.metrics.waiting_on_client.inc()
        try:
            yield
        finally:
            self.metrics.waiting_on_client.dec()
            self.metrics.write_wait_s.observe(loop.time() - started)
            if timer is not None:
                timer.cancel()

    def _stalled(self, task: asyncio.Task, context) -> None:
        # The status queues behind the unread data (the client sees it once it reads again); the
        # call's task is cancelled now, the same path as a client that went away.
        self.metrics.cancelled_rounds.labels(reason="write_stall").inc()
        self.metrics.requests.labels(outcome="write_stall").inc()
        log.warning("client stopped reading: stream cancelled", max_write_stall_s=self.max_write_stall_s)
        details = f"stream cancelled: the client took no message for {self.max_write_stall_s:g} s"

        async def end() -> None:
            with contextlib.suppress(BaseException):
                await context.abort(grpc.StatusCode.CANCELLED, details)

        self._ending.add(asyncio.ensure_future(end()))
        self._ending = {t for t in self._ending if not t.done()}
        task.cancel()

    async def _decode(self, req, context, entry: _Admitted):
        session = req.session_id or req.request_id  # an unnamed request still plans through the planner
        exchange = SessionExchange(self.bus, session) if self.bus is not None else None
        if exchange is not None:
            self.bus.watch(session)
        stream = Stream(req.prompt_ids, req.params, req.config, exchange.initial_plan() if exchange else None,
                        exchange)
        self.batch.submit(stream)
        started = time.perf_counter()
        first_token_at = None
        num_generated, result, finish = 0, None, None
        aborted = asyncio.ensure_future(entry.abort.wait())
        try:
            while result is None:
                getting = asyncio.ensure_future(next_chunk(stream))
                await asyncio.wait({getting, aborted}, return_when=asyncio.FIRST_COMPLETED)
                if not getting.done():  # aborted while waiting for its round (e.g. behind another prompt)
                    getting.cancel()
                    chunk = None
                else:
                    chunk = getting.result()
                    result = chunk.result
                    num_generated += len(chunk.token_ids)
                    if first_token_at is None and chunk.token_ids:
                        first_token_at = time.perf_counter()
                        self.metrics.time_to_first_token_s.observe(first_token_at - started)
                if result is None:
                    # Checked between rounds (and prefill pieces): cancellation and aborts take
                    # effect within one step.
                    remaining = context.time_remaining()
                    if entry.abort.is_set():
                        finish = "aborted"
                    elif remaining is not None and remaining <= 0:
                        finish = "cancelled"
                    if finish:
                        self.batch.cancel(stream)
                        self.metrics.cancelled_rounds.labels(reason=finish).inc()
                        log.info("generation stopped early", reason=entry.reason if finish == "aborted" else finish,
                                 num_generated=num_generated)
                        if chunk is not None and chunk.token_ids:
                            yield chunk_to_pb(req.request_id, chunk.token_ids, chunk.text)
                        break
                    if not chunk.token_ids:
                        continue  # between prefill pieces: nothing to send
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
            aborted.cancel()
            if result is None:
                self.batch.cancel(stream)  # leaves the batch at the next round boundary
            if exchange is not None:
                self.bus.unwatch(session)
