"""Continuous batching: many requests share every forward pass.

A `Scheduler` owns one slot KV cache ([slots, kv_heads, positions, head_dim] per layer) and the
requests decoding in it. Requests join and leave between rounds: `admit` gives a request a free
slot, `step` advances every admitted request by one round (clasp.decoding.step: one batched
draft call per draft position, one verification pass for all), and a finished or released
request frees its slot at once.

Memory is bounded by construction: the cache is allocated once for `num_slots` slots of
`slot_tokens` positions, so a request whose prompt plus max_new_tokens exceeds a slot is refused
(ValueError naming the field) and one that finds no free slot waits (the caller's queue).

Prefill: at most one request reads its prompt per step, in pieces of `prefill_chunk_tokens` while
others decode, so a long prompt holds them for one piece at a time (docs/performance.md has the
measured cost of a piece), and in the request's own larger pieces when nobody else decodes.

Speculation and batch size: each request's controller chooses its source and skip count and a
draft length as it would alone; BatchPlanner then cuts the lengths (down to none) to the most
expected tokens per second of the whole round, from each request's measured acceptance and the
batch's measured draft and verification costs: as the batch grows and a plain step already streams
the weights for every request, drafts get shorter and stop where they no longer pay, and come
back where they do.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from clasp.config import ClaspConfig, SamplingParams
from clasp.controller import MODEL, NGRAM, PLAIN, RoundChoice, VerifyCost
from clasp.decoding import start_request, step
from clasp.output import Chunk
from clasp.plan_exchange import PlanExchange
from clasp.planner import LayerPlan
from clasp.request import Request

DEFAULT_SLOTS = 8
DEFAULT_SLOT_TOKENS = 2048
BATCH_PREFILL_CHUNK_TOKENS = 128  # prompt tokens per step while other requests are decoding


class DraftCost:
    """Seconds of a round's batched layer-skip draft as a * calls + c * rows: one call per draft
    position (every request still drafting at that position is a row of it), fitted by decayed
    least squares over the rounds seen. On a memory-bound CPU a call reads the draft weights once
    for all its rows, so a is most of it; a GPU sees much the same."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.s_cc = self.s_cr = self.s_rr = self.s_cy = self.s_ry = 0.0

    def observe(self, calls: int, rows: int, seconds: float) -> None:
        d = self.decay
        self.s_cc, self.s_cr, self.s_rr = d * self.s_cc + calls * calls, d * self.s_cr + calls * rows, d * self.s_rr + rows * rows
        self.s_cy, self.s_ry = d * self.s_cy + calls * seconds, d * self.s_ry + rows * seconds

    @property
    def known(self) -> bool:
        return self.s_cc > 0

    def coefficients(self) -> tuple[float, float]:
        """(seconds per call, seconds per row), both >= 0."""
        det = self.s_cc * self.s_rr - self.s_cr ** 2
        if det > 1e-9 * self.s_cc * self.s_rr:
            a = (self.s_cy * self.s_rr - self.s_ry * self.s_cr) / det
            c = (self.s_ry * self.s_cc - self.s_cy * self.s_cr) / det
            if a >= 0 and c >= 0:
                return a, c
        return self.s_cy / self.s_cc, 0.0  # rows and calls in one ratio so far (or a bad fit): per call

    def cost(self, calls: int, rows: int) -> float:
        a, c = self.coefficients()
        return a * calls + c * rows


class BatchPlanner:
    """Each round's draft lengths for a batch of two or more decoding requests, from measured costs
    at that batch: the round's expected tokens over its expected seconds, maximized.

    Every request's own controller first chooses as it would alone (source, skip count, and a
    length up to its budget). The planner then cuts each length to k_i (0: a plain step for that
    request) to maximize

        sum_i E_i(k_i) / (draft(calls = max k_i, rows = sum k_i) + verify(sum_i (k_i + 1) rows))

    where E_i(k) = 1 + sum_{m<=k} P(drafts 1..m of request i accepted), from the acceptance its
    controller has measured for that source and skip count; draft() and verify() are the batch's
    own measured costs (DraftCost over the model drafters' rows; clasp.controller.VerifyCost by the
    pass's total rows). n-gram drafts cost verification rows only. As a batch grows, a plain step
    already streams the weights for every request while each drafted token adds a row: lengths
    fall, to none where they no longer pay, and come back where acceptance makes them pay.

    The search: the best common cap (k_i = min(cap, length_i)), then single-token moves
    (lengthen or shorten one request) while the rate improves. Until the costs are measured, the
    requests' own choices run unchanged (and are measured). A request that samples with a seed
    keeps its own choice (its controller uses fixed costs, so the same seed draws the same tokens
    whatever the batch); its rows still count in the costs.
    """

    def __init__(self, decay: float = 0.9, max_moves: int = 64) -> None:
        self.draft = DraftCost(decay)
        self.verify = VerifyCost(decay)
        self.max_moves = max_moves
        self.rounds = 0  # rounds planned (for metrics and tests)
        self.cut = 0  # drafted tokens the plans removed

    def ready(self) -> bool:
        return self.draft.known and self.verify.known

    def plan(self, reqs: Sequence[Request], choices: Sequence[RoundChoice]) -> None:
        """Cut each request's chosen draft length (choices[i], what reqs[i] chose) in place."""
        if len(reqs) < 2 or not self.ready():
            return
        lengths, curves, fixed, model = [], [], [], []
        for req, choice in zip(reqs, choices):
            curve = _curve(req, choice)
            lengths.append(len(curve))
            curves.append(curve)
            fixed.append(req.params.seed is not None and not req.params.greedy or req.controller is None)
            model.append(choice.source == MODEL)
        if not any(n and not f for n, f in zip(lengths, fixed)):
            return
        gains = [[1.0] + [1.0 + sum(c[:m]) for m in range(1, len(c) + 1)] for c in curves]  # E_i(k), k = 0..len

        def rate(ks: list[int]) -> float:
            drafted = [k for k, m in zip(ks, model) if m]
            seconds = (self.draft.cost(max(drafted), sum(drafted)) if drafted and max(drafted) else 0.0)
            seconds += self.verify.cost(sum(ks) + len(ks))
            return sum(g[k] for g, k in zip(gains, ks)) / max(seconds, 1e-9)

        def clip(cap: int) -> list[int]:
            return [n if f else min(cap, n) for n, f in zip(lengths, fixed)]

        best = max((clip(cap) for cap in range(max(lengths) + 1)), key=rate)
        best_rate = rate(best)
        for _ in range(self.max_moves):
            moves = []
            for i, (k, n, f) in enumerate(zip(best, lengths, fixed)):
                if f:
                    continue
                for step in (1, -1):
                    if 0 <= k + step <= n:
                        ks = list(best)
                        ks[i] = k + step
                        moves.append(ks)
            if not moves:
                break
            candidate = max(moves, key=rate)
            r = rate(candidate)
            if r <= best_rate * (1 + 1e-9):
                break
            best, best_rate = candidate, r
        self.rounds += 1
        for choice, k, n in zip(choices, best, lengths):
            if k < n:
                self.cut += n - k
                _cut(choice, k)

    def observe(self, proposals_lengths: Sequence[int], model: Sequence[bool], draft_seconds: float,
                verify_rows: int, verify_seconds: float) -> None:
        """A batched round's measured costs (lengths of what each request drafted)."""
        drafted = [n for n, m in zip(proposals_lengths, model) if m and n]
        if drafted:
            self.draft.observe(max(drafted), sum(drafted), draft_seconds)
        self.verify.observe(verify_rows, verify_seconds)


def _curve(req: Request, choice: RoundChoice) -> list[float]:
    """[P(drafts 1..m accepted) for m = 1..the chosen length] of the request's choice ([] if it drafts nothing)."""
    if choice.num_draft <= 0 or choice.source == PLAIN or req.controller is None:
        return [] if choice.num_draft <= 0 or choice.source == PLAIN else [0.0] * choice.num_draft
    controller = req.controller
    if choice.source == NGRAM:
        return controller.ngram.cumulative(min(choice.num_draft, len(choice.ngram)))
    j = controller.skip_counts[0] if choice.num_skip is None else choice.num_skip
    return controller.models[j].cumulative(choice.num_draft)


def _cut(choice: RoundChoice, k: int) -> None:
    """Draft at most k tokens (none: a plain step)."""
    choice.num_draft = k
    choice.ngram = choice.ngram[:k]
    if k == 0:
        choice.source = PLAIN


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
        self.planner = BatchPlanner()

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
        running, prefilling = [], None
        for req in self.active:
            if req.prefilling:
                if prefilling is not None:
                    continue  # one prompt at a time: the others' rounds are not held longer
                prefilling = req
            running.append(req)
        if prefilling is not None:
            # While others decode, the prompt is read in smaller pieces (each step holds them for one
            # piece); with nobody decoding, in the request's own (larger, cheaper per token) pieces.
            others_decode = any(not r.prefilling for r in running)
            own = prefilling.config.prefill_chunk_tokens
            prefilling.piece_tokens = min(own, self.prefill_chunk_tokens) if others_decode else own
        chunks = step(self.engine.runner, running, self.planner)
        for req in running:
            if req.finished:
                self.release(req)
        return list(zip(running, chunks))
