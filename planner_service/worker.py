"""The planner's work loop: read re-plan requests from the Redis stream, plan, write plans.

Requests come through a consumer group, so several planners share the work and a crashed
planner's unacknowledged entries are claimed by another after `claim_idle_s`. Only a
session's newest pending request is planned; older ones are acknowledged unplanned.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import redis
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from planner_service.contexts import SessionContexts
from serving.plan_wire import (PLAN_NOTIFY_CHANNEL, PLAN_REQUEST_STREAM, PLANNER_GROUP, PlanRequestEntry,
                               decode_plan_request, encode_plan, plan_key, plan_version_key)

log = structlog.get_logger("planner")


class PlannerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.plans = Counter("clasp_planner_plans", "Plans written", registry=registry)
        self.rejected = Counter("clasp_planner_rejected", "Requests rejected (malformed, other model)", registry=registry)
        self.superseded = Counter("clasp_planner_superseded", "Requests skipped for a newer one", registry=registry)
        self.plan_seconds = Histogram("clasp_planner_plan_seconds", "DP time per plan (context rebuild included)",
                                      buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2), registry=registry)
        self.sessions = Gauge("clasp_planner_sessions", "Session contexts held", registry=registry)
        self.redis_up = Gauge("clasp_planner_redis_up", "1 when Redis works", registry=registry)


class PlannerWorker:
    def __init__(self, client: redis.Redis, contexts: SessionContexts, model: str, consumer: str,
                 metrics: PlannerMetrics, plan_ttl_s: int = 3600, claim_idle_s: float = 30.0,
                 batch: int = 16, prune_idle_s: float = 120.0) -> None:
        self.client = client
        self.contexts = contexts
        self.model = model
        self.num_layers = contexts.runner.spec.num_layers
        self.consumer = consumer
        self.metrics = metrics
        self.plan_ttl_s = plan_ttl_s
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.batch = batch
        # Consumers of the group idle this long with nothing pending are dead planners (a restart
        # gets a new name): removed, so the group lists only live ones.
        self.prune_idle_ms = int(prune_idle_s * 1000)
        self._next_prune = 0.0
        self._stop = threading.Event()
        self._done: concurrent.futures.Future | None = None

    def start(self, executor: concurrent.futures.Executor) -> None:
        """Run the loop on `executor`: pass the one-thread executor that loaded the model, so
        all torch work of the process stays on one thread (one OpenMP team; see serving.service)."""
        self._done = executor.submit(self._run)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Take no new requests; wait up to `timeout_s` for the plan in progress."""
        self._stop.set()
        if self._done is not None:
            concurrent.futures.wait([self._done], timeout=timeout_s)

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            try:
                self._ensure_group()
                self.metrics.redis_up.set(1)
                self._process(self._claim_stale() or self._read())
                if time.monotonic() >= self._next_prune:
                    self._next_prune = time.monotonic() + min(self.prune_idle_ms / 1000, 60.0)
                    self.prune_consumers()
                backoff = 0.1
            except (redis.RedisError, OSError) as e:
                self.metrics.redis_up.set(0)
                log.warning("redis unavailable", error=str(e))
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            except Exception:  # a bug must not silently end the work loop
                log.exception("planner loop error")
                self._stop.wait(1.0)

    def _ensure_group(self) -> None:
        try:
            self.client.xgroup_create(PLAN_REQUEST_STREAM, PLANNER_GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def _read(self) -> list:
        reply = self.client.xreadgroup(PLANNER_GROUP, self.consumer, {PLAN_REQUEST_STREAM: ">"}, count=self.batch,
                                       block=500)
        return reply[0][1] if reply else []

    def prune_consumers(self) -> list[str]:
        """Delete the group's consumers (other than this one) idle past prune_idle_s with no pending entries."""
        removed = []
        for consumer in self.client.xinfo_consumers(PLAN_REQUEST_STREAM, PLANNER_GROUP):
            name = consumer["name"].decode() if isinstance(consumer["name"], bytes) else consumer["name"]
            if name != self.consumer and consumer["pending"] == 0 and consumer["idle"] >= self.prune_idle_ms:
                self.client.xgroup_delconsumer(PLAN_REQUEST_STREAM, PLANNER_GROUP, name)
                removed.append(name)
        if removed:
            log.info("removed dead consumers", consumers=removed)
        return removed

    def _claim_stale(self) -> list:
        """Entries another planner read but never acknowledged (it crashed)."""
        reply = self.client.xautoclaim(PLAN_REQUEST_STREAM, PLANNER_GROUP, self.consumer,
                                       min_idle_time=self.claim_idle_ms, count=self.batch)
        return [e for e in reply[1] if e[1]]  # Redis 6.2 replies with 2 fields, 7 with 3

    def _process(self, entries: list) -> None:
        """Plan each session's newest request, then acknowledge the whole batch, whatever happened:
        a request that fails is rejected once, never re-delivered (a poison pill used to be claimed
        again every claim_idle_s, forever), and never keeps the batch's other requests from planning."""
        newest: dict[str, tuple[PlanRequestEntry, bytes]] = {}
        done = [entry_id for entry_id, _ in entries]
        try:
            for entry_id, fields in entries:
                try:
                    entry = decode_plan_request(fields)
                except Exception as e:  # ValueError naming the field; anything else is a bug, still rejected once
                    self.metrics.rejected.inc()
                    log.warning("malformed plan request", entry=entry_id, error=str(e)[:200])
                    continue
                if entry.session_id in newest:
                    self.metrics.superseded.inc()
                newest[entry.session_id] = (entry, entry_id)
            for session_id, (entry, entry_id) in newest.items():
                if self._stop.is_set():  # stopping: leave it unacknowledged for another planner
                    done.remove(entry_id)
                    continue
                try:
                    self._plan_one(entry)
                except (redis.RedisError, OSError):
                    raise  # Redis down: the acknowledgement fails too, and the batch is claimed again later
                except Exception as e:  # a bad request must not end in an unacknowledged batch
                    self.metrics.rejected.inc()
                    log.warning("plan request failed", session_id=session_id, error=type(e).__name__,
                                detail=str(e)[:200])
        finally:
            if done:
                try:
                    self.client.xack(PLAN_REQUEST_STREAM, PLANNER_GROUP, *done)
                except (redis.RedisError, OSError):
                    pass  # re-delivered after claim_idle_s; planning again is harmless

    def _plan_one(self, entry: PlanRequestEntry) -> None:
        session_id = entry.session_id
        log_ = log.bind(session_id=session_id, step=entry.request.step)
        if entry.model != self.model:
            self.metrics.rejected.inc()
            log_.warning("plan request for another model", model=entry.model, expected=self.model)
            return
        started = time.perf_counter()
        try:
            plan = self.contexts.plan(session_id, entry.request)
        except ValueError as e:
            self.metrics.rejected.inc()
            log_.warning("bad plan request", error=str(e))
            return
        seconds = time.perf_counter() - started
        self.metrics.plan_seconds.observe(seconds)
        self.metrics.sessions.set(len(self.contexts))
        version = self.client.incr(plan_version_key(session_id))
        self.client.expire(plan_version_key(session_id), self.plan_ttl_s)
        stored = encode_plan(plan, session_id, version, self.model, self.num_layers, seconds)
        self.client.set(plan_key(session_id), stored, ex=self.plan_ttl_s)
        self.client.publish(PLAN_NOTIFY_CHANNEL, session_id)
        self.metrics.plans.inc()
        log_.info("plan written", version=version, seconds=round(seconds, 4),
                  skip_set=sorted(plan.skip_sets[-1]), score=round(plan.scores[-1], 4))
