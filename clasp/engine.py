"""The engine: a loaded model, its tokenizer and a decoding config, behind one small API."""

from __future__ import annotations

import logging
import os
from typing import Iterator, Sequence

import torch

from clasp.config import ClaspConfig, SamplingParams
from clasp.decoding import Chunk, GenerationResult, generate
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


def _set_up_draft(runner: ModelRunner, config: ClaspConfig, fused_draft: bool | None) -> None:
    """Give the runner its draft copy per config.draft_dtype, through the fused kernel where wanted."""
    from clasp.cpu_draft import cpu_has_vnni

    draft_dtype = config.draft_torch_dtype(runner.device.type)
    if fused_draft and (draft_dtype != torch.int8 or runner.device.type != "cpu"):
        raise ValueError(f"fused_draft needs an int8 draft copy on CPU, not {draft_dtype} on {runner.device.type}")
    auto = fused_draft is None
    if auto:
        fused_draft = (draft_dtype == torch.int8 and runner.device.type == "cpu" and runner.dtype == torch.float32
                       and runner.weights.layers[0].q_norm is None and cpu_has_vnni())
    if fused_draft:
        try:
            runner.enable_fused_draft(vnni=cpu_has_vnni())
            return
        except (RuntimeError, ValueError) as e:
            if not auto:
                raise ValueError(f"fused_draft: {e}") from e
            log.warning("the fused CPU draft is unavailable (%s): drafting through torch ops", e)
    try:
        runner.set_draft_dtype(draft_dtype)
    except ValueError:
        if config.draft_dtype != "auto":
            raise
        log.warning("no int8 kernel in this torch build: the draft copy falls back to float16")
        runner.set_draft_dtype(torch.float16)


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer, config: ClaspConfig, eos_ids: frozenset[int],
                 model_name: str) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = config
        self.eos_ids = eos_ids
        self.model_name = model_name

    @classmethod
    def load(cls, model_path: str | os.PathLike | None = None, config: ClaspConfig | None = None,
             device: str | None = None, dtype: str | None = None, pack_weights: bool | None = None,
             fused_draft: bool | None = None) -> "Engine":
        """pack_weights: keep a oneDNN-prepacked copy of the fp32 weights for verification
        (ModelRunner.pack_weights). None: where available and the copy fits in a quarter of
        physical memory; True where unavailable is an error.
        fused_draft: run an int8 CPU draft through the one-call C++ kernel (clasp.cpu_draft).
        None: for an fp32 model on a CPU with AVX-512 VNNI, falling back to torch ops with a
        warning if the kernel cannot be built; True: required (portable loops without VNNI)."""
        config = config or ClaspConfig()
        dev = resolve_device(device)
        model, tokenizer = load_model(model_path, resolve_dtype(dtype, dev), dev)
        eos = model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        runner = ModelRunner.from_hf(model, release=True)
        _set_up_draft(runner, config, fused_draft)
        if pack_weights is None:
            pack_weights = (ModelRunner.packing_available(runner.device, runner.dtype)
                            and runner.weights.nbytes() <= physical_memory() // 4)
        if pack_weights:
            runner.pack_weights()
        config.skip_count(runner.spec.num_layers, runner.draft_has_copy)  # validate M against this model now
        if config.static_skip_set is not None:
            config.static_skips(runner.spec.num_layers, runner.draft_has_copy)
        return cls(runner, tokenizer, config, frozenset(eos_ids), model_identity(model_path))

    @property
    def identity(self) -> str:
        """What a plan must match to be applied: model name and shape."""
        s = self.runner.spec
        return f"{self.model_name}:{s.num_layers}x{s.hidden_size}:{s.vocab_size}"

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
