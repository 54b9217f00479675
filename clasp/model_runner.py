"""A Llama-family forward pass that can skip decoder layers.

One runner serves both roles of self-speculative decoding: the full model (verification,
prefill, plain decoding) and the draft (the same layers minus a skip set, optionally over a
lower-precision copy of the weights). Weights are taken from a loaded Hugging Face model
and re-laid out for single-token speed: fused QKV and gate/up projections.

Terms: a *hidden state* h_i is the residual stream after layer i (h_0 is the embedding),
matching Hugging Face's `output_hidden_states`.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn.functional as F

from clasp.kv_cache import KVCache


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    max_context: int  # positions the model supports (the context window)


@dataclasses.dataclass
class LayerWeights:
    qkv: torch.Tensor  # [(heads + 2 * kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None  # [(heads + 2 * kv_heads) * head_dim] (Qwen2)
    o: torch.Tensor  # [hidden, heads * head_dim]
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor  # [hidden, intermediate]
    input_norm: torch.Tensor  # [hidden]
    post_norm: torch.Tensor  # [hidden]
    q_norm: torch.Tensor | None = None  # [head_dim] (Qwen3)
    k_norm: torch.Tensor | None = None  # [head_dim] (Qwen3)

    def to(self, dtype: torch.dtype) -> "LayerWeights":
        return LayerWeights(**{
            f.name: (None if getattr(self, f.name) is None else getattr(self, f.name).to(dtype))
            for f in dataclasses.fields(self)
        })


@dataclasses.dataclass
class Weights:
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]

    def to(self, dtype: torch.dtype) -> "Weights":
        """A copy in another dtype (the draft copy); matmuls cast activations to it and back."""
        return Weights([lw.to(dtype) for lw in self.layers], self.final_norm.to(dtype), self.lm_head.to(dtype))

    def nbytes(self) -> int:
        tensors = [self.final_norm, self.lm_head]
        for lw in self.layers:
            tensors += [getattr(lw, f.name) for f in dataclasses.fields(lw)]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


FEW_ROWS = 16  # up to this many rows, (w @ x.T).T beats F.linear on CPU (README, performance notes)


# Whether a single fp32 row on CPU is computed as two rows (set once by calibrate_single_row()).
# On the dev CPU, MKL's matrix-vector kernel streams weights at ~10 GB/s and its two-column
# matrix product at ~30 GB/s: all the model's matrices took 50 ms one way and 16 ms the other
# (docs/performance.md). Other CPUs and BLAS builds may differ, so it is measured, not assumed.
_PAD_SINGLE_ROW: bool | None = None


def calibrate_single_row(repeats: int = 5) -> bool:
    """Once per process: time one row against two on a 64 MiB fp32 matrix (larger than CPU
    caches, like a model's weights; best of `repeats`) and use the faster for every fp32 1-row
    CPU product from then on. A property of the CPU and BLAS, not of a model. Returns the choice."""
    global _PAD_SINGLE_ROW
    if _PAD_SINGLE_ROW is None:
        w = torch.ones(16384, 1024)
        x = torch.ones(1, 1024)
        x2 = torch.cat([x, x])

        def best(inputs: torch.Tensor) -> float:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                w @ inputs.T
                times.append(time.perf_counter() - t0)
            return min(times)

        with torch.inference_mode():
            best(x2)  # first-call costs
            _PAD_SINGLE_ROW = best(x2) < 0.8 * best(x)
    return _PAD_SINGLE_ROW


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ w[out, in].T in w's dtype, returned in x's dtype.

    For the few rows of decoding and verification this is computed as (w @ x.T).T: on CPU this
    torch build's F.linear is 2-3x slower there (and on the large lm_head). For prefill-sized
    inputs F.linear is faster (1200 rows: 2.4 s vs 3.9 s for the whole model). A single fp32 row
    on CPU may be computed as two (see _PAD_SINGLE_ROW); fp16 is faster as one row.
    """
    xw = x.to(w.dtype)
    if x.shape[0] == 1 and _PAD_SINGLE_ROW and w.dtype == torch.float32 and w.device.type == "cpu":
        out = (w @ torch.cat([xw, xw]).T).T[:1]
    elif x.shape[0] <= FEW_ROWS:
        out = (w @ xw.T).T.contiguous()
    else:
        out = F.linear(xw, w)
    out = out.to(x.dtype)
    return out if bias is None else out + bias.to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(x.dtype) * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class ModelRunner:
    """Runs embeddings, a subset of decoder layers, the final norm and the lm_head."""

    def __init__(self, spec: ModelSpec, embed: torch.Tensor, weights: Weights, rotary: torch.nn.Module,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.spec = spec
        self.embed = embed  # [vocab, hidden]
        self.weights = weights
        self.draft_weights = weights  # replaced by set_draft_dtype
        self.rotary = rotary  # the model's own rotary module: handles every rope scaling type
        self.device = device
        self.dtype = dtype
        self._rope_cos = torch.empty(0, spec.head_dim, device=device, dtype=dtype)
        self._rope_sin = torch.empty(0, spec.head_dim, device=device, dtype=dtype)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_hf(cls, model: torch.nn.Module, release: bool = True) -> "ModelRunner":
        """Re-lay out a loaded Hugging Face Llama/Mistral/Qwen2/Qwen3 model.

        With release=True each HF layer is dropped once fused, so peak memory stays one layer
        above the model's size (that matters for 8B+ models).
        """
        config = model.config
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported activation {config.hidden_act!r} (only silu)")
        base = model.model
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        max_context = config.max_position_embeddings
        window = getattr(config, "sliding_window", None)
        if window and (config.model_type == "mistral" or getattr(config, "use_sliding_window", False)):
            max_context = min(max_context, window)  # sliding-window attention is not implemented
        spec = ModelSpec(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
            rms_norm_eps=config.rms_norm_eps,
            max_context=max_context,
        )
        layers = []
        for i in range(spec.num_layers):
            hf = base.layers[i]
            attn, mlp = hf.self_attn, hf.mlp
            biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
            layers.append(LayerWeights(
                qkv=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach(),
                qkv_bias=None if biases[0] is None else torch.cat(biases).detach(),
                o=attn.o_proj.weight.detach(),
                gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(),
                down=mlp.down_proj.weight.detach(),
                input_norm=hf.input_layernorm.weight.detach(),
                post_norm=hf.post_attention_layernorm.weight.detach(),
                q_norm=attn.q_norm.weight.detach() if hasattr(attn, "q_norm") else None,
                k_norm=attn.k_norm.weight.detach() if hasattr(attn, "k_norm") else None,
            ))
            if release:
                base.layers[i] = torch.nn.Identity()
        weights = Weights(layers, base.norm.weight.detach(), model.lm_head.weight.detach())
        param = base.embed_tokens.weight
        if param.device.type == "cpu" and param.dtype == torch.float32:
            calibrate_single_row()
        return cls(spec, param.detach(), weights, base.rotary_emb, param.device, param.dtype)

    def set_draft_dtype(self, dtype: torch.dtype | None) -> None:
        """Give the draft its own weight copy in `dtype`, or share the full weights (None or
        a dtype no smaller than the model's, where a copy would save nothing)."""
        if dtype is None or torch.finfo(dtype).bits >= torch.finfo(self.dtype).bits:
            self.draft_weights = self.weights
        else:
            self.draft_weights = self.weights.to(dtype)

    @property
    def draft_has_copy(self) -> bool:
        return self.draft_weights is not self.weights

    def new_cache(self, max_length: int) -> KVCache:
        if max_length > self.spec.max_context:
            raise ValueError(f"cache length {max_length} exceeds the context window {self.spec.max_context}")
        self._ensure_rope(max_length)
        s = self.spec
        return KVCache(s.num_layers, s.num_kv_heads, s.head_dim, max_length, self.dtype, self.device)

    def _ensure_rope(self, length: int) -> None:
        if self._rope_cos.shape[0] >= length:
            return
        length = min(self.spec.max_context, max(length, 2 * self._rope_cos.shape[0]))
        positions = torch.arange(length, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=self.dtype)
        cos, sin = self.rotary(probe, positions)  # [1, length, head_dim], attention scaling applied
        self._rope_cos, self._rope_sin = cos[0].to(self.dtype), sin[0].to(self.dtype)

    # ----------------------------------------------------------------- forward
    @torch.inference_mode()
    def forward(
        self,
        token_ids: torch.Tensor,  # [T] int64
        cache: KVCache,
        start: int,
        skip_set: frozenset[int] = frozenset(),
        draft: bool = False,
        last_only: bool = False,
        hidden_states: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run tokens at positions start..start+T; return logits [T or 1, vocab] in float32.

        Skipped layers write no KV; everything else writes its KV at the tokens' positions
        and sets the cache's valid length to start+T. If hidden_states is a list, h_0..h_L
        ([T, hidden] each) are appended to it (skipped layers repeat the previous state).
        """
        weights = self.draft_weights if draft else self.weights
        num_tokens = token_ids.shape[0]
        x = F.embedding(token_ids, self.embed)  # [T, hidden]
        cos = self._rope_cos[start:start + num_tokens]  # [T, head_dim]
        sin = self._rope_sin[start:start + num_tokens]
        mask = None
        if num_tokens > 1 and start > 0:  # causal within the new tokens; earlier positions all visible
            key_pos = torch.arange(start + num_tokens, device=self.device)
            query_pos = torch.arange(start, start + num_tokens, device=self.device)
            mask = key_pos[None, :] <= query_pos[:, None]  # [T, start+T]
        if hidden_states is not None:
            hidden_states.append(x)
        for i, lw in enumerate(weights.layers):
            if i not in skip_set:
                x = self._layer(x, lw, i, cache, start, cos, sin, mask)
            if hidden_states is not None:
                hidden_states.append(x)
        cache.length = start + num_tokens
        if last_only:
            x = x[-1:]
        return linear(rms_norm(x, weights.final_norm, self.spec.rms_norm_eps), weights.lm_head).float()

    def _attention_inputs(self, x: torch.Tensor, lw: LayerWeights, cos: torch.Tensor, sin: torch.Tensor):
        """Project x [N, hidden] to rotated q [N, heads, hd] and k, v [N, kv_heads, hd]."""
        s = self.spec
        n = x.shape[0]
        qkv = linear(rms_norm(x, lw.input_norm, s.rms_norm_eps), lw.qkv, lw.qkv_bias)
        q, k, v = qkv.split([s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim,
                             s.num_kv_heads * s.head_dim], dim=-1)
        q = q.view(n, s.num_heads, s.head_dim)
        k = k.view(n, s.num_kv_heads, s.head_dim)
        v = v.view(n, s.num_kv_heads, s.head_dim)
        if lw.q_norm is not None:
            q = rms_norm(q, lw.q_norm, s.rms_norm_eps)
            k = rms_norm(k, lw.k_norm, s.rms_norm_eps)
        cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin, v

    def _mlp_block(self, x: torch.Tensor, attn: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
        """Residual adds of attention output and the MLP: x [N, hidden], attn [N, heads*hd]."""
        x = x + linear(attn, lw.o)
        gate, up = linear(rms_norm(x, lw.post_norm, self.spec.rms_norm_eps), lw.gate_up).chunk(2, dim=-1)
        return x + linear(F.silu(gate) * up, lw.down)

    def _layer(self, x, lw, layer, cache, start, cos, sin, mask) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self._attention_inputs(x, lw, cos, sin)
        keys, values = cache.write(layer, start, k.transpose(0, 1)[None], v.transpose(0, 1)[None])
        # A prefill (start 0, several tokens) is plainly causal: the kernel's causal path is
        # much faster than an explicit mask (0.7 s of a 2.4 s 1200-token prefill otherwise).
        causal = mask is None and n > 1
        attn = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values, attn_mask=mask,
                                              is_causal=causal, enable_gqa=True)  # [1, heads, T, hd]
        return self._mlp_block(x, attn[0].transpose(0, 1).reshape(n, -1), lw)

    @torch.inference_mode()
    def layer_candidates(self, states: torch.Tensor, layer: int, cache: KVCache, position: int,
                         draft: bool = False) -> torch.Tensor:
        """Apply one layer to B candidate states of the same token, in one batched call.

        states [B, hidden] are alternative hidden states of the token at `position`. Each
        attends over the shared context KV (positions < position, from the cache) plus its
        own key/value; nothing is written to the cache. This is the sequence-parallel step
        of the DP: all skip counts j at layer i are evaluated together.
        """
        s = self.spec
        lw = (self.draft_weights if draft else self.weights).layers[layer]
        b = states.shape[0]
        group = s.num_heads // s.num_kv_heads
        cos = self._rope_cos[position:position + 1].expand(b, -1)
        sin = self._rope_sin[position:position + 1].expand(b, -1)
        q, k, v = self._attention_inputs(states, lw, cos, sin)
        q = q.view(b, s.num_kv_heads, group, s.head_dim)  # [B, kv_heads, group, hd]
        ctx_k = cache.keys[layer][0, :, :position]  # [kv_heads, P, hd]
        ctx_v = cache.values[layer][0, :, :position]
        scale = 1.0 / math.sqrt(s.head_dim)
        ctx_scores = torch.einsum("bngd,npd->bngp", q, ctx_k) * scale  # [B, kv_heads, group, P]
        self_scores = torch.einsum("bngd,bnd->bng", q, k)[..., None] * scale  # [B, kv_heads, group, 1]
        probs = torch.softmax(torch.cat([ctx_scores, self_scores], dim=-1).float(), dim=-1).to(q.dtype)
        attn = torch.einsum("bngp,npd->bngd", probs[..., :position], ctx_v) + probs[..., position:] * v[:, :, None]
        return self._mlp_block(states, attn.reshape(b, -1), lw)

    # ----------------------------------------------------------------- reference path
    @torch.inference_mode()
    def layer_single(self, state: torch.Tensor, layer: int, cache: KVCache, position: int) -> torch.Tensor:
        """One layer on one state [1, hidden] through the ordinary decode path (writes the
        cache at `position`: call it on a scratch copy). Used as the DP's naive reference."""
        cos = self._rope_cos[position:position + 1]
        sin = self._rope_sin[position:position + 1]
        return self._layer(state, self.weights.layers[layer], layer, cache, position, cos, sin, None)
