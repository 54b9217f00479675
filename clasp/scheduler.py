"""Continuous batching: many requests share every forward pass.

A `Scheduler` owns one slot KV cache ([slots, kv_heads, positions, head_dim] per layer) and the
requests decoding in it. Requests join and leave between rounds: `admit` gives a request a free
slot, `step` advances every admitted request by one round (clasp.decoding.step: one batched
draft call per draft position, one verification pass for all), and a finished or released
request frees its slot at once.

Memory is bounded by construction: the cache is allocated once for `num_slots` slots of
`slot_tokens` positions, so a request whose prompt plus max_new_tokens exceeds a slot is refused
(ValueError naming the field) and one that finds no free slot waits (the caller's queue).

Prefill: at most one request reads its prompt per step, in pieces of `prefill_chunk_tokens`, so a
long prompt holds the others for one piece at a time (docs/performance.md has the measured cost
of a piece).

Speculation and batch size: each request's controller chooses its own draft length from its own
acceptance, and the costs it sees are the batch's (the wall time of the round's batched draft and
verification). On top, BatchPolicy caps the draft length of the whole batch (down to none) by the
measured tokens per second of each cap at that batch size: as the batch grows and a plain step
already streams the weights for every request, drafts get shorter and stop where they no longer
pay, and come back where they do.
"""

from __future__ import annotations

import dataclasses
import time

from clasp.config import ClaspConfig, SamplingParams
from clasp.decoding import start_request, step
from clasp.output import Chunk
from clasp.plan_exchange import PlanExchange
from clasp.planner import LayerPlan
from clasp.request import Request

DEFAULT_SLOTS = 8
DEFAULT_SLOT_TOKENS = 2048
BATCH_PREFILL_CHUNK_TOKENS = 128  # prompt tokens per step while other requests are decoding


class BatchPolicy:
    """The batch's draft cap per round: at most how many tokens any request drafts (0: a plain step
    for all; None: as each request's own controller chooses), by measured tokens per second of
    steps at each batch size b >= 2 (b = 1 is left to the request's controller). Batch sizes share
    their figures within powers of two (2, 3-4, 5-8, 9-16, ...): a batch shrinks a stream at a time,
    and its neighbours cost about the same.

    On a memory-bound CPU a plain step for b requests costs little more than for one, while a
    drafted round costs b x (k + 1) verification rows and a draft pass per position, so the best
    cap falls as b grows: long drafts for two streams, short ones or none for eight. Caps are first
    measured in CAPS order, `warm_steps` times each, plain steps first and longer drafts after
    shorter ones; a cap that measures over `margin` below the best so far ends this warm-up (a longer
    one would cost more rows for the same acceptance). Then the best cap runs, and every `interval`
    steps the least recently tried other cap runs once: a try that does not win doubles the
    interval (up to max_interval, where exploring costs under 1% of the steps), one that wins
    resets it; to replace the cap in use, another must measure `margin` faster. Rates are decayed means (weight `decay` on the old value), so a change in the load
    or the acceptance moves the choice.
    """

    CAPS = (0, 1, 2, 4, None)  # warm-up order

    def __init__(self, warm_steps: int = 2, interval: int = 16, max_interval: int = 128, decay: float = 0.8,
                 margin: float = 0.1) -> None:
        self.warm_steps, self.base_interval, self.max_interval = warm_steps, interval, max_interval
        self.decay, self.margin = decay, margin
        self.rates: dict[tuple[int, int | None], float] = {}  # (bucket, cap) -> tokens per second per request
        self.counts: dict[tuple[int, int | None], int] = {}
        self.last_tried: dict[tuple[int, int | None], int] = {}
        self.steps: dict[int, int] = {}
        self.interval: dict[int, int] = {}
        self.warmed: set[int] = set()
        self.current: dict[int, int | None] = {}  # the cap in use per bucket
        self._exploring: dict[int, int | None] = {}

    @staticmethod
    def bucket(b: int) -> int:
        return 1 << (b - 1).bit_length()

    def best(self, b: int) -> int | None:
        """The cap in use at b's bucket: the fastest measured, except that another must beat the
        one in use by `margin` to replace it (one lucky step of a re-tried cap must not)."""
        g = self.bucket(b)
        fastest = max((c for c in self.CAPS if (g, c) in self.rates), key=lambda c: self.rates[(g, c)], default=None)
        current = self.current.get(g, "none")
        if current != "none" and fastest != current and (g, current) in self.rates:
            if self.rates[(g, fastest)] < (1 + self.margin) * self.rates[(g, current)]:
                return current
        self.current[g] = fastest
        return fastest

    def cap(self, b: int) -> int | None:
        """The draft cap for the next step of a batch of b decoding requests."""
        if b < 2:
            return None
        g = self.bucket(b)
        n = self.steps[g] = self.steps.get(g, 0) + 1
        if g not in self.warmed:
            cap = self._warming(g)
            if cap != "done":
                return cap
            self.warmed.add(g)
        interval = self.interval.setdefault(g, self.base_interval)
        best = self.best(b)
        if n % interval == 0:
            others = [c for c in self.CAPS if c != best]
            cap = min(others, key=lambda c: self.last_tried.get((g, c), 0))
            self._exploring[g] = cap
            return cap
        return best

    def _warming(self, g: int):
        """The next cap to measure in the warm-up of bucket g, or "done"."""
        best_rate = 0.0
        for cap in self.CAPS:
            count = self.counts.get((g, cap), 0)
            if count < self.warm_steps:
                return cap
            rate = self.rates[(g, cap)]
            if rate < (1 - self.margin) * best_rate:
                return "done"  # longer drafts than this one would not pay here either
            best_rate = max(best_rate, rate)
        return "done"

    def observe(self, b: int, cap: int | None, tokens: int, seconds: float) -> None:
        if b < 2 or seconds <= 0:
            return
        g = self.bucket(b)
        key = (g, cap)
        rate, old = tokens / seconds / b, self.rates.get(key)  # per request: sizes within a bucket compare
        self.rates[key] = rate if old is None else self.decay * old + (1 - self.decay) * rate
        self.counts[key] = self.counts.get(key, 0) + 1
        self.last_tried[key] = self.steps.get(g, 0)
        if g in self._exploring and self._exploring[g] == cap:
            del self._exploring[g]
            won = self.best(b) == cap
            self.interval[g] = self.base_interval if won else min(2 * self.interval[g], self.max_interval)


class Scheduler:
    def __init__(self, engine, num_slots: int = DEFAULT_SLOTS, slot_tokens: int = DEFAULT_SLOT_TOKENS,
                 prefill_chunk_tokens: int = BATCH_PREFILL_CHUNK_TOKENS) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if slot_tokens < 2:
            raise ValueError(f"slot_tokens must be >= 2, got {slot_tokens}")
        if prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be >= 1, got {prefill_chunk_tokens}")
        self.engine = engine
        runner = engine.runner
        self.slot_tokens = min(slot_tokens, runner.spec.max_context)
        self.cache = runner.new_cache(self.slot_tokens, num_slots)
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.free = list(range(num_slots - 1, -1, -1))  # pop() gives slot 0 first
        self.active: list[Request] = []
        self.policy = BatchPolicy()

    @property
    def num_slots(self) -> int:
        return self.cache.num_slots

    @property
    def kv_nbytes(self) -> int:
        return self.cache.nbytes()

    def has_free_slot(self) -> bool:
        return bool(self.free)

    def check_fits(self, num_prompt_tokens: int) -> None:
        """ValueError naming the field if a prompt cannot fit a slot with at least one new token."""
        if num_prompt_tokens >= self.slot_tokens:
            raise ValueError(f"prompt: {num_prompt_tokens} tokens do not fit a decoding slot of {self.slot_tokens} "
                             f"positions (prompt plus at least one new token)")

    def admit(self, prompt_ids: list[int], params: SamplingParams, config: ClaspConfig,
              initial_plan: LayerPlan | None = None, plan_exchange: PlanExchange | None = None) -> Request:
        """Start a request in a free slot. max_new_tokens is clipped to what the slot holds after the
        prompt. Raises ValueError for a prompt that cannot fit, RuntimeError without a free slot."""
        self.check_fits(len(prompt_ids))
        if not self.free:
            raise RuntimeError("no free decoding slot")
        room = self.slot_tokens - len(prompt_ids)
        if params.max_new_tokens > room:
            params = dataclasses.replace(params, max_new_tokens=room)
        # While others decode, a prompt is read in smaller pieces (each step holds them for one piece).
        if config.prefill_chunk_tokens > self.prefill_chunk_tokens:
            config = dataclasses.replace(config, prefill_chunk_tokens=self.prefill_chunk_tokens)
        slot = self.free.pop()
        try:
            req = start_request(self.engine.runner, self.engine.tokenizer, prompt_ids, params, config,
                                self.engine.eos_ids, initial_plan, plan_exchange, cache=self.cache, slot=slot)
        except BaseException:
            self.free.append(slot)
            raise
        self.active.append(req)
        return req

    def release(self, req: Request) -> None:
        """Take a request out (finished, aborted or cancelled) and free its slot."""
        if req in self.active:
            self.active.remove(req)
            self.free.append(req.slot)

    def step(self) -> list[tuple[Request, Chunk]]:
        """One round for every active request (at most one of them reading its prompt); finished
        requests are released. Returns (request, chunk) for each request that ran."""
        running, prefilling = [], False
        for req in self.active:
            if req.prefilling:
                if prefilling:
                    continue  # one prompt at a time: the others' rounds are not held longer
                prefilling = True
            running.append(req)
        decoding = sum(not r.prefilling for r in running)
        # Only where some request may draft does the cap matter: plain-decoding (ar) batches must not
        # teach the policy that a cap costs what a plain step does.
        may_draft = any(not r.prefilling and r.draft_budget > 0 for r in running)
        cap = self.policy.cap(decoding) if may_draft else None
        started = time.perf_counter()
        chunks = step(self.engine.runner, running, cap)
        if may_draft and not prefilling:  # a prefill piece in the step would blur the comparison
            self.policy.observe(decoding, cap, sum(len(c.token_ids) for c in chunks), time.perf_counter() - started)
        for req in running:
            if req.finished:
                self.release(req)
        return list(zip(running, chunks))
