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

With `fixed_costs` the costs are not measured but given (relative units, e.g. weight bytes read per
step, which on memory-bound hardware is what a step costs): choices then depend only on what was
accepted, so a seeded sampling request draws the same tokens every time it runs.
"""

from __future__ import annotations

import dataclasses

PLAIN, MODEL, NGRAM = "plain", "model", "ngram"


@dataclasses.dataclass
class RoundChoice:
    source: str  # PLAIN, MODEL or NGRAM
    num_draft: int  # at most this many tokens (the model draft may also stop on low confidence)
    ngram: list[int] = dataclasses.field(default_factory=list)  # the proposal, for NGRAM


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
    make the cost uneven in r (on the dev CPU 1 and 2 rows cost the same, 9 rows 40% more than 8)."""

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
                 max_backoff: int = 64, fixed_costs: tuple[float, float, float] | None = None) -> None:
        """fixed_costs: (draft cost per token, v1, slope per extra row) to use instead of measuring."""
        self.max_draft_length = max_draft_length
        self.fixed_costs = fixed_costs
        self.model = AcceptanceStats(max_draft_length, model_prior, prior_weight, decay)
        self.ngram = AcceptanceStats(max_draft_length, ngram_prior, prior_weight, decay)
        self.verify = VerifyCost(decay)
        self.decay = decay
        self.draft_cost: float | None = None  # seconds per model-drafted token
        self.model_drafted = 0.0  # decayed mean of tokens per model-draft round (the exit cuts rounds short)
        self.min_backoff, self.max_backoff = min_backoff, max_backoff
        self.backoff = min_backoff
        self.plain_streak = 0  # plain rounds since the model draft last ran
        self.probing = False

    # ------------------------------------------------------------------ choose
    def choose(self, budget: int, ngram: list[int] | None = None) -> RoundChoice:
        """budget: tokens that may still be drafted this round; ngram: the context's continuation, if any."""
        k_max = min(self.max_draft_length, budget)
        if k_max <= 0:
            return RoundChoice(PLAIN, 0)
        if self.fixed_costs is None and (self.draft_cost is None or not self.verify.known):
            return RoundChoice(MODEL, k_max)  # nothing measured yet: draft
        draft_cost, verify_cost = self._costs()
        best = RoundChoice(PLAIN, 0)
        best_rate = 1.0 / verify_cost(1)
        if ngram:
            proposal = ngram[:k_max]
            k, rate = self._best_length(self.ngram.cumulative(len(proposal)), 0.0, verify_cost)
            if k and rate > best_rate:
                best, best_rate = RoundChoice(NGRAM, k, proposal[:k]), rate
        k, rate = self._best_length(self.model.cumulative(k_max), draft_cost, verify_cost)
        if k and rate > best_rate:
            best, best_rate = RoundChoice(MODEL, k), rate
        if best.source == MODEL:
            return best
        # The model draft does not pay now: probe it again after the back-off.
        self.plain_streak += 1
        if self.plain_streak >= self.backoff:
            self.probing = True
            return RoundChoice(MODEL, k_max)
        return best

    def _costs(self):
        """(draft seconds per token, verify seconds as a function of rows), measured or fixed."""
        if self.fixed_costs is not None:
            draft_cost, v1, slope = self.fixed_costs
            return draft_cost, lambda rows: v1 + slope * (rows - 1)
        return self.draft_cost, self.verify.cost

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
            self.model.observe(num_drafted, accepted_length)
            per_token = draft_seconds / num_drafted
            d = self.decay
            self.draft_cost = per_token if self.draft_cost is None else d * self.draft_cost + (1 - d) * per_token
            self.model_drafted = d * self.model_drafted + (1 - d) * num_drafted if self.model_drafted else num_drafted
            if self.probing:
                self.probing = False
                # Still not paying after the probe: wait twice as long next time; paying: half as long.
                draft_cost, verify_cost = self._costs()
                k, rate = self._best_length(self.model.cumulative(self.max_draft_length), draft_cost, verify_cost)
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
