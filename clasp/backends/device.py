"""The backend for torch devices other than the CPU (CUDA, MPS): dense matrices, a draft copy in
a smaller float dtype (or int8 through torch's int8-weight kernel where it runs), and on CUDA a
16-bit lm_head that writes fp32 logits. The GPU issue's CUDA graphs and measured costs build on it."""

from __future__ import annotations

import torch

from clasp.backends.base import CostModel, LoadOptions
from clasp.matrices import DenseMatrix, Fp32LogitsMatrix
from clasp.model_runner import ModelRunner


class DeviceBackend:
    name = "device"

    def prepare(self, runner: ModelRunner, options: LoadOptions):
        if options.fused_draft is not None or options.draft_kernel is not None:
            what = "fused_draft" if options.draft_kernel is None else "draft_kernel"
            raise ValueError(f"{what} needs an int8 draft copy on CPU, not {options.draft_dtype} on {runner.device.type}")
        runner.set_draft_dtype(options.draft_dtype)  # raises ValueError where there is no int8 kernel
        if options.pack_weights:
            raise ValueError("weight packing needs an fp32 model on a CPU with oneDNN (torch.backends.mkldnn)")
        if runner.device.type == "cuda":
            for weights in {id(w): w for w in (runner.weights, runner.draft_weights)}.values():
                head = weights.lm_head
                if isinstance(head, DenseMatrix) and head.dtype in (torch.float16, torch.bfloat16):
                    weights.lm_head = Fp32LogitsMatrix(head.weight)
        return None

    def cost_model(self, runner: ModelRunner) -> CostModel:
        """An extra verified row is nearly free next to a step that reads every weight (to be measured
        at load on the device: the GPU issue)."""
        return CostModel(1.0 / runner.weights.nbytes(), 1.0, 0.01, 0.01)

    def describe(self) -> dict:
        return {"backend": self.name}
