"""What every backend provides (clasp.backends)."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from clasp.matrices import nbytes


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """The load-time choices a backend acts on (Engine.load's arguments)."""

    draft_dtype: "torch.dtype | None"  # the draft copy's dtype (None: the draft shares the full weights)
    draft_dtype_name: str | None  # as configured ("auto", "int8", ...), for error messages
    pack_weights: bool | None = None  # CPU: a oneDNN-prepacked copy for 3+ rows; None: where it pays and fits
    fused_draft: bool | None = None  # CPU int8 draft: None any kernel, True the fused C++ draft's, False torch ops'
    draft_kernel: str | None = None  # CPU int8 draft: exactly this kernel (config.DRAFT_KERNELS)
    fp32_kernel: str | None = None  # CPU fp32 few-row products: None measured among all, else one of fp32_kernels.FP32_KERNELS
    calibration_ids: torch.Tensor | None = None  # [T] token ids of draft_kernels.CALIBRATION_TEXT
    model_identity: str = ""  # what a cached calibration is kept for


@dataclasses.dataclass(frozen=True)
class CostModel:
    """Relative costs for choosing draft lengths without timings (seeded sampling, where choices must
    not depend on timing): in units of a plain decoding step."""

    per_draft_byte: float  # cost of reading one weight byte in a draft token
    step: float  # a plain step (1.0)
    first_extra_row: float  # the first verification row beyond one
    extra_row: float  # each further row

    def as_tuple(self) -> tuple[float, float, float, float]:
        return self.per_draft_byte, self.step, self.first_extra_row, self.extra_row


class Backend(Protocol):
    name: str

    def prepare(self, runner, options: LoadOptions):
        """Give `runner` its matrix kinds, multi-row copy and draft copy. Returns the draft kernel
        choice (clasp.draft_kernels.DraftKernelChoice) where one was measured, else None."""

    def cost_model(self, runner) -> CostModel:
        """Costs for the controller's fixed-cost mode."""

    def describe(self) -> dict:
        """What was chosen and measured, for logs."""


def draft_token_bytes(runner, num_skip: int) -> float:
    """Weight bytes a draft token reads with num_skip layers skipped: what it costs on memory-bound hardware."""
    draft = runner.draft_weights
    return float(draft.layer_nbytes() * (runner.spec.num_layers - num_skip) + nbytes(draft.lm_head))
