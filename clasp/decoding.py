"""The decode loop: prefill, draft, verify, and the self-speculative round around them.

A round drafts up to K tokens per request with the layer-skipped draft (or takes them from the
request's context), verifies every request's [pending token, drafts...] in one full forward pass,
keeps each request's accepted prefix plus one resampled/bonus token (see clasp.verify), and rolls
each request's KV slot back to what it accepted. `ar` mode is the same round with K = 0.

`step(runner, requests)` advances a list of requests (clasp.request.Request) by one round each:
a prefill piece for a request still reading its prompt, a speculative round for the others.
`generate()` is the single-request loop over it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator, Sequence

import torch

from clasp import backends
from clasp.backends.base import draft_token_bytes
from clasp.config import ClaspConfig, SamplingParams
from clasp.controller import MODEL, NGRAM, PLAIN, DraftController, NgramIndex, RoundChoice
from clasp.kv_cache import KVCache
from clasp.model_runner import ModelRunner, Segment
from clasp.output import Chunk, OutputText
from clasp.plan_exchange import LocalPlanner, PlanExchange, PlanInput
from clasp.planner import LayerPlan
from clasp.proposers import DraftSlot, LayerSkipProposer, NgramProposer, Proposal
from clasp.request import PlanRecord, Request, RoundPlan, SkipSchedule, skip_ladder
from clasp.stats import DecodeStats
from clasp.verify import logits_to_probs, rejection_sample, sample, verify_greedy

__all__ = ["Chunk", "GenerationResult", "PlanRecord", "Proposal", "RoundResult", "draft", "generate", "prefill",
           "select_token", "skip_ladder", "start_request", "step", "verify"]


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
def prefill(runner: ModelRunner, cache: KVCache, prompt_ids: torch.Tensor, collect_hidden: bool, start: int = 0,
            slot: int = 0):
    """Run prompt_ids[start:] at positions start.. (the slot holds the rest). Returns (last-position
    logits [1, vocab], h_0..h_L of the last prompt token or None)."""
    hidden = [] if collect_hidden else None
    logits = runner.forward(prompt_ids[start:], cache, start, last_only=True, hidden_states=hidden, slot=slot)
    return logits, (torch.stack([h[-1] for h in hidden]) if collect_hidden else None)


def select_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The full model's choice from logits [1, vocab]."""
    if params.greedy:
        return int(logits[0].argmax())
    return int(sample(logits_to_probs(logits, params), generator)[0])


def draft(runner: ModelRunner, cache: KVCache, token_id: int, position: int, skip_set: frozenset[int],
          max_tokens: int, exit_threshold: float, params: SamplingParams,
          generator: torch.Generator | None, use_copy: bool = True) -> Proposal:
    """Draft up to max_tokens tokens after token_id (at `position`) for one request in slot 0
    (LayerSkipProposer with a batch of one)."""
    proposer = LayerSkipProposer(runner, cache, exit_threshold)
    request = DraftSlot(0, token_id, position, skip_set, max_tokens, params, generator, use_copy)
    return proposer.propose([request]).proposals[0]


@dataclasses.dataclass
class VerifyItem:
    """One request's part of a batched verification."""

    slot: int
    token_id: int  # the pending token
    position: int  # its position
    proposal: Proposal | None
    params: SamplingParams
    generator: torch.Generator | None
    collect_hidden: bool


def verify_batch(runner: ModelRunner, cache: KVCache, items: Sequence[VerifyItem]) -> list[RoundResult]:
    """Run the full model over every request's [pending token, drafts...] in one pass, accept per
    request, and roll each slot back to its accepted prefix."""
    device = runner.device
    segments = []
    for item in items:
        pending = torch.tensor([item.token_id], device=device)
        inputs = pending if item.proposal is None else torch.cat([pending, item.proposal.token_ids])
        segments.append(Segment(item.slot, item.position, inputs))
    hidden = [] if any(item.collect_hidden for item in items) else None
    logits = runner.forward_batch(segments, cache, hidden_states=hidden)  # [sum(K_i + 1), vocab]
    results, row = [], 0
    for item, segment in zip(items, segments):
        rows = logits[row:row + segment.num_tokens]  # [K+1, vocab]
        proposal, params = item.proposal, item.params
        if proposal is None:
            tau, next_id = 0, select_token(rows, params, item.generator)
        elif params.greedy:
            tau, next_id = verify_greedy(proposal.token_ids.tolist(), rows)
        else:
            tau, next_id = rejection_sample(proposal.token_ids, proposal.probs, logits_to_probs(rows, params),
                                            item.generator)
        cache.truncate(item.position + tau + 1, item.slot)  # keep the pending token and the accepted drafts
        states = torch.stack([h[row + tau] for h in hidden]) if item.collect_hidden else None
        results.append(RoundResult(tau, next_id, states, item.position + tau))
        row += segment.num_tokens
    return results


def verify(runner: ModelRunner, cache: KVCache, token_id: int, position: int, proposal: Proposal | None,
           params: SamplingParams, generator: torch.Generator | None, collect_hidden: bool, slot: int = 0) -> RoundResult:
    """verify_batch for one request."""
    return verify_batch(runner, cache, [VerifyItem(slot, token_id, position, proposal, params, generator,
                                                   collect_hidden)])[0]


def _check_prompt(prompt_ids: list[int], spec) -> None:
    if not prompt_ids:
        raise ValueError("prompt is empty: it must contain at least one token")
    if len(prompt_ids) >= spec.max_context:
        raise ValueError(f"prompt has {len(prompt_ids)} tokens, the context window is {spec.max_context}")
    if min(prompt_ids) < 0 or max(prompt_ids) >= spec.vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {spec.vocab_size})")


def cost_model(runner: ModelRunner):
    """The runner's backend's fixed costs (the device's default backend for a runner used as loaded)."""
    backend = runner.backend or backends.for_device(runner.device)
    return backend.cost_model(runner)


def byte_costs(runner: ModelRunner) -> tuple[float, float, float, float]:
    """(draft cost per weight byte, plain step, first extra verify row, each further row) in units of a
    plain step (see the backend's cost_model)."""
    return cost_model(runner).as_tuple()


# ---------------------------------------------------------------------- requests
def start_request(runner: ModelRunner, tokenizer, prompt_ids: list[int], params: SamplingParams,
                  config: ClaspConfig, eos_ids: frozenset[int], initial_plan: LayerPlan | None = None,
                  plan_exchange: PlanExchange | None = None, cache: KVCache | None = None,
                  slot: int = 0) -> Request:
    """A new request, ready for step(). cache/slot: where its KV lives (default: a cache of its own,
    sized to the prompt plus max_new_tokens). Raises ValueError for a prompt the model cannot take."""
    spec = runner.spec
    _check_prompt(prompt_ids, spec)
    max_new = min(params.max_new_tokens, spec.max_context - len(prompt_ids))
    if cache is None:
        cache = runner.new_cache(len(prompt_ids) + max_new)
    elif len(prompt_ids) + max_new > cache.max_length:
        raise ValueError(f"prompt and max_new_tokens need {len(prompt_ids) + max_new} positions, a slot holds "
                         f"{cache.max_length}")
    cache.truncate(0, slot)
    generator = None if params.seed is None else torch.Generator(device=runner.device).manual_seed(params.seed)
    # The draft copy is made at load; a request with draft_dtype None drafts on the shared weights.
    draft_has_copy = runner.draft_has_copy and config.draft_dtype is not None
    return Request(prompt_ids=list(prompt_ids), params=params, config=config, cache=cache, slot=slot,
                   max_new_tokens=max_new, out=OutputText(tokenizer, params, eos_ids, max_new),
                   schedule=SkipSchedule(config, spec.num_layers, draft_has_copy),
                   exchange=plan_exchange or LocalPlanner(runner, cache, slot), use_draft_copy=config.draft_dtype is not None,
                   generator=generator, initial_plan=initial_plan)


def _prefill_piece(runner: ModelRunner, req: Request) -> Chunk:
    """Run the next piece of the prompt (at most prefill_chunk_tokens); after the last piece, choose the
    first token and set up the request's decoding."""
    prompt = req.prompt_ids
    chunk_tokens = req.piece_tokens or req.config.prefill_chunk_tokens
    ids = torch.tensor(prompt, device=runner.device)
    if len(prompt) - req.num_prefilled > chunk_tokens:
        start = req.num_prefilled
        runner.forward(ids[start:start + chunk_tokens], req.cache, start, last_only=True, slot=req.slot)
        req.num_prefilled += chunk_tokens
        return Chunk([], "")
    schedule = req.schedule
    logits, hidden = prefill(runner, req.cache, ids, schedule.dynamic and req.initial_plan is None,
                             req.num_prefilled, req.slot)
    req.num_prefilled = len(prompt)
    if schedule.dynamic:
        if req.initial_plan is not None:
            schedule.adopt(req.initial_plan, 0, req.plans)
        else:
            req.first_plan_input = PlanInput(0, hidden, len(prompt) - 1, list(prompt), schedule.num_skip)
    if schedule.speculative and not req.plans:
        if schedule.dynamic:
            schedule.poll(req.exchange, 0, req.plans, req.stats)
        if not req.plans:
            req.plans.append(PlanRecord(0, sorted(schedule.skip_set), None, 0.0))
    req.token_id = select_token(logits, req.params, req.generator)
    req.position = len(prompt)  # where token_id (emitted, not yet run) will be processed
    chunk = req.out.add([req.token_id])
    config = req.config
    if schedule.speculative and config.adaptive:
        # Seeded sampling: costs from weight bytes, not timings, so the same seed draws the same tokens.
        fixed = byte_costs(runner) if req.params.seed is not None and not req.params.greedy else None
        counts = schedule.skip_counts
        req.controller = DraftController(config.max_draft_length, fixed_costs=fixed, skip_counts=counts,
                                         draft_units={j: draft_token_bytes(runner, j) for j in counts}.__getitem__)
        if config.ngram_size:
            req.ngrams = NgramIndex(config.ngram_size)
            req.ngrams.extend(prompt + [req.token_id])
    return _finish_if_done(req, chunk)


def _finish_if_done(req: Request, chunk: Chunk) -> Chunk:
    if req.finished:
        out = req.out
        req.result = chunk.result = GenerationResult(out.text, out.token_ids, out.finish_reason, len(req.prompt_ids),
                                                     req.stats, req.plans, time.perf_counter() - req.started)
    return chunk


def _choose(req: Request) -> RoundChoice:
    """The request's draft source and length for this round, as it would choose alone."""
    budget = req.draft_budget
    if budget <= 0:
        return RoundChoice(PLAIN, 0)
    if req.controller is not None:
        return req.controller.choose(budget, req.ngrams.lookup(budget) if req.ngrams is not None else None)
    return RoundChoice(MODEL, budget)


def _commit(req: Request, choice: RoundChoice) -> None:
    """Fix the round's choice (after a batch planner cut it): its skip set, whether verification
    collects hidden states for a re-plan, and at the first model draft, the first plan request."""
    if choice.source == MODEL and req.first_plan_input is not None:
        req.exchange.submit(req.first_plan_input)  # the first model draft: plan for it now
        req.first_plan_input = None
        req.schedule.poll(req.exchange, req.stats.num_rounds, req.plans, req.stats)
    skip_set, collect = req.schedule.for_round(choice)
    req.round = RoundPlan(choice, skip_set, collect)


def _propose(runner: ModelRunner, cache: KVCache, requests: Sequence[Request]) -> list[Proposal | None]:
    """Every request's drafts for this round: the layer-skip draft batched over the requests that
    draft with the model, the context's n-grams for those the controller gave one."""
    proposals: list[Proposal | None] = [None] * len(requests)
    ngram = NgramProposer(runner.spec.vocab_size, runner.device)
    model = []
    for i, req in enumerate(requests):
        choice = req.round.choice
        if choice.source == NGRAM:
            proposals[i] = ngram.one(choice.ngram, not req.params.greedy)
        elif choice.source == MODEL and choice.num_draft > 0:
            model.append(i)
    if model:
        by_threshold: dict[float, list[int]] = {}
        for i in model:
            by_threshold.setdefault(requests[i].config.draft_exit_threshold, []).append(i)
        for threshold, group in by_threshold.items():
            slots = [DraftSlot(requests[i].slot, requests[i].token_id, requests[i].position, requests[i].round.skip_set,
                               requests[i].round.choice.num_draft, requests[i].params, requests[i].generator,
                               requests[i].use_draft_copy) for i in group]
            for i, p in zip(group, LayerSkipProposer(runner, cache, threshold).propose(slots).proposals):
                proposals[i] = p
    return proposals


def _account(req: Request, proposal: Proposal | None, result: RoundResult) -> list[int]:
    """Stats and controller for one request's round; returns the emitted token ids (accepted drafts
    + the resampled/bonus token)."""
    stats, choice = req.stats, req.round.choice
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
        stats.num_skipped_layers_drafted += len(req.round.skip_set) * len(drafted)
    if req.controller is not None:
        req.controller.observe(choice, result.num_drafted, result.accepted_length, result.draft_seconds,
                               result.verify_seconds)
    return drafted[:result.accepted_length] + [result.next_token_id]


def _advance(req: Request, result: RoundResult, new_ids: list[int]) -> Chunk:
    """Emit a round's tokens, move the request on, and hand a re-plan over if one is due."""
    chunk = req.out.add(new_ids)
    if req.ngrams is not None:
        req.ngrams.extend(chunk.token_ids)
    req.position += result.accepted_length + 1
    req.token_id = result.next_token_id
    schedule = req.schedule
    if schedule.dynamic:
        t_plan = time.perf_counter()
        if req.round.collect_hidden and not req.finished:  # a finished request has nothing left to plan for
            context = (req.prompt_ids + req.out.token_ids)[:result.hidden_position + 1]
            req.exchange.submit(PlanInput(req.stats.num_rounds, result.hidden, result.hidden_position, context,
                                          schedule.num_skip))
            schedule.model_rounds_since_plan = 0
        schedule.poll(req.exchange, req.stats.num_rounds, req.plans, req.stats)
        req.stats.plan_io_seconds += time.perf_counter() - t_plan
    return _finish_if_done(req, chunk)


def step(runner: ModelRunner, requests: Sequence[Request], planner=None) -> list[Chunk]:
    """Advance every unfinished request by one round: a prefill piece for a request still reading
    its prompt, else draft, verify (one forward pass for all of them, per KV cache) and accept.
    planner: cuts the draft lengths of a batch (clasp.scheduler.BatchPlanner: plan(requests, choices)
    after they chose, observe(...) the round's costs); None leaves each request's own choice. The output
    is the same either way. Returns one Chunk per request (the final one carries the result; a
    finished request gets an empty chunk)."""
    chunks: list[Chunk | None] = [None] * len(requests)
    decoding = []
    for i, req in enumerate(requests):
        if req.finished:
            chunks[i] = Chunk([], "")
        elif req.prefilling:
            chunks[i] = _prefill_piece(runner, req)
        else:
            decoding.append(i)
    by_cache: dict[int, list[int]] = {}
    for i in decoding:
        by_cache.setdefault(id(requests[i].cache), []).append(i)
    for group in by_cache.values():
        reqs = [requests[i] for i in group]
        for i, chunk in zip(group, _speculative_round(runner, reqs, planner)):
            chunks[i] = chunk
    return chunks


def _speculative_round(runner: ModelRunner, reqs: Sequence[Request], planner=None) -> list[Chunk]:
    """One round for requests sharing a KV cache: choose, propose, verify in one pass, accept."""
    cache = reqs[0].cache
    choices = [_choose(req) for req in reqs]
    if planner is not None:
        planner.plan(reqs, choices)  # cuts lengths in place, before any of them commits to its choice
    for req, choice in zip(reqs, choices):
        _commit(req, choice)
    t0 = time.perf_counter()
    proposals = _propose(runner, cache, reqs)
    t1 = time.perf_counter()
    items = [VerifyItem(r.slot, r.token_id, r.position, p, r.params, r.generator, r.round.collect_hidden)
             for r, p in zip(reqs, proposals)]
    results = verify_batch(runner, cache, items)
    t2 = time.perf_counter()
    if planner is not None and len(reqs) > 1:
        lengths = [0 if p is None else int(p.token_ids.shape[0]) for p in proposals]
        planner.observe(lengths, [r.round.choice.source == MODEL for r in reqs], t1 - t0,
                        sum(lengths) + len(reqs), t2 - t1)
    chunks = []
    for req, proposal, result in zip(reqs, proposals, results):
        # In a batch every request waited for the whole draft and verification: that is its cost.
        result.draft_seconds, result.verify_seconds = t1 - t0, t2 - t1
        chunks.append(_advance(req, result, _account(req, proposal, result)))
    return chunks


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
    req = start_request(runner, tokenizer, prompt_ids, params, config, eos_ids, initial_plan, plan_exchange)
    while True:
        chunk = step(runner, [req])[0]
        yield chunk
        if chunk.result is not None:
            return
