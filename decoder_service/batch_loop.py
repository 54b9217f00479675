"""The decoder's engine loop: every admitted stream decodes in one batch (clasp.scheduler).

The torch thread runs the rounds back to back while any stream is admitted: between rounds it
admits newcomers into free slots and drops streams that were aborted or cancelled, runs one round
for all of them, and hands the chunks to the event loop (call_soon_threadsafe), which puts each
in its stream's own queue. The thread never waits for the event loop between rounds (a round trip
through it per round cost 6-10 ms of a ~20 ms plain step on 2 cores); it returns when nothing is
admitted or waiting, and the next submit starts it again. A stream's handler only awaits its
queue, so a client that reads slowly holds back nobody: its chunks wait in its queue (at most one
per round of its own generation, which max_new_tokens bounds) while gRPC flow control stops the
writes.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses

import structlog

from clasp.config import ClaspConfig, SamplingParams
from clasp.output import Chunk
from clasp.plan_exchange import PlanExchange
from clasp.planner import LayerPlan
from clasp.request import Request
from clasp.scheduler import Scheduler

log = structlog.get_logger("decoder")


@dataclasses.dataclass(eq=False)
class Stream:
    """One Generate call as the loop sees it."""

    prompt_ids: list[int]
    params: SamplingParams
    config: ClaspConfig
    initial_plan: LayerPlan | None
    exchange: PlanExchange | None
    chunks: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)  # Chunk, or an exception that ended it
    request: Request | None = None
    cancelled: bool = False  # set by the handler (abort, deadline, client gone); the loop drops it


class BatchLoop:
    def __init__(self, scheduler: Scheduler, executor: concurrent.futures.Executor, metrics=None) -> None:
        self.scheduler = scheduler
        self.executor = executor
        self.metrics = metrics
        self.joining: collections.deque[Stream] = collections.deque()  # appended on the event loop, taken on the torch thread
        self.running: dict[int, Stream] = {}  # id(request) -> stream; the torch thread's
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        """Stop after the current round (the streams still running are left as they are)."""
        self._stopping = True
        if self._task is not None:
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def submit(self, stream: Stream) -> None:
        """Queue a stream to join at the next round boundary (the caller holds a slot permit)."""
        self.joining.append(stream)
        self._loop = self._loop or asyncio.get_running_loop()  # a request can come before start()
        if self._task is None or self._task.done():
            self._task = self._loop.create_task(self._drive(), name="batch-loop")

    def cancel(self, stream: Stream) -> None:
        """The stream leaves at the next round boundary (its slot is freed there)."""
        stream.cancelled = True

    async def _drive(self) -> None:
        # A stream submitted while the thread was deciding to return is in `joining` by the time
        # this resumes (both run on the event loop), so it is never left waiting.
        while (self.joining or self.running) and not self._stopping:
            await self._loop.run_in_executor(self.executor, self._run_until_idle)

    # ------------------------------------------------------------------ on the torch thread
    def _run_until_idle(self) -> None:
        try:
            self._rounds()
        except BaseException as e:  # a bug outside a step: fail every stream it holds rather than strand them
            log.exception("engine loop failed", streams=len(self.running), waiting=len(self.joining))
            for stream in list(self.running.values()):
                self._finish(stream, e)
            while self.joining:
                stream = self.joining.popleft()
                self._loop.call_soon_threadsafe(_deliver, [(stream, e)])

    def _rounds(self) -> None:
        while not self._stopping:
            self._drop_cancelled()
            self._admit()
            if not self.running:
                return
            try:
                results = self.scheduler.step()
            except Exception as e:  # a failed step fails the streams in it, not the process
                log.exception("decoding step failed", streams=len(self.running))
                for stream in list(self.running.values()):
                    self._finish(stream, e)
                continue
            delivered = []
            for req, chunk in results:
                stream = self.running.get(id(req))
                if stream is None:
                    continue
                delivered.append((stream, chunk))
                if chunk.result is not None:
                    del self.running[id(req)]
            if delivered:
                self._loop.call_soon_threadsafe(_deliver, delivered)
            if self.metrics is not None:
                self.metrics.batch_size.observe(len(results))

    def _drop_cancelled(self) -> None:
        for key, stream in list(self.running.items()):
            if stream.cancelled:
                self.scheduler.release(stream.request)
                del self.running[key]

    def _admit(self) -> None:
        waiting = len(self.joining)
        for _ in range(waiting):  # in order; a stream that cannot be admitted yet keeps its place
            if not self.scheduler.has_free_slot():
                break
            stream = self.joining.popleft()
            if stream.cancelled:
                continue
            try:
                stream.request = self.scheduler.admit(stream.prompt_ids, stream.params, stream.config,
                                                      stream.initial_plan, stream.exchange)
            except Exception as e:  # ValueError: the request cannot run (e.g. its prompt does not fit a slot)
                self._loop.call_soon_threadsafe(_deliver, [(stream, e)])
                continue
            self.running[id(stream.request)] = stream

    def _finish(self, stream: Stream, error: BaseException) -> None:
        if stream.request is not None:
            self.scheduler.release(stream.request)
        self.running.pop(id(stream.request), None)
        self._loop.call_soon_threadsafe(_deliver, [(stream, error)])


def _deliver(items: list) -> None:
    """On the event loop: each (stream, chunk or exception) into its stream's queue."""
    for stream, item in items:
        stream.chunks.put_nowait(item)


async def next_chunk(stream: Stream) -> Chunk:
    """The stream's next chunk; raises what ended it if the loop failed it."""
    item = await stream.chunks.get()
    if isinstance(item, BaseException):
        raise item
    return item
