"""A runner straight from a Hugging Face safetensors directory, without building the Hugging Face
model: config.json is read as JSON, the tensors through safetensors, and the rotary tables are
computed here. Importing transformers' modeling code and constructing its model cost most of a
start (seconds; docs/performance.md, "Start-up"); the result is the same runner, tensor for
tensor, as ModelRunner.from_hf (tests/test_checkpoint.py).

Covered: Llama, Mistral, Qwen2 and Qwen3 with the default or Llama 3 rotary scaling, weights in
one or several .safetensors files. Anything else (other rotary scalings, .bin checkpoints)
returns None from load_runner, and the caller loads through transformers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from clasp.matrices import DenseMatrix
from clasp.model_runner import LayerWeights, ModelRunner, ModelSpec, Weights

ROPE_TYPES = ("default", "llama3")


class Rotary:
    """The rotary tables as the runner asks for them: rotary(x, positions [1, L]) -> (cos, sin),
    each [1, L, head_dim] in x's dtype, computed as transformers' rotary modules do."""

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0) -> None:
        self.inv_freq = inv_freq
        self.attention_scaling = attention_scaling

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self.inv_freq.to(x.device)[None, :, None].float().expand(positions.shape[0], -1, 1)
        freqs = (inv @ positions[:, None, :].float()).transpose(1, 2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def inverse_frequencies(params: dict, head_dim: int, partial_rotary_factor: float = 1.0) -> torch.Tensor | None:
    """The rotary inverse frequencies for `params` (clasp.loading.rope_parameters), or None for a
    scaling type not covered here."""
    kind = params.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        return None
    dim = int(head_dim * partial_rotary_factor)
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    if kind == "llama3":
        factor, low, high = float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_context = float(params["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_context / low, old_context / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def _tensor_files(path: Path) -> dict[str, Path] | None:
    """{tensor name: file} for a safetensors checkpoint, None when there is none."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if single.exists():
        from safetensors import safe_open

        with safe_open(str(single), "pt") as f:
            return {name: single for name in f.keys()}
    return None


def load_runner(path: Path, config: dict, dtype: torch.dtype, device: torch.device) -> ModelRunner | None:
    """The runner for the checkpoint at `path` (config: its config.json), or None where this
    module does not cover it. Each layer's tensors are read, fused and moved to `device` in
    turn, so peak memory stays about one layer above the model's size."""
    from safetensors import safe_open

    from clasp.loading import rope_parameters

    required = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size", "rms_norm_eps",
                "max_position_embeddings")
    if any(config.get(key) is None for key in required) or config.get("partial_rotary_factor", 1.0) != 1.0:
        return None  # defaults and partial rotary: transformers knows them
    spec = ModelSpec.from_config(lambda key, default=None: config.get(key, default))
    inv_freq = inverse_frequencies(rope_parameters(config), spec.head_dim)
    files = _tensor_files(path)
    if inv_freq is None or files is None:
        return None
    names = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{name}" for i in range(spec.num_layers)
        for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                     "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                     "input_layernorm.weight", "post_attention_layernorm.weight")]
    if any(name not in files for name in names):
        return None  # another naming scheme: transformers maps it
    handles = {}

    def get(name: str) -> torch.Tensor:
        file = files[name]
        if file not in handles:
            handles[file] = safe_open(str(file), "pt")
        return handles[file].get_tensor(name).to(device=device, dtype=dtype)

    def optional(name: str) -> torch.Tensor | None:
        return get(name) if name in files else None

    layers = []
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        biases = [optional(attn + f"{x}_proj.bias") for x in "qkv"]
        layers.append(LayerWeights(
            qkv=DenseMatrix(torch.cat([get(attn + f"{x}_proj.weight") for x in "qkv"])),
            qkv_bias=None if biases[0] is None else torch.cat(biases),
            o=DenseMatrix(get(attn + "o_proj.weight")),
            gate_up=DenseMatrix(torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")])),
            down=DenseMatrix(get(p + "mlp.down_proj.weight")),
            input_norm=get(p + "input_layernorm.weight"),
            post_norm=get(p + "post_attention_layernorm.weight"),
            q_norm=optional(attn + "q_norm.weight"),
            k_norm=optional(attn + "k_norm.weight"),
        ))
    embed = get("model.embed_tokens.weight")
    tied = config.get("tie_word_embeddings", False) or "lm_head.weight" not in files
    lm_head = embed if tied else get("lm_head.weight")
    weights = Weights(layers, get("model.norm.weight"), DenseMatrix(lm_head))
    return ModelRunner(spec, embed, weights, Rotary(inv_freq), device, dtype)
