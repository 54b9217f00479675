"""The decode loop: prefill, draft, verify, and the self-speculative step around them.

A round drafts up to K tokens with the layer-skipped draft, verifies them in one full
forward pass, keeps the accepted prefix plus one resampled/bonus token (see clasp.verify),
and rolls the KV cache back to what was accepted. `ar` mode is the same loop with K = 0.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator

import torch

from clasp.config import ClaspConfig, SamplingParams
from clasp.controller import MODEL, NGRAM, PLAIN, DraftController, NgramIndex, RoundChoice
from clasp.kv_cache import KVCache
from clasp.model_runner import ModelRunner, nbytes
from clasp.plan_exchange import LocalPlanner, PlanExchange, PlanInput
from clasp.planner import LayerPlan
from clasp.stats import DecodeStats
from clasp.verify import logits_to_probs, rejection_sample, sample, verify_greedy


@dataclasses.dataclass
class Proposal:
    token_ids: torch.Tensor  # [K] int64, drafted tokens
    probs: torch.Tensor | None  # [K, vocab], the draft's warped distributions (sampling only)


@dataclasses.dataclass
class RoundResult:
    accepted_length: int  # tau
    next_token_id: int  # the resampled or bonus token
    hidden: torch.Tensor | None  # [L+1, hidden], full-model states of the last accepted token
    hidden_position: int  # that token's position
    num_drafted: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0


@dataclasses.dataclass
class PlanRecord:
    step: int  # the verification round the skip set was first used at
    skip_set: list[int]
    score: float | None  # the DP's cos(g[L][M], h_L); None for static sets
    seconds: float


@dataclasses.dataclass
class Chunk:
    """What one round adds to the output; the final chunk carries the result."""

    token_ids: list[int]
    text: str
    result: "GenerationResult | None" = None


@dataclasses.dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # stop (EOS), length, stop_string
    num_prompt_tokens: int
    stats: DecodeStats
    plans: list[PlanRecord]
    seconds: float

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_generated_tokens": len(self.token_ids),
            "accepted_lengths": self.stats.accepted_lengths,
            "plans": [dataclasses.asdict(p) for p in self.plans],
            "seconds": self.seconds,
            "tokens_per_second": len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0,
            "stats": self.stats.to_dict(),
        }


# ---------------------------------------------------------------------- steps
def prefill(runner: ModelRunner, cache: KVCache, prompt_ids: torch.Tensor, collect_hidden: bool, start: int = 0):
    """Run prompt_ids[start:] at positions start.. (the cache holds the rest). Returns (last-position
    logits [1, vocab], h_0..h_L of the last prompt token or None)."""
    hidden = [] if collect_hidden else None
    logits = runner.forward(prompt_ids[start:], cache, start, last_only=True, hidden_states=hidden)
    return logits, (torch.stack([h[-1] for h in hidden]) if collect_hidden else None)


def chunked_prefill(runner: ModelRunner, cache: KVCache, prompt_ids: torch.Tensor, collect_hidden: bool,
                    chunk_tokens: int) -> Iterator[Chunk]:
    """prefill in pieces of at most chunk_tokens, yielding an empty Chunk between pieces (so a
    caller sharing one torch thread can run other requests' rounds); returns prefill's result."""
    start = 0
    while len(prompt_ids) - start > chunk_tokens:
        runner.forward(prompt_ids[start:start + chunk_tokens], cache, start, last_only=True)
        start += chunk_tokens
        yield Chunk([], "")
    return prefill(runner, cache, prompt_ids, collect_hidden, start)


def select_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The full model's choice from logits [1, vocab]."""
    if params.greedy:
        return int(logits[0].argmax())
    return int(sample(logits_to_probs(logits, params), generator)[0])


def draft(runner: ModelRunner, cache: KVCache, token_id: int, position: int, skip_set: frozenset[int],
          max_tokens: int, exit_threshold: float, params: SamplingParams,
          generator: torch.Generator | None, use_copy: bool = True) -> Proposal:
    """Draft up to max_tokens tokens after token_id (at `position`) with the layer-skipped model.

    Stops early once the draft's top probability falls below exit_threshold (the token that
    fell below is still proposed: verifying it costs one row, and it is often right).
    use_copy: run on the runner's reduced-precision draft weights (if it has them).
    """
    device = runner.device
    current = torch.tensor([token_id], device=device)
    drafted, probs = [], []
    for k in range(max_tokens):
        logits = runner.forward(current, cache, position + k, skip_set, draft=use_copy)  # [1, vocab]
        if params.greedy:
            confidence, current = torch.softmax(logits, dim=-1).max(dim=-1)
        else:
            q = logits_to_probs(logits, params)
            current = sample(q, generator)
            confidence = q.max()
            probs.append(q[0])
        drafted.append(current)
        # The exit decision is a host branch: one scalar read per drafted token. NaN stops too.
        if not float(confidence) >= exit_threshold:
            break
    return Proposal(torch.cat(drafted), torch.stack(probs) if probs else None)


def verify(runner: ModelRunner, cache: KVCache, token_id: int, position: int, proposal: Proposal | None,
           params: SamplingParams, generator: torch.Generator | None, collect_hidden: bool) -> RoundResult:
    """Run the full model over [token_id, drafts...] in one pass, accept, and roll the cache back."""
    pending = torch.tensor([token_id], device=runner.device)
    inputs = pending if proposal is None else torch.cat([pending, proposal.token_ids])
    hidden = [] if collect_hidden else None
    logits = runner.forward(inputs, cache, position, hidden_states=hidden)  # [K+1, vocab]
    if proposal is None:
        tau, next_id = 0, select_token(logits, params, generator)
    elif params.greedy:
        tau, next_id = verify_greedy(proposal.token_ids.tolist(), logits)
    else:
        tau, next_id = rejection_sample(proposal.token_ids, proposal.probs, logits_to_probs(logits, params), generator)
    cache.truncate(position + tau + 1)  # keep the pending token and the accepted drafts
    states = torch.stack([h[tau] for h in hidden]) if collect_hidden else None
    return RoundResult(tau, next_id, states, position + tau)


# ---------------------------------------------------------------------- the loop
class _Output:
    """Accumulates emitted tokens and applies EOS, max-token and stop-string limits."""

    def __init__(self, tokenizer, params: SamplingParams, eos_ids: frozenset[int], max_new_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.eos_ids = frozenset() if params.ignore_eos else eos_ids
        self.max_new_tokens = max_new_tokens
        self.token_ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of text already streamed
        self.finish_reason: str | None = None
        self._hold = max((len(s) for s in params.stop), default=1) - 1
        self._prefix = 0  # detokenization window: tokens [_prefix, _read) are already in text
        self._read = 0

    def add(self, new_ids: list[int]) -> Chunk:
        before = len(self.token_ids)
        for t in new_ids:
            self.token_ids.append(t)
            if t in self.eos_ids:
                self.finish_reason = "stop"
                break
            if len(self.token_ids) >= self.max_new_tokens:
                self.finish_reason = "length"
                break
        previous = len(self.text)
        self._detokenize()
        cuts = [c for stop in self.params.stop if (c := self.text.find(stop, max(0, previous - len(stop) + 1))) >= 0]
        if cuts:
            self.text, self.finish_reason = self.text[:min(cuts)], "stop_string"
            self._trim_to_stop(before)
        # Hold back what could be the start of a stop string.
        end = len(self.text) if self.finish_reason else max(self.sent, len(self.text) - self._hold)
        delta, self.sent = self.text[self.sent:end], end
        return Chunk(self.token_ids[before:], delta)

    def _detokenize(self) -> None:
        """Append the new tokens' text, decoding a short window instead of the whole output.

        The window starts a few tokens back so that merges and leading spaces decode as they
        would in context. Text ending in a partial UTF-8 character waits for the next tokens.
        """
        window = self.token_ids[self._prefix:]
        known = self.tokenizer.decode(window[:self._read - self._prefix], skip_special_tokens=True)
        full = self.tokenizer.decode(window, skip_special_tokens=True)
        if full.endswith("\ufffd") and self.finish_reason is None:
            return
        self.text += full[len(known):]
        self._prefix, self._read = self._read, len(self.token_ids)

    def _trim_to_stop(self, first_new: int) -> None:
        """Drop the tokens after the one that completed a stop string (once, at the end)."""
        for n in range(first_new + 1, len(self.token_ids) + 1):
            text = self.tokenizer.decode(self.token_ids[:n], skip_special_tokens=True)
            if any(stop in text for stop in self.params.stop):
                del self.token_ids[n:]
                return


def context_proposal(token_ids: list[int], params: SamplingParams, vocab_size: int, device) -> Proposal:
    """A draft taken from the context (n-gram lookup): its distribution is one-hot, so rejection
    sampling accepts token x with probability p(x) and resamples from p with x removed."""
    ids = torch.tensor(token_ids, device=device)
    probs = None
    if not params.greedy:
        probs = torch.zeros(len(token_ids), vocab_size, device=device).scatter_(1, ids[:, None], 1.0)
    return Proposal(ids, probs)


def self_speculative_step(runner: ModelRunner, cache: KVCache, token_id: int, position: int,
                          skip_set: frozenset[int], choice: RoundChoice, config: ClaspConfig, params: SamplingParams,
                          generator: torch.Generator | None, stats: DecodeStats,
                          collect_hidden: bool) -> tuple[list[int], RoundResult]:
    """One round: draft as `choice` says (up to choice.num_draft tokens from the layer-skip model,
    the given n-gram continuation, or nothing: a plain step), verify, accept. Returns the emitted
    token ids (accepted drafts + the resampled/bonus token) and the round's result."""
    t0 = time.perf_counter()
    proposal = None
    if choice.source == NGRAM:
        proposal = context_proposal(choice.ngram, params, runner.spec.vocab_size, runner.device)
    elif choice.source == MODEL and choice.num_draft > 0:
        proposal = draft(runner, cache, token_id, position, skip_set, choice.num_draft, config.draft_exit_threshold,
                         params, generator, use_copy=config.draft_dtype is not None)
    t1 = time.perf_counter()
    result = verify(runner, cache, token_id, position, proposal, params, generator, collect_hidden)
    result.draft_seconds, result.verify_seconds = t1 - t0, time.perf_counter() - t1
    stats.draft_seconds += result.draft_seconds
    stats.verify_seconds += result.verify_seconds
    drafted = [] if proposal is None else proposal.token_ids.tolist()
    result.num_drafted = len(drafted)
    stats.observe_round(len(drafted), result.accepted_length)
    if choice.source == NGRAM:
        stats.num_ngram_drafts += 1
        stats.num_ngram_draft_tokens += len(drafted)
        stats.num_ngram_accepted_tokens += result.accepted_length
    elif not drafted:
        stats.num_plain_rounds += 1
    else:
        stats.num_model_draft_tokens += len(drafted)
        stats.num_skipped_layers_drafted += len(skip_set) * len(drafted)
    return drafted[:result.accepted_length] + [result.next_token_id], result


def _adopt(plan: LayerPlan, num_skip: int, step: int, plans: list[PlanRecord], skip_sets: SkipSets) -> frozenset[int]:
    """Use a DP plan; record it when it changes the skip set (of M layers)."""
    skip_sets.plan = plan
    skip_set = plan.skip_set(num_skip)
    if not plans or plans[-1].skip_set != sorted(skip_set):
        plans.append(PlanRecord(step, sorted(skip_set), plan.score(num_skip), plan.seconds))
    return skip_set


def _check_prompt(prompt_ids: list[int], spec) -> None:
    if not prompt_ids:
        raise ValueError("prompt is empty: it must contain at least one token")
    if len(prompt_ids) >= spec.max_context:
        raise ValueError(f"prompt has {len(prompt_ids)} tokens, the context window is {spec.max_context}")
    if min(prompt_ids) < 0 or max(prompt_ids) >= spec.vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {spec.vocab_size})")


def generate(runner: ModelRunner, tokenizer, prompt_ids: list[int], params: SamplingParams, config: ClaspConfig,
             eos_ids: frozenset[int], initial_plan: LayerPlan | None = None,
             plan_exchange: PlanExchange | None = None) -> Iterator[Chunk]:
    """Decode from prompt_ids; yields one Chunk per round, the last one with the result (and empty
    Chunks between the pieces of a long prompt's prefill, see ClaspConfig.prefill_chunk_tokens).

    initial_plan (e.g. from an earlier turn of the conversation) is used from the start.
    plan_exchange: where re-plan requests go and new plans come from, without waiting
    (default: plan synchronously in-process). Until a first plan arrives, clasp mode drafts
    with the static default skip set.
    """
    started = time.perf_counter()
    spec = runner.spec
    _check_prompt(prompt_ids, spec)
    max_new = min(params.max_new_tokens, spec.max_context - len(prompt_ids))
    generator = None if params.seed is None else torch.Generator(device=runner.device).manual_seed(params.seed)
    stats, plans = DecodeStats(), []
    speculative = config.mode != "ar"
    # The draft copy is made at load; a request with draft_dtype None drafts on the shared weights.
    draft_has_copy = runner.draft_has_copy and config.draft_dtype is not None
    num_skip = config.skip_count(spec.num_layers, draft_has_copy) if speculative else 0
    dynamic = config.mode == "clasp" and num_skip > 0  # with M = 0 the DP has nothing to choose
    # Adaptive M: the controller picks each round's skip count from these (the DP plans all j <= M).
    skip_counts = skip_ladder(num_skip, draft_has_copy) if dynamic and config.adaptive and config.adaptive_skip \
        else (num_skip,)
    cache = runner.new_cache(len(prompt_ids) + max_new)
    exchange = plan_exchange or LocalPlanner(runner, cache)
    out = _Output(tokenizer, params, eos_ids, max_new)

    logits, hidden = yield from chunked_prefill(runner, cache, torch.tensor(prompt_ids, device=runner.device),
                                                dynamic and initial_plan is None, config.prefill_chunk_tokens)
    skip_set = config.static_skips(spec.num_layers, draft_has_copy) if speculative else frozenset()
    skip_sets = SkipSets(skip_set, config, spec.num_layers, draft_has_copy)
    if dynamic:
        if initial_plan is not None:
            skip_set = _adopt(initial_plan, num_skip, 0, plans, skip_sets)
        else:
            exchange.submit(PlanInput(0, hidden, len(prompt_ids) - 1, list(prompt_ids), num_skip))
    if speculative and not plans:
        skip_set = _poll(exchange, skip_set, num_skip, 0, plans, stats, skip_sets) if dynamic else skip_set
        if not plans:
            plans.append(PlanRecord(0, sorted(skip_set), None, 0.0))

    token_id = select_token(logits, params, generator)
    position = len(prompt_ids)  # where token_id (emitted, not yet run) will be processed
    chunk = out.add([token_id])
    controller = None
    if speculative and config.adaptive:
        # Seeded sampling: costs from weight bytes, not timings, so the same seed draws the same tokens.
        fixed = byte_costs(runner) if params.seed is not None and not params.greedy else None
        controller = DraftController(config.max_draft_length, fixed_costs=fixed, skip_counts=skip_counts,
                                     draft_units={j: draft_token_bytes(runner, j) for j in skip_counts}.__getitem__)
    # LOI counts the rounds that draft with the model: a plan serves only them, so while the
    # controller decodes plainly or drafts from the context, no DP runs and no hidden states move.
    model_rounds_since_plan = 0
    ngrams = None
    if speculative and config.adaptive and config.ngram_size:
        ngrams = NgramIndex(config.ngram_size)
        ngrams.extend(prompt_ids + [token_id])
    while out.finish_reason is None:
        yield chunk
        budget = min(config.max_draft_length, max_new - len(out.token_ids) - 1) if speculative else 0
        if controller is not None:
            choice = controller.choose(budget, ngrams.lookup(budget) if ngrams is not None and budget > 0 else None)
        else:
            choice = RoundChoice(MODEL if budget > 0 else PLAIN, budget)
        replan = False
        if dynamic and choice.source == MODEL:
            model_rounds_since_plan += 1
            replan = model_rounds_since_plan >= config.replan_interval
        round_skips = skip_set if choice.num_skip in (None, num_skip) else skip_sets.get(choice.num_skip)
        new_ids, result = self_speculative_step(runner, cache, token_id, position, round_skips, choice, config,
                                                params, generator, stats, collect_hidden=replan)
        if controller is not None:
            controller.observe(choice, result.num_drafted, result.accepted_length, result.draft_seconds,
                               result.verify_seconds)
        chunk = out.add(new_ids)
        if ngrams is not None:
            ngrams.extend(chunk.token_ids)
        position += result.accepted_length + 1
        token_id = result.next_token_id
        if dynamic:
            t_plan = time.perf_counter()
            if replan and out.finish_reason is None:  # a finished request has nothing left to plan for
                context = (prompt_ids + out.token_ids)[:result.hidden_position + 1]
                exchange.submit(PlanInput(stats.num_rounds, result.hidden, result.hidden_position, context, num_skip))
                model_rounds_since_plan = 0
            skip_set = _poll(exchange, skip_set, num_skip, stats.num_rounds, plans, stats, skip_sets)
            stats.plan_io_seconds += time.perf_counter() - t_plan
    chunk.result = GenerationResult(out.text, out.token_ids, out.finish_reason, len(prompt_ids), stats, plans,
                                    time.perf_counter() - started)
    yield chunk


def skip_ladder(num_skip: int, draft_has_copy: bool) -> tuple[int, ...]:
    """The skip counts adaptive M chooses from: M first, then 3M/4, M/2 and M/4, and 0 where the
    draft has its own cheaper copy (with shared weights a draft skipping nothing is the full model)."""
    ladder = [num_skip] + [round(num_skip * f) for f in (0.75, 0.5, 0.25)] + ([0] if draft_has_copy else [])
    return tuple(dict.fromkeys(j for j in ladder if j > 0 or draft_has_copy))


def draft_token_bytes(runner: ModelRunner, num_skip: int) -> float:
    """Weight bytes a draft token reads with num_skip layers skipped: what it costs on memory-bound hardware."""
    draft = runner.draft_weights
    return float(draft.layer_nbytes() * (runner.spec.num_layers - num_skip) + nbytes(draft.lm_head))


def byte_costs(runner: ModelRunner) -> tuple[float, float, float, float]:
    """(draft cost per weight byte, plain step, first extra verify row, each further row) in units of
    a plain step, from the weight bytes each reads (draft_token_bytes gives a draft token's bytes).
    An extra verified row costs ~1% of a step on a GPU. On CPU the first one costs more than the
    rest, since a plain step has a one-row kernel of its own: with prepacked weights 1 / 2 / 8 rows
    took 22-25 / 25-28 / 37 ms on the AMD EPYC dev host, and 34-37 / 38-45 / 55 ms on an Intel
    Xeon host, where a 1-token verification in a long context cost ~1.25 plain steps. Without
    packing 8 rows took 59 ms on the EPYC."""
    if runner.device.type == "cuda":
        return 1.0 / runner.weights.nbytes(), 1.0, 0.01, 0.01
    return 1.0 / runner.weights.nbytes(), 1.0, 0.2, 0.07 if runner.packed_nbytes else 0.15


class SkipSets:
    """The skip set for each skip count j: from the newest DP plan (which holds every j <= M), or
    before the first plan, the static default for j."""

    def __init__(self, static: frozenset[int], config: ClaspConfig, num_layers: int, draft_has_copy: bool) -> None:
        self.plan: LayerPlan | None = None
        self.config, self.num_layers, self.draft_has_copy = config, num_layers, draft_has_copy
        self.static: dict[int, frozenset[int]] = {len(static): static}

    def get(self, num_skip: int) -> frozenset[int]:
        if self.plan is not None:
            return self.plan.skip_set(num_skip)
        if num_skip not in self.static:
            config = dataclasses.replace(self.config, num_skip_layers=num_skip, static_skip_set=None)
            self.static[num_skip] = config.static_skips(self.num_layers, self.draft_has_copy)
        return self.static[num_skip]


def _poll(exchange: PlanExchange, skip_set: frozenset[int], num_skip: int, step: int, plans: list[PlanRecord],
          stats: DecodeStats, skip_sets: SkipSets) -> frozenset[int]:
    """Adopt the newest plan if one arrived; otherwise keep the current skip set."""
    plan = exchange.poll()
    if plan is None:
        return skip_set
    stats.observe_plan(plan.seconds)
    return _adopt(plan, num_skip, step, plans, skip_sets)
