"""Per-session draft control: each round, draft from the layer-skip model, from the context
(n-gram lookup), or not at all, and how many tokens.

Speculation pays only when the tokens it saves are worth more than drafting them and widening
the verification. The controller measures, as decoding goes:

- the layer-skip draft's cost, seconds per drafted token;
- the verification's cost by rows: a decayed mean per row count, falling back to a line fitted
  by decayed least squares for row counts not seen yet (1 row is also a plain decoding step);
- per draft source and position k, the acceptance rate a_k = P(draft k accepted | drafts
  before it accepted), as decayed counts starting from a prior.

A round drafting up to k tokens is expected to emit E = 1 + sum_{i<=k} prod_{j<=i} a_j tokens and
cost T = (drafted tokens x draft cost) + verify(k + 1 rows). Each round takes the choice with the most
expected tokens per second: a plain step (E = 1, T = v1), the model draft capped at the k that
maximizes E/T, or the context's n-gram continuation (no draft cost). When a plain step wins, the
controller probes the model draft again after a back-off that doubles (up to max_backoff rounds)
while drafting keeps not paying, so a session whose text turns predictable gets speculation back.
All choices only change what is proposed: verification stays the full model, so output is exact.

Adaptive M: with several skip counts (`skip_counts`, e.g. M, 3M/4, M/2, M/4, and 0 where the draft
has its own copy), each is a draft of its own, with its own acceptance and a cost proportional to
`draft_units(j)` (weight bytes a draft token reads with j layers skipped) times one measured
seconds-per-unit. The DP plans every j up to M in one pass, so the choice costs no extra planning.
Every skip count is tried once (a short draft) as soon as costs are known; after that the best one
runs, and every `probe_every` model rounds one round goes to a neighbour of the best, so a stale
estimate recovers.

With `fixed_costs` the costs are not measured but given (relative units, e.g. weight bytes read per
step, which on memory-bound hardware is what a step costs): choices then depend only on what was
accepted, so a seeded sampling request draws the same tokens every time it runs.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

PLAIN, MODEL, NGRAM = "plain", "model", "ngram"


@dataclasses.dataclass
class RoundChoice:
    source: str  # PLAIN, MODEL or NGRAM
    num_draft: int  # at most this many tokens (the model draft may also stop on low confidence)
    ngram: list[int] = dataclasses.field(default_factory=list)  # the proposal, for NGRAM
    num_skip: int | None = None  # MODEL: layers the draft skips (one of the controller's skip_counts)


class AcceptanceStats:
    """Decayed per-position acceptance counts for one draft source.

    The rate at position 0 starts from the prior; every later position starts from the rate of
    the position before it, so positions rarely reached (long drafts) are not held to the prior.
    """

    def __init__(self, max_positions: int, prior_rate: float, prior_weight: float, decay: float) -> None:
        self.prior_rate, self.prior_weight, self.decay = prior_rate, prior_weight, decay
        self.reached = [0.0] * max_positions
        self.accepted = [0.0] * max_positions

    def observe(self, num_drafted: int, accepted_length: int) -> None:
        # Position k was verified only if drafts before it were accepted (k <= tau).
        for k in range(min(num_drafted, accepted_length + 1, len(self.reached))):
            self.reached[k] = self.decay * self.reached[k] + 1.0
            self.accepted[k] = self.decay * self.accepted[k] + (1.0 if k < accepted_length else 0.0)

    def rate(self, k: int, prior: float) -> float:
        return (self.accepted[k] + self.prior_weight * prior) / (self.reached[k] + self.prior_weight)

    def cumulative(self, k: int) -> list[float]:
        """[P(drafts 1..i all accepted) for i = 1..k]."""
        out, p, prior = [], 1.0, self.prior_rate
        for i in range(min(k, len(self.reached))):
            prior = self.rate(i, prior)
            p *= prior
            out.append(p)
        return out


class VerifyCost:
    """Verification seconds by rows: a decayed mean per row count seen, else the line
    v(r) = v1 + slope * (r - 1) from decayed least squares over all (rows, seconds). BLAS kernels
    make the cost uneven in r (row-count cliffs are measured in docs/performance.md)."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.w = self.sr = self.srr = self.sv = self.srv = 0.0
        self.by_rows: dict[int, float] = {}

    def observe(self, rows: int, seconds: float) -> None:
        d = self.decay
        self.w, self.sr, self.srr = d * self.w + 1, d * self.sr + rows, d * self.srr + rows * rows
        self.sv, self.srv = d * self.sv + seconds, d * self.srv + rows * seconds
        seen = self.by_rows.get(rows)
        self.by_rows[rows] = seconds if seen is None else d * seen + (1 - d) * seconds

    def cost(self, rows: int) -> float:
        if rows in self.by_rows:
            return self.by_rows[rows]
        v1, slope = self.line()
        return v1 + slope * (rows - 1)

    @property
    def known(self) -> bool:
        return self.w > 0

    def line(self) -> tuple[float, float]:
        """(v1, slope); slope 0 until the rows seen vary enough to fit one."""
        mean_r, mean_v = self.sr / self.w, self.sv / self.w
        var = self.srr / self.w - mean_r ** 2
        slope = max((self.srv / self.w - mean_r * mean_v) / var, 0.0) if var > 0.25 else 0.0
        v1 = mean_v - slope * (mean_r - 1)
        if v1 <= 0:  # a bad fit (noise): fall back to a flat cost
            v1, slope = mean_v, 0.0
        return v1, slope


class DraftController:
    def __init__(self, max_draft_length: int, decay: float = 0.9, model_prior: float = 0.6,
                 ngram_prior: float = 0.5, prior_weight: float = 1.0, min_backoff: int = 8,
                 max_backoff: int = 64, fixed_costs: tuple[float, float, float, float] | None = None,
                 skip_counts: Sequence[int] = (0,), draft_units: Callable[[int], float] | None = None,
                 probe_every: int = 16, probe_length: int = 3) -> None:
        """fixed_costs: (draft cost per unit, v1, the first extra row, each further row) to use instead of
        measuring: verifying r rows costs v1, plus the first extra row's cost and (r - 2) slopes when r > 1.
        skip_counts: the layer-skip drafts to choose from, by layers skipped; the first runs first.
        draft_units: the relative cost of a draft token with j layers skipped (default: 1 for every j)."""
        if not skip_counts:
            raise ValueError("skip_counts must name at least one skip count")
        self.max_draft_length = max_draft_length
        self.fixed_costs = fixed_costs
        self.skip_counts = tuple(dict.fromkeys(int(j) for j in skip_counts))
        self.units = draft_units or (lambda j: 1.0)
        self.models = {j: AcceptanceStats(max_draft_length, model_prior, prior_weight, decay) for j in self.skip_counts}
        self.rounds_by_skip = dict.fromkeys(self.skip_counts, 0)
        self.ngram = AcceptanceStats(max_draft_length, ngram_prior, prior_weight, decay)
        self.verify = VerifyCost(decay)
        self.decay = decay
        self.unit_cost: float | None = None  # measured seconds per draft unit
        self.model_drafted = 0.0  # decayed mean of tokens per model-draft round (the exit cuts rounds short)
        self.min_backoff, self.max_backoff = min_backoff, max_backoff
        self.backoff = min_backoff
        self.plain_streak = 0  # plain rounds since the model draft last ran
        self.probing = False
        # Tries and probes draft at most probe_length tokens: on shared weights a draft token of a
        # lightly skipped draft costs nearly a full step, and the first few positions say the most.
        self.probe_every, self.probe_length = probe_every, probe_length
        self.model_rounds = 0
        self.probes = 0

    # ------------------------------------------------------------------ choose
    def choose(self, budget: int, ngram: list[int] | None = None) -> RoundChoice:
        """budget: tokens that may still be drafted this round; ngram: the context's continuation, if any."""
        k_max = min(self.max_draft_length, budget)
        if k_max <= 0:
            return RoundChoice(PLAIN, 0)
        if self.fixed_costs is None and (self.unit_cost is None or not self.verify.known):
            return RoundChoice(MODEL, k_max, num_skip=self.skip_counts[0])  # nothing measured yet: draft
        draft_cost, verify_cost = self._costs()
        best = RoundChoice(PLAIN, 0)
        best_rate = 1.0 / verify_cost(1)
        if ngram:
            proposal = ngram[:k_max]
            k, rate = self._best_length(self.ngram.cumulative(len(proposal)), 0.0, verify_cost)
            if k and rate > best_rate:
                best, best_rate = RoundChoice(NGRAM, k, proposal[:k]), rate
        untried = [j for j in self.skip_counts if not self.rounds_by_skip[j]]
        if untried and best.source != NGRAM:
            return RoundChoice(MODEL, min(k_max, self.probe_length), num_skip=untried[0])
        j, k, rate = self._best_model(k_max, draft_cost, verify_cost)
        if k and rate > best_rate:
            best, best_rate = RoundChoice(MODEL, k, num_skip=j), rate
        if best.source == MODEL:
            self.model_rounds += 1
            if len(self.skip_counts) > 1 and self.model_rounds % self.probe_every == 0:
                best.num_skip = self._neighbour(best.num_skip)
                best.num_draft = min(k_max, max(best.num_draft, self.probe_length))
            return best
        # The model draft does not pay now: probe it again after the back-off.
        self.plain_streak += 1
        if self.plain_streak >= self.backoff:
            self.probing = True  # a short draft: a full-length probe of a draft that lost cost 4-5 steps
            return RoundChoice(MODEL, min(k_max, self.probe_length), num_skip=j)
        return best

    def _neighbour(self, j: int) -> int:
        """A skip count next to j (alternately fewer and more skipped layers where both exist)."""
        order = sorted(self.skip_counts)
        i = order.index(j)
        sides = [order[n] for n in (i - 1, i + 1) if 0 <= n < len(order)]
        self.probes += 1
        return sides[self.probes % len(sides)]

    def _costs(self):
        """(draft seconds per token as a function of the skip count, verify seconds as a function of rows)."""
        if self.fixed_costs is not None:
            unit_cost, v1, first_row, slope = self.fixed_costs
            return (lambda j: unit_cost * self.units(j)), (lambda rows: v1 + (first_row + slope * (rows - 2)
                                                                             if rows > 1 else 0.0))
        return (lambda j: self.unit_cost * self.units(j)), self.verify.cost

    def _best_model(self, k_max: int, draft_cost, verify_cost) -> tuple[int, int, float]:
        """(skip count, draft length, expected tokens per second) of the best model draft."""
        best = (self.skip_counts[0], 0, 0.0)
        several = len(self.skip_counts) > 1
        for j in self.skip_counts:
            # With several skip counts, each one's draft length grows with its evidence: an
            # estimate from a round or two must not buy an 8-token draft at nearly a step each.
            cap = min(k_max, self.probe_length + self.rounds_by_skip[j]) if several else k_max
            k, rate = self._best_length(self.models[j].cumulative(cap), draft_cost(j), verify_cost)
            if k and rate > best[2]:
                best = (j, k, rate)
        return best

    def _best_length(self, cumulative: list[float], draft_cost: float, verify_cost) -> tuple[int, float]:
        """The draft length with the most expected tokens per second, and that rate."""
        best_k, best_rate, expected = 0, 0.0, 1.0
        for k, p in enumerate(cumulative, start=1):
            expected += p
            drafted = min(k, max(self.model_drafted, 1.0)) if draft_cost else k
            rate = expected / (drafted * draft_cost + verify_cost(k + 1))
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k, best_rate

    # ------------------------------------------------------------------ observe
    def observe(self, choice: RoundChoice, num_drafted: int, accepted_length: int, draft_seconds: float,
                verify_seconds: float) -> None:
        self.verify.observe(num_drafted + 1, verify_seconds)
        if choice.source == NGRAM:
            self.ngram.observe(num_drafted, accepted_length)
        elif choice.source == MODEL and num_drafted:
            j = self.skip_counts[0] if choice.num_skip is None else choice.num_skip
            self.models[j].observe(num_drafted, accepted_length)
            self.rounds_by_skip[j] += 1
            per_unit = draft_seconds / (num_drafted * self.units(j))
            d = self.decay
            self.unit_cost = per_unit if self.unit_cost is None else d * self.unit_cost + (1 - d) * per_unit
            self.model_drafted = d * self.model_drafted + (1 - d) * num_drafted if self.model_drafted else num_drafted
            if self.probing:
                self.probing = False
                # Still not paying after the probe: wait twice as long next time; paying: half as long.
                draft_cost, verify_cost = self._costs()
                _, k, rate = self._best_model(self.max_draft_length, draft_cost, verify_cost)
                self.backoff = (min(self.backoff * 2, self.max_backoff) if not k or rate <= 1.0 / verify_cost(1)
                                else max(self.backoff // 2, self.min_backoff))
            self.plain_streak = 0


class NgramIndex:
    """Prompt lookup: where the context's last n tokens occurred before, and what followed.

    For each n in [min_n, max_n], maps an n-gram to the index just after its most recent earlier
    occurrence; updated incrementally as tokens are appended (O(max_n) per token).
    """

    def __init__(self, max_n: int, min_n: int = 2) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n
        self.tokens: list[int] = []
        self._next: dict[tuple[int, ...], int] = {}

    def extend(self, token_ids) -> None:
        for t in token_ids:
            i = len(self.tokens)
            # Register the n-grams ending just before token i: their continuation starts at i.
            for n in range(self.min_n, min(self.max_n, i) + 1):
                self._next[tuple(self.tokens[i - n:i])] = i
            self.tokens.append(int(t))

    def lookup(self, max_tokens: int) -> list[int]:
        """The continuation of the longest matching suffix (up to max_tokens), or []."""
        end = len(self.tokens)
        for n in range(min(self.max_n, end), self.min_n - 1, -1):
            start = self._next.get(tuple(self.tokens[end - n:]))
            if start is not None:
                return self.tokens[start:start + max_tokens]
        return []
