"""The decoder's engine loop: every admitted stream decodes in one batch (clasp.scheduler).

One asyncio task drives the scheduler on the process's torch thread: between steps it admits
newcomers into free slots and drops streams that were aborted or cancelled, then runs one step
for all of them and hands each stream its chunk through the stream's own queue. A stream's
handler only awaits its queue, so a client that reads slowly holds back nobody: its chunks wait
in its queue (at most one per round of its own generation, which max_new_tokens bounds) while
gRPC flow control stops the writes.
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
        self.joining: collections.deque[Stream] = collections.deque()
        self.running: dict[int, Stream] = {}  # id(request) -> stream
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batch-loop")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def submit(self, stream: Stream) -> None:
        """Queue a stream to join at the next round boundary (the caller holds a slot permit)."""
        self.joining.append(stream)
        self._wake.set()

    def cancel(self, stream: Stream) -> None:
        """The stream leaves at the next round boundary (its slot is freed there)."""
        stream.cancelled = True
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.joining and not self.running:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._drop_cancelled()
            await self._admit(loop)
            if not self.running:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self.scheduler.step)
            except Exception as e:  # a failed step fails the streams in it, not the process
                log.exception("decoding step failed", streams=len(self.running))
                for stream in list(self.running.values()):
                    self._finish(stream, e)
                continue
            for req, chunk in results:
                stream = self.running.get(id(req))
                if stream is None:
                    continue
                stream.chunks.put_nowait(chunk)
                if chunk.result is not None:
                    del self.running[id(req)]
            if self.metrics is not None:
                self.metrics.batch_size.observe(len(results))

    def _drop_cancelled(self) -> None:
        for key, stream in list(self.running.items()):
            if stream.cancelled:
                self.scheduler.release(stream.request)
                del self.running[key]
        self.joining = collections.deque(s for s in self.joining if not s.cancelled)

    async def _admit(self, loop) -> None:
        while self.joining and self.scheduler.has_free_slot():
            stream = self.joining.popleft()
            try:
                # On the torch thread: starting a request touches torch (its generator, its slot).
                stream.request = await loop.run_in_executor(
                    self.executor, self.scheduler.admit, stream.prompt_ids, stream.params, stream.config,
                    stream.initial_plan, stream.exchange)
            except Exception as e:  # ValueError: the request cannot run (e.g. its prompt does not fit a slot)
                stream.chunks.put_nowait(e)
                continue
            if stream.cancelled:
                self.scheduler.release(stream.request)
                continue
            self.running[id(stream.request)] = stream

    def _finish(self, stream: Stream, error: BaseException) -> None:
        self.scheduler.release(stream.request)
        self.running.pop(id(stream.request), None)
        stream.chunks.put_nowait(error)


async def next_chunk(stream: Stream) -> Chunk:
    """The stream's next chunk; raises what ended it if the loop failed it."""
    item = await stream.chunks.get()
    if isinstance(item, BaseException):
        raise item
    return item
