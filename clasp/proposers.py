"""Draft sources behind one interface: each proposes tokens for a batch of requests, with a
length per request (0: nothing to propose this round).

- LayerSkipProposer: the same model with a request's skip set, optionally over the runner's
  reduced-precision draft copy; drafts one token per request per forward call until each request's
  length or confidence exit is reached.
- NgramProposer: the request's own context (prompt lookup), chosen by the controller.

The scorer (one full forward over every request's [pending token, drafts...]) and the acceptance
step take the same per-request shape (clasp.decoding.step).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import torch

from clasp.model_runner import ModelRunner, Segment
from clasp.verify import logits_to_probs, sample


@dataclasses.dataclass
class Proposal:
    """One request's drafts."""

    token_ids: torch.Tensor  # [K] int64, drafted tokens
    probs: torch.Tensor | None  # [K, vocab], the draft's warped distributions (sampling only)


@dataclasses.dataclass
class Proposals:
    """A batch's drafts: one Proposal (or None: nothing proposed) per request."""

    proposals: list[Proposal | None]

    @property
    def lengths(self) -> list[int]:
        return [0 if p is None else p.token_ids.shape[0] for p in self.proposals]


@dataclasses.dataclass
class DraftSlot:
    """What the layer-skip draft needs of one request."""

    slot: int
    token_id: int  # the pending token: the draft continues after it
    position: int  # the pending token's position
    skip_set: frozenset[int]
    max_tokens: int
    params: "object"  # SamplingParams
    generator: torch.Generator | None
    use_copy: bool  # on the runner's reduced-precision draft weights (if it has them)


class Proposer(Protocol):
    def propose(self, requests: Sequence) -> Proposals:
        """Drafts for each request (the same order)."""


class LayerSkipProposer:
    """The layer-skipped model as the draft. Stops a request's draft early once its top
    probability falls below exit_threshold (the token that fell below is still proposed:
    verifying it costs one row, and it is often right)."""

    def __init__(self, runner: ModelRunner, cache, exit_threshold: float) -> None:
        self.runner, self.cache, self.exit_threshold = runner, cache, exit_threshold

    def propose(self, requests: Sequence[DraftSlot]) -> Proposals:
        steps = self.runner.static_steps  # a backend's static passes: greedy drafts with one read per round
        if steps is not None:
            proposals = steps.propose(requests, self.cache, self.exit_threshold)
            if proposals is not None:
                return proposals
        drafted = [[] for _ in requests]
        probs = [[] for _ in requests]
        current = [r.token_id for r in requests]
        active = [i for i, r in enumerate(requests) if r.max_tokens > 0]
        k = 0
        while active:
            logits = self._draft_logits([requests[i] for i in active], [current[i] for i in active], k)  # [B, vocab]
            still = []
            for row, i in enumerate(active):
                r = requests[i]
                if r.params.greedy:
                    confidence, token = torch.softmax(logits[row:row + 1], dim=-1).max(dim=-1)
                else:
                    q = logits_to_probs(logits[row:row + 1], r.params)
                    token = sample(q, r.generator)
                    confidence = q.max()
                    probs[i].append(q[0])
                drafted[i].append(token)
                current[i] = int(token)
                # The exit decision is a host branch: one scalar read per drafted token. NaN stops too.
                if len(drafted[i]) < r.max_tokens and float(confidence) >= self.exit_threshold:
                    still.append(i)
            active, k = still, k + 1
        return Proposals([Proposal(torch.cat(d), torch.stack(p) if p else None) if d else None
                          for d, p in zip(drafted, probs)])

    def _draft_logits(self, requests: Sequence[DraftSlot], tokens: list[int], k: int) -> torch.Tensor:
        """Draft logits [B, vocab] for each request's token at its position + k."""
        runner, cache = self.runner, self.cache
        if all(r.use_copy for r in requests):
            return runner.draft_step(tokens, [r.slot for r in requests], [r.position + k for r in requests],
                                     [r.skip_set for r in requests], cache)
        if not any(r.use_copy for r in requests):
            segments = [Segment(r.slot, r.position + k, torch.tensor([t], device=runner.device), r.skip_set)
                        for r, t in zip(requests, tokens)]
            return runner.forward_batch(segments, cache, draft=False)
        rows = [self._draft_logits([r], [t], k) for r, t in zip(requests, tokens)]  # mixed: rare
        return torch.cat(rows)


class NgramProposer:
    """A draft taken from the context (n-gram lookup): its distribution is one-hot, so rejection
    sampling accepts token x with probability p(x) and resamples from p with x removed."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size, self.device = vocab_size, device

    def propose(self, requests: Sequence[tuple[list[int], bool]]) -> Proposals:
        """requests: (the continuation the controller chose, whether the request samples)."""
        return Proposals([self.one(ids, sampling) for ids, sampling in requests])

    def one(self, token_ids: list[int], sampling: bool) -> Proposal:
        ids = torch.tensor(token_ids, device=self.device)
        probs = None
        if sampling:
            probs = torch.zeros(len(token_ids), self.vocab_size, device=self.device).scatter_(1, ids[:, None], 1.0)
        return Proposal(ids, probs)
