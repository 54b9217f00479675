"""How the decode loop gets its layer plans: a small non-blocking interface.

The decoder hands re-plan requests over with `submit` and picks up the newest plan with `poll`
between verification rounds; neither call may wait for planning. `LocalPlanner` plans
synchronously on the decoder's own cache (the in-process engine); the decoder service plugs
in one that goes through Redis to the planner service (serving.plan_wire is how the request
and the plan travel; the core knows no key names and no protobuf).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from clasp.kv_cache import KVCache
from clasp.model_runner import ModelRunner
from clasp.planner import LayerPlan, plan_layers


@dataclasses.dataclass
class PlanInput:
    """What a planner needs to re-plan at verification round `step`."""

    step: int
    hidden: torch.Tensor  # [L+1, hidden], the full model's h_0..h_L of the last accepted token
    position: int  # that token's position
    token_ids: list[int]  # the tokens at positions 0..position (context plus the token itself)
    max_skip: int  # plan skip sets for j = 0..max_skip


class PlanExchange(Protocol):
    def submit(self, request: PlanInput) -> None:
        """Hand a re-plan request over. Must not wait for the plan."""

    def poll(self) -> LayerPlan | None:
        """The newest plan not returned before, or None. Must not wait."""


class LocalPlanner:
    """Plans synchronously in-process, on the request's own KV slot (no context rebuild)."""

    def __init__(self, runner: ModelRunner, cache: KVCache, slot: int = 0) -> None:
        self.runner = runner
        self.cache = cache
        self.slot = slot
        self._plan: LayerPlan | None = None

    def submit(self, request: PlanInput) -> None:
        self._plan, _ = plan_layers(self.runner, self.cache, request.hidden, request.position, request.max_skip,
                                    step=request.step, slot=self.slot)

    def poll(self) -> LayerPlan | None:
        plan, self._plan = self._plan, None
        return plan
