"""The decoder's side of planning through Redis, off the decoding path.

One background thread owns the Redis connection. Decode loops only touch in-memory state:
`submit` enqueues a PlanRequest (dropped, and counted, when the queue is full) and `poll`
returns the newest validated plan the thread has fetched. A stale, missing or untrustworthy
plan, or Redis being down, only means the decoder keeps the skip set it has.

A plan's version is reported, never trusted for ordering: the plan key holds the session's
newest plan (the planner overwrites it), so a plan is new when its bytes changed. A version
of 2^64-1 once pinned a session, and after a Redis restart (counters reset) a session the
decoder remembered at version 20 adopted none of the next 20 plans. Bytes seen once, adopted
or rejected, are not looked at again (a bad plan was re-rejected every poll).
"""

from __future__ import annotations

import collections
import hashlib
import queue
import threading
import time

import redis
import structlog

from clasp.plan_exchange import PlanInput
from clasp.planner import LayerPlan
from serving.plan_wire import PLAN_NOTIFY_CHANNEL, PLAN_REQUEST_STREAM, decode_plan, encode_plan_request, plan_key

log = structlog.get_logger("decoder.plan_bus")


class PlanBus:
    def __init__(self, client: redis.Redis, model: str, num_layers: int, stream_maxlen: int = 1000,
                 queue_size: int = 64, refresh_s: float = 0.05, max_plans: int = 10000, metrics=None) -> None:
        self.client = client
        self.model = model
        self.num_layers = num_layers
        self.stream_maxlen = stream_maxlen
        self.refresh_s = refresh_s
        self.metrics = metrics
        self._outbox: queue.Queue[dict[str, bytes]] = queue.Queue(maxsize=queue_size)  # stream entries
        self.max_plans = max_plans
        # session -> (sequence, version, plan), least recently updated first; bounded. The sequence
        # is this bus's own count of adoptions: what "newer" means to a request.
        self._plans: collections.OrderedDict[str, tuple[int, int, LayerPlan]] = collections.OrderedDict()
        self._digests: collections.OrderedDict[str, bytes] = collections.OrderedDict()  # last bytes looked at
        self._sequence = 0
        self._watched: dict[str, int] = {}  # session -> number of live requests
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="plan-bus", daemon=True)
        self.connected = False

    # ------------------------------------------------------------ decode-loop side (never blocks)
    def watch(self, session_id: str) -> None:
        with self._lock:
            self._watched[session_id] = self._watched.get(session_id, 0) + 1

    def unwatch(self, session_id: str) -> None:
        with self._lock:
            left = self._watched.get(session_id, 1) - 1
            if left <= 0:
                self._watched.pop(session_id, None)
            else:
                self._watched[session_id] = left

    def latest(self, session_id: str) -> tuple[int, int, LayerPlan] | None:
        """(sequence, version, plan) of the session's newest adopted plan."""
        with self._lock:
            return self._plans.get(session_id)

    def publish(self, session_id: str, request: PlanInput) -> None:
        try:
            self._outbox.put_nowait(encode_plan_request(session_id, self.model, request))
        except queue.Full:
            if self.metrics:
                self.metrics.plan_requests_dropped.inc()

    # ------------------------------------------------------------ background thread
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        pubsub = None
        backoff = 0.1
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(PLAN_NOTIFY_CHANNEL)
                    self._set_connected(True)
                self._flush_outbox()
                # A notification wakes us early; the periodic refresh is the fallback.
                pubsub.get_message(timeout=self.refresh_s)
                self._refresh_plans()
                backoff = 0.1
            except (redis.RedisError, OSError) as e:
                if self.connected:
                    log.warning("redis unavailable; keeping current plans", error=str(e))
                self._set_connected(False)
                pubsub = None
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)

    def _set_connected(self, value: bool) -> None:
        if value and not self.connected:
            log.info("redis connected")
        self.connected = value
        if self.metrics:
            self.metrics.redis_up.set(1 if value else 0)

    def _flush_outbox(self) -> None:
        while True:
            try:
                fields = self._outbox.get_nowait()
            except queue.Empty:
                return
            self.client.xadd(PLAN_REQUEST_STREAM, fields, maxlen=self.stream_maxlen, approximate=True)
            if self.metrics:
                self.metrics.plan_requests_published.inc()

    def _refresh_plans(self) -> None:
        with self._lock:
            sessions = list(self._watched)
        if not sessions:
            return
        values = self.client.mget([plan_key(s) for s in sessions])
        for session_id, raw in zip(sessions, values):
            if raw is None:
                continue
            digest = hashlib.blake2b(raw, digest_size=16).digest()
            if self._digests.get(session_id) == digest:
                continue  # looked at already (adopted or rejected)
            self._digests.pop(session_id, None)
            self._digests[session_id] = digest
            while len(self._digests) > self.max_plans:
                self._digests.popitem(last=False)
            try:
                stored = decode_plan(raw, session_id, self.model, self.num_layers)
            except Exception as e:  # malformed bytes or an untrustworthy plan (ValueError): never applied
                log.warning("rejected plan", session_id=session_id, error=str(e)[:200])
                if self.metrics:
                    self.metrics.plans_rejected.inc()
                continue
            with self._lock:
                self._sequence += 1
                self._plans.pop(session_id, None)
                self._plans[session_id] = (self._sequence, stored.version, stored.plan)
                while len(self._plans) > self.max_plans:
                    self._plans.popitem(last=False)
            if self.metrics:
                self.metrics.plan_age_s.observe(max(time.time() - stored.created_at, 0.0) if stored.created_at else 0.0)


class SessionExchange:
    """The clasp.plan_exchange.PlanExchange one request uses: non-blocking, through the bus."""

    def __init__(self, bus: PlanBus, session_id: str) -> None:
        self.bus = bus
        self.session_id = session_id
        current = bus.latest(session_id)
        self.seen = current[0] if current else 0  # the bus's sequence number of the newest plan seen
        self.versions: list[int] = []
        self.submitted = 0

    def initial_plan(self) -> LayerPlan | None:
        """The session's plan from an earlier request (warm start), if the bus has it."""
        current = self.bus.latest(self.session_id)
        if current is None:
            return None
        self.versions.append(current[1])
        return current[2]

    def submit(self, request: PlanInput) -> None:
        self.submitted += 1
        self.bus.publish(self.session_id, request)

    def poll(self) -> LayerPlan | None:
        current = self.bus.latest(self.session_id)
        if current is None or current[0] <= self.seen:
            return None
        self.seen = current[0]
        self.versions.append(current[1])
        return current[2]
