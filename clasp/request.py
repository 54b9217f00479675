"""A request's whole decoding state between rounds, as data.

Everything one generation carries from round to round lives in a `Request`: its tokens and
position, its KV-cache slot, its skip schedule, controller, n-gram index, stats and output text.
The engine advances a list of requests by one round with one call (clasp.decoding.step); a
request joins by being started and leaves when it has a result.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from clasp.config import ClaspConfig, SamplingParams
from clasp.controller import DraftController, NgramIndex, RoundChoice
from clasp.kv_cache import KVCache
from clasp.output import OutputText
from clasp.plan_exchange import PlanExchange
from clasp.planner import LayerPlan
from clasp.stats import DecodeStats


@dataclasses.dataclass
class PlanRecord:
    step: int  # the verification round the skip set was first used at
    skip_set: list[int]
    score: float | None  # the DP's cos(g[L][M], h_L); None for static sets
    seconds: float


def skip_ladder(num_skip: int, draft_has_copy: bool) -> tuple[int, ...]:
    """The skip counts adaptive M chooses from: M first, then 3M/4, M/2 and M/4, and 0 where the
    draft has its own cheaper copy (with shared weights a draft skipping nothing is the full model)."""
    ladder = [num_skip] + [round(num_skip * f) for f in (0.75, 0.5, 0.25)] + ([0] if draft_has_copy else [])
    return tuple(dict.fromkeys(j for j in ladder if j > 0 or draft_has_copy))


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


class SkipSchedule:
    """Which layers a request's draft skips, round by round, and when it asks for a new plan.

    M (num_skip) and the mode fix the kind: ar drafts nothing; static uses one fixed set; clasp
    (dynamic) adopts each new DP plan as it arrives and asks for one every replan_interval rounds
    that draft with the model (a plan serves only those: while the controller decodes plainly or
    drafts from the context, no DP runs and no hidden states move)."""

    def __init__(self, config: ClaspConfig, num_layers: int, draft_has_copy: bool) -> None:
        self.speculative = config.mode != "ar"
        self.num_skip = config.skip_count(num_layers, draft_has_copy) if self.speculative else 0
        self.dynamic = config.mode == "clasp" and self.num_skip > 0  # with M = 0 the DP has nothing to choose
        # Adaptive M: the controller picks each round's skip count from these (the DP plans all j <= M).
        adaptive_m = self.dynamic and config.adaptive and config.adaptive_skip
        self.skip_counts = skip_ladder(self.num_skip, draft_has_copy) if adaptive_m else (self.num_skip,)
        self.skip_set = config.static_skips(num_layers, draft_has_copy) if self.speculative else frozenset()
        self.sets = SkipSets(self.skip_set, config, num_layers, draft_has_copy)
        self.replan_interval = config.replan_interval
        self.model_rounds_since_plan = 0

    def adopt(self, plan: LayerPlan, step: int, plans: list[PlanRecord]) -> None:
        """Use a DP plan; record it when it changes the skip set (of M layers)."""
        self.sets.plan = plan
        self.skip_set = plan.skip_set(self.num_skip)
        if not plans or plans[-1].skip_set != sorted(self.skip_set):
            plans.append(PlanRecord(step, sorted(self.skip_set), plan.score(self.num_skip), plan.seconds))

    def poll(self, exchange: PlanExchange, step: int, plans: list[PlanRecord], stats: DecodeStats) -> None:
        """Adopt the newest plan if one arrived; otherwise keep the current skip set."""
        plan = exchange.poll()
        if plan is not None:
            stats.observe_plan(plan.seconds)
            self.adopt(plan, step, plans)

    def for_round(self, choice: RoundChoice) -> tuple[frozenset[int], bool]:
        """(the skip set this round drafts with, whether its verification should collect hidden
        states for a re-plan)."""
        replan = False
        if self.dynamic and choice.source == "model":
            self.model_rounds_since_plan += 1
            replan = self.model_rounds_since_plan >= self.replan_interval
        skips = self.skip_set if choice.num_skip in (None, self.num_skip) else self.sets.get(choice.num_skip)
        return skips, replan


@dataclasses.dataclass
class RoundPlan:
    """What a request does in the current round (set by the step's choose phase)."""

    choice: RoundChoice
    skip_set: frozenset[int]
    collect_hidden: bool


@dataclasses.dataclass
class Request:
    """One generation, from its prompt to its result."""

    prompt_ids: list[int]
    params: SamplingParams
    config: ClaspConfig
    cache: KVCache
    slot: int  # this request's slot in `cache`
    max_new_tokens: int  # the request's limit, clipped to the context window
    out: OutputText
    schedule: SkipSchedule
    exchange: PlanExchange  # where re-plan requests go and plans come from
    use_draft_copy: bool  # draft on the runner's reduced-precision copy (if it has one)
    generator: torch.Generator | None = None
    initial_plan: LayerPlan | None = None
    stats: DecodeStats = dataclasses.field(default_factory=DecodeStats)
    plans: list[PlanRecord] = dataclasses.field(default_factory=list)
    controller: DraftController | None = None
    ngrams: NgramIndex | None = None
    started: float = dataclasses.field(default_factory=time.perf_counter)
    num_prefilled: int = 0  # prompt tokens whose KV the slot holds
    piece_tokens: int | None = None  # the next prefill piece's size, where a scheduler sets it (else the config's)
    token_id: int | None = None  # the newest emitted token, not yet run through the model
    position: int = 0  # where token_id will be processed
    round: RoundPlan | None = None
    # The first plan request (the prompt's last hidden states), held until the request first drafts
    # with the model: one that never does (plain steps in a large batch) costs no DP.
    first_plan_input: "object | None" = None  # clasp.plan_exchange.PlanInput
    result: "object | None" = None  # clasp.decoding.GenerationResult once finished

    @property
    def prefilling(self) -> bool:
        return self.token_id is None

    @property
    def finished(self) -> bool:
        return self.out.finish_reason is not None

    @property
    def draft_budget(self) -> int:
        """Tokens that may be drafted this round (0 in ar mode or when one token is left)."""
        if not self.schedule.speculative:
            return 0
        return min(self.config.max_draft_length, self.max_new_tokens - len(self.out.token_ids) - 1)
