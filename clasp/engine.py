"""The engine: a loaded model, its tokenizer and a decoding config, behind one small API."""

from __future__ import annotations

import json
import logging
import os
from typing import Iterator, Sequence

import torch

from clasp import backends, checkpoint, draft_kernels
from clasp.backends.base import LoadOptions
from clasp.chat import chat_prompt_ids
from clasp.config import ClaspConfig, SamplingParams
from clasp.decoding import Chunk, GenerationResult, generate
from clasp.draft_kernels import DraftKernelChoice
from clasp.loading import (SUPPORTED_MODEL_TYPES, eos_token_ids, load_model, load_tokenizer, model_dir,
                           model_identity, resolve_device, resolve_dtype)
from clasp.model_runner import ModelRunner
from clasp.plan_exchange import PlanExchange
from clasp.planner import LayerPlan

log = logging.getLogger(__name__)


def shaped_identity(model_name: str, spec) -> str:
    """Model name and shape: what a plan must match, and what a calibration is kept for."""
    return f"{model_name}:{spec.num_layers}x{spec.hidden_size}:{spec.vocab_size}"


def load_runner(model_path: str | os.PathLike | None, dtype: torch.dtype, device: torch.device):
    """(runner, tokenizer, eos ids) for a model directory (the embedded model when None): read
    directly from its safetensors where clasp.checkpoint covers it, else through transformers."""
    path = model_dir(model_path)
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model type {config.get('model_type')!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    tokenizer = load_tokenizer(path)
    runner = checkpoint.load_runner(path, config, dtype, device)
    if runner is None:
        log.info("loading %s through transformers (a checkpoint layout or rotary scaling clasp.checkpoint "
                 "does not read)", path)
        model, _ = load_model(path, dtype, device)
        runner = ModelRunner.from_hf(model, release=True)
    return runner, tokenizer, eos_token_ids(path, config, tokenizer)


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
             fused_draft: bool | None = None, draft_kernel: str | None = None,
             fp32_kernel: str | None = None) -> "Engine":
        """The model's matrices, multi-row copy and draft copy are chosen by the device's backend
        (clasp.backends) from these options.
        pack_weights: keep a oneDNN-prepacked copy of the fp32 weights for verification
        (clasp.backends.cpu.pack_weights). None: where available and the copy fits in a quarter of
        physical memory; True where unavailable is an error.
        fused_draft: an int8 CPU draft's kernel is chosen at load by timing and an accuracy check
        (clasp.draft_kernels); None: among all this machine can run, True: among the one-call
        C++ draft's instruction sets only, False: among torch ops' only.
        draft_kernel: exactly this one of draft_kernels.DRAFT_KERNELS (still measured and logged).
        fp32_kernel: the fp32 CPU model's few-row products and plain step (clasp.fp32_kernels): None
        chosen by timing and an accuracy check, "torch" torch's own, "clasp-<isa>" the blocked kernel
        in that instruction set for every few-row product."""
        config = config or ClaspConfig()
        dev = resolve_device(device)
        runner, tokenizer, eos_ids = load_runner(model_path, resolve_dtype(dtype, dev), dev)
        calibration_ids = torch.tensor(tokenizer(draft_kernels.CALIBRATION_TEXT)["input_ids"], device=runner.device)
        backend = backends.for_device(runner.device)
        options = LoadOptions(config.draft_torch_dtype(runner.device.type), config.draft_dtype, pack_weights,
                              fused_draft, draft_kernel, fp32_kernel, calibration_ids,
                              shaped_identity(model_identity(model_path), runner.spec))
        choice = backend.prepare(runner, options)
        runner.backend = backend
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
            return chat_prompt_ids(self.tokenizer, msgs)  # template markup inside content stays text
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
