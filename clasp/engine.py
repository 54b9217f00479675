"""The engine: a loaded model, its tokenizer and a decoding config, behind one small API."""

from __future__ import annotations

import logging
import os
from typing import Iterator, Sequence

import torch

from clasp.config import ClaspConfig, SamplingParams
from clasp import draft_kernels
from clasp.decoding import Chunk, GenerationResult, generate
from clasp.draft_kernels import DraftKernelChoice
from clasp.loading import load_model, model_identity, resolve_device, resolve_dtype
from clasp.model_runner import ModelRunner
from clasp.plan_exchange import PlanExchange
from clasp.planner import LayerPlan

log = logging.getLogger(__name__)


def physical_memory() -> int:
    """Bytes of memory this process may use: physical memory, or the cgroup (container) limit
    when lower. 0 where the OS does not say."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
        break
    return total


def _set_up_draft(runner: ModelRunner, config: ClaspConfig, fused_draft: bool | None, draft_kernel: str | None,
                  calibration_ids: torch.Tensor, model_identity: str) -> DraftKernelChoice | None:
    """Give the runner its draft copy per config.draft_dtype. An int8 copy on CPU gets the kernel
    chosen by measurement (clasp.draft_kernels) among those allowed: all (fused_draft None), the
    fused C++ draft's (True), torch ops' (False), or exactly `draft_kernel`."""
    draft_dtype = config.draft_torch_dtype(runner.device.type)
    forced = fused_draft is not None or draft_kernel is not None
    if forced and (draft_dtype != torch.int8 or runner.device.type != "cpu"):
        what = "fused_draft" if draft_kernel is None else "draft_kernel"
        raise ValueError(f"{what} needs an int8 draft copy on CPU, not {draft_dtype} on {runner.device.type}")
    if draft_dtype != torch.int8 or runner.device.type != "cpu":
        runner.set_draft_dtype(draft_dtype)  # raises ValueError where there is no int8 kernel
        return None
    names = draft_kernels.available(runner)
    if draft_kernel is not None:
        if draft_kernel not in draft_kernels.DRAFT_KERNELS:
            raise ValueError(f"draft_kernel must be one of {', '.join(draft_kernels.DRAFT_KERNELS)}, "
                             f"got {draft_kernel!r}")
        if draft_kernel not in names:
            raise ValueError(f"draft_kernel {draft_kernel} cannot run here (available: {', '.join(names) or 'none'})")
        names = [draft_kernel]
    elif fused_draft is not None:
        names = [n for n in names if (n in draft_kernels.FUSED) == fused_draft]
        if not names and fused_draft:
            raise ValueError("fused_draft: the fused CPU draft cannot run here (no compiled kernel, or a model "
                             "it does not cover: it needs a float32 model without q/k norms)")
    try:
        return draft_kernels.choose_cached(runner, calibration_ids, names, model_identity)
    except ValueError as e:
        if forced:
            raise
        if config.draft_dtype != "auto":
            raise ValueError(f"draft_dtype int8 is not supported on cpu by this torch build ({e}); "
                             f"use float16 or bfloat16") from e
        log.warning("no int8 kernel runs here (%s): the draft copy falls back to float16", e)
        runner.set_draft_dtype(torch.float16)
        return None


def shaped_identity(model_name: str, spec) -> str:
    """Model name and shape: what a plan must match, and what a calibration is kept for."""
    return f"{model_name}:{spec.num_layers}x{spec.hidden_size}:{spec.vocab_size}"


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer, config: ClaspConfig, eos_ids: frozenset[int],
                 model_name: str, draft_kernel: DraftKernelChoice | None = None) -> None:
        self.runner = runner
        self.draft_kernel = draft_kernel  # how the int8 CPU draft's kernel was chosen (None: no such draft)
        self.tokenizer = tokenizer
        self.config = config
        self.eos_ids = eos_ids
        self.model_name = model_name

    @classmethod
    def load(cls, model_path: str | os.PathLike | None = None, config: ClaspConfig | None = None,
             device: str | None = None, dtype: str | None = None, pack_weights: bool | None = None,
             fused_draft: bool | None = None, draft_kernel: str | None = None) -> "Engine":
        """pack_weights: keep a oneDNN-prepacked copy of the fp32 weights for verification
        (ModelRunner.pack_weights). None: where available and the copy fits in a quarter of
        physical memory; True where unavailable is an error.
        fused_draft: an int8 CPU draft's kernel is chosen at load by timing and an accuracy check
        (clasp.draft_kernels); None: among all this machine can run, True: among the one-call
        C++ draft's instruction sets only, False: among torch ops' only.
        draft_kernel: exactly this one of draft_kernels.DRAFT_KERNELS (still measured and logged)."""
        config = config or ClaspConfig()
        dev = resolve_device(device)
        model, tokenizer = load_model(model_path, resolve_dtype(dtype, dev), dev)
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        runner = ModelRunner.from_hf(model, release=True)
        calibration_ids = torch.tensor(tokenizer(draft_kernels.CALIBRATION_TEXT)["input_ids"], device=runner.device)
        choice = _set_up_draft(runner, config, fused_draft, draft_kernel, calibration_ids,
                               shaped_identity(model_identity(model_path), runner.spec))
        if pack_weights is None:
            pack_weights = (ModelRunner.packing_available(runner.device, runner.dtype)
                            and runner.weights.nbytes() <= physical_memory() // 4)
        if pack_weights:
            runner.pack_weights()
        config.skip_count(runner.spec.num_layers, runner.draft_has_copy)  # validate M against this model now
        if config.static_skip_set is not None:
            config.static_skips(runner.spec.num_layers, runner.draft_has_copy)
        return cls(runner, tokenizer, config, frozenset(eos_ids), model_identity(model_path), choice)

    @property
    def identity(self) -> str:
        """What a plan must match to be applied: model name and shape."""
        return shaped_identity(self.model_name, self.runner.spec)

    def encode(self, prompt: str | None = None, messages: Sequence[dict] | None = None, chat: bool = True) -> list[int]:
        """Token ids for raw text (chat=False), or for a chat prompt through the model's template."""
        if (prompt is None) == (messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if prompt is not None and not prompt.strip():
            raise ValueError("prompt is empty")
        if messages is not None or (chat and self.tokenizer.chat_template):
            msgs = list(messages) if messages is not None else [{"role": "user", "content": prompt}]
            if not msgs:
                raise ValueError("messages is empty")
            for i, m in enumerate(msgs):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise ValueError(f"messages[{i}] must have string 'role' and 'content'")
            ids = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "input_ids") or isinstance(ids, dict):
                ids = ids["input_ids"]
            return list(ids)
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def stream(self, prompt_ids: list[int], params: SamplingParams, config: ClaspConfig | None = None,
               initial_plan: LayerPlan | None = None, plan_exchange: PlanExchange | None = None) -> Iterator[Chunk]:
        return generate(self.runner, self.tokenizer, prompt_ids, params, config or self.config, self.eos_ids,
                        initial_plan, plan_exchange)

    def generate(self, prompt_ids: list[int], params: SamplingParams, config: ClaspConfig | None = None) -> GenerationResult:
        result = None
        for chunk in self.stream(prompt_ids, params, config):
            result = chunk.result
        return result
