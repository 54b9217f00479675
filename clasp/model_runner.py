"""A Llama-family forward pass that can skip decoder layers.

One runner serves both roles of self-speculative decoding: the full model (verification,
prefill, plain decoding) and the draft (the same layers minus a skip set, optionally over a
lower-precision copy of the weights). Weights are taken from a loaded Hugging Face model
and re-laid out for single-token speed: fused QKV and gate/up projections.

This module is model math only: every matrix is an object that multiplies (clasp.matrices), and
which kind each one is was decided at load by a backend (clasp.backends). One forward pass runs
a batch of segments, each a run of tokens of one request at its own KV-cache slot and positions,
with its own skip set; rows of all segments share every matrix product, and each segment attends
only to its own slot.

Terms: a *hidden state* h_i is the residual stream after layer i (h_0 is the embedding),
matching Hugging Face's `output_hidden_states`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from clasp.attention import span_attention
from clasp.kv_cache import KVCache
from clasp.matrices import DenseMatrix, Int8Weight, PackedWeight, nbytes


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

    @classmethod
    def from_config(cls, get) -> "ModelSpec":
        """From a Hugging Face config: get(key, default) reads a field (of a config object, or of
        config.json as a dict)."""
        if (get("hidden_act", "silu") or "silu") != "silu":
            raise ValueError(f"unsupported activation {get('hidden_act')!r} (only silu)")
        num_heads = get("num_attention_heads")
        max_context = get("max_position_embeddings")
        window = get("sliding_window")
        if window and (get("model_type") == "mistral" or get("use_sliding_window", False)):
            max_context = min(max_context, window)  # sliding-window attention is not implemented
        return cls(num_layers=get("num_hidden_layers"), hidden_size=get("hidden_size"), num_heads=num_heads,
                   num_kv_heads=get("num_key_value_heads") or num_heads,
                   head_dim=get("head_dim") or get("hidden_size") // num_heads, vocab_size=get("vocab_size"),
                   rms_norm_eps=get("rms_norm_eps"), max_context=max_context)


MATRICES = ("qkv", "o", "gate_up", "down")  # the LayerWeights fields that are matrices


@dataclasses.dataclass
class LayerWeights:
    """One decoder layer. Matrices are matrix objects (clasp.matrices); norms and biases are tensors."""

    qkv: DenseMatrix  # [(heads + 2 * kv_heads) * head_dim, hidden]
    qkv_bias: torch.Tensor | None  # [(heads + 2 * kv_heads) * head_dim] (Qwen2)
    o: DenseMatrix  # [hidden, heads * head_dim]
    gate_up: DenseMatrix  # [2 * intermediate, hidden]
    down: DenseMatrix  # [hidden, intermediate]
    input_norm: torch.Tensor  # [hidden]
    post_norm: torch.Tensor  # [hidden]
    q_norm: torch.Tensor | None = None  # [head_dim] (Qwen3)
    k_norm: torch.Tensor | None = None  # [head_dim] (Qwen3)

    def to(self, dtype: torch.dtype) -> "LayerWeights":
        """A copy with dense matrices in `dtype`; norms and biases stay (shared; norms run in the
        activations' dtype anyway)."""
        return dataclasses.replace(self, **{name: getattr(self, name).to(dtype) for name in MATRICES})

    def int8(self, act_dtype: torch.dtype, cpu_kernel: str = "fbgemm") -> "LayerWeights":
        """A copy with int8 matrices; norms and biases stay as they are (shared)."""
        return dataclasses.replace(self, **{name: Int8Weight.quantize(getattr(self, name), act_dtype, cpu_kernel)
                                            for name in MATRICES})

    def map_matrices(self, fn) -> "LayerWeights":
        """A copy with fn(matrix) for every matrix; norms and biases shared."""
        return dataclasses.replace(self, **{name: fn(getattr(self, name)) for name in MATRICES})


@dataclasses.dataclass
class Weights:
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [hidden]
    lm_head: DenseMatrix  # [vocab, hidden]

    def to(self, dtype: torch.dtype) -> "Weights":
        """A copy in another dtype (the draft copy); matmuls cast activations to it and back."""
        return Weights([lw.to(dtype) for lw in self.layers], self.final_norm, self.lm_head.to(dtype))

    def int8(self, act_dtype: torch.dtype, cpu_kernel: str = "fbgemm") -> "Weights":
        """The draft copy with weight-only int8 matrices (the lm_head too)."""
        return Weights([lw.int8(act_dtype, cpu_kernel) for lw in self.layers], self.final_norm,
                       Int8Weight.quantize(self.lm_head, act_dtype, cpu_kernel))

    def map_matrices(self, fn) -> "Weights":
        """A copy with fn(matrix) for every matrix (the lm_head too); norms and biases shared."""
        return Weights([lw.map_matrices(fn) for lw in self.layers], self.final_norm, fn(self.lm_head))

    def matrices(self) -> list:
        """Every matrix: each layer's MATRICES, then the lm_head."""
        return [getattr(lw, name) for lw in self.layers for name in MATRICES] + [self.lm_head]

    def nbytes(self) -> int:
        tensors = [self.final_norm, self.lm_head]
        for lw in self.layers:
            tensors += [getattr(lw, f.name) for f in dataclasses.fields(lw)]
        return sum(nbytes(t) for t in tensors)

    def packed(self) -> "Weights":
        """A copy with oneDNN-prepacked fp32 matrices (PackedWeight); norms and biases shared."""
        return self.map_matrices(PackedWeight.pack)

    def layer_nbytes(self) -> int:
        """Bytes of one layer (the first; all layers have the same shapes)."""
        return sum(nbytes(getattr(self.layers[0], f.name)) for f in dataclasses.fields(self.layers[0]))


@dataclasses.dataclass(frozen=True)
class Segment:
    """A run of one request's tokens in a batched forward pass: token_ids at positions
    start..start+T of KV-cache slot `slot`, through every layer not in skip_set."""

    slot: int
    start: int
    token_ids: torch.Tensor  # [T] int64
    skip_set: frozenset[int] = frozenset()

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)  # one fused op instead of seven
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(x.dtype) * xf.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding x * cos + rotate_half(x) * sin, with rotate_half(x) * sin computed as
    roll(x) * signed_sin (sin with its first half negated): the same products, fewer ops."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


class ModelRunner:
    """Runs embeddings, a subset of decoder layers, the final norm and the lm_head."""

    def __init__(self, spec: ModelSpec, embed: torch.Tensor, weights: Weights, rotary: torch.nn.Module,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.spec = spec
        self.embed = embed  # [vocab, hidden]
        self.weights = weights
        self.draft_weights = weights  # replaced by set_draft_dtype
        self.multi_row_weights = weights  # for 3+ rows (full_weights); replaced by set_multi_row_weights
        self.packed_min_rows = PackedWeight.MIN_ROWS  # rows from which multi_row_weights is used (calibrated)
        self.fused_draft = None  # clasp.cpu_draft.FusedDraft: one C++ call per draft token (enable_fused_draft)
        # clasp.cpu_draft.FusedFp32Step: a one-token pass of the full weights (a plain step, or a draft
        # token where the draft shares them) in one C++ call (enable_fused_step)
        self.fused_step = None
        self.backend = None  # the clasp.backends backend that prepared these weights (None: plain, as loaded)
        # Up to this many requests draft through the fused draft one call each; more share torch ops
        # over the same int8 copy, whose products read the weights once for all rows (the CPU backend
        # measures where that starts to pay).
        self.fused_draft_max_rows = 1
        # Passes of up to this many rows (batched drafts; verification and batched steps: the second,
        # the rows the fp32 kernel was measured faster for) go through the one-call models
        # (fused_draft, fused_step) where there are some; prefill pieces stay on torch's products.
        self.fused_max_rows = 32
        self.fused_step_max_rows = 0
        self.norm = rms_norm  # RMSNorm (x, weight, eps); a backend may install a fused one
        # A backend's static-shape steps (clasp.static_step.StaticSteps, CUDA graphs on CUDA): tried
        # first for the one-token and few-row passes they cover; None: every pass runs eagerly.
        self.static_steps = None
        self.cache_pool = None  # a backend's pool of KV-cache storage that new_cache hands out (None: allocate)
        self.rotary = rotary  # the model's own rotary module: handles every rope scaling type
        self.device = device
        self.dtype = dtype
        self._rope_cos = torch.empty(0, spec.head_dim, device=device, dtype=dtype)
        self._rope_sin = torch.empty(0, spec.head_dim, device=device, dtype=dtype)  # signed: see rope()

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_hf(cls, model: torch.nn.Module, release: bool = True) -> "ModelRunner":
        """Re-lay out a loaded Hugging Face Llama/Mistral/Qwen2/Qwen3 model.

        With release=True each HF layer is dropped once fused, so peak memory stays one layer
        above the model's size (that matters for 8B+ models).
        """
        config = model.config
        spec = ModelSpec.from_config(lambda key, default=None: getattr(config, key, default))
        base = model.model
        layers = []
        for i in range(spec.num_layers):
            hf = base.layers[i]
            attn, mlp = hf.self_attn, hf.mlp
            biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
            layers.append(LayerWeights(
                qkv=DenseMatrix(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()),
                qkv_bias=None if biases[0] is None else torch.cat(biases).detach(),
                o=DenseMatrix(attn.o_proj.weight.detach()),
                gate_up=DenseMatrix(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()),
                down=DenseMatrix(mlp.down_proj.weight.detach()),
                input_norm=hf.input_layernorm.weight.detach(),
                post_norm=hf.post_attention_layernorm.weight.detach(),
                q_norm=attn.q_norm.weight.detach() if hasattr(attn, "q_norm") else None,
                k_norm=attn.k_norm.weight.detach() if hasattr(attn, "k_norm") else None,
            ))
            if release:
                base.layers[i] = torch.nn.Identity()
        weights = Weights(layers, base.norm.weight.detach(), DenseMatrix(model.lm_head.weight.detach()))
        param = base.embed_tokens.weight
        return cls(spec, param.detach(), weights, base.rotary_emb, param.device, param.dtype)

    # ----------------------------------------------------------------- weight copies (made by a backend at load)
    def set_draft_dtype(self, dtype: torch.dtype | None, cpu_kernel: str = "fbgemm") -> None:
        """Give the draft its own weight copy in `dtype`, or share the full weights (None or
        a float dtype no smaller than the model's, where a copy would save nothing).

        torch.int8: weight-only int8 matrices, per output channel, multiplied by `cpu_kernel` on
        CPU (see Int8Weight). Raises ValueError where this torch build has no int8 kernel for
        the device.
        """
        self.fused_draft = None
        if dtype is None:
            self.draft_weights = self.weights
        elif dtype == torch.int8:
            act = self.dtype
            try:
                probe = Int8Weight.quantize(torch.ones(8, 32, device=self.device), act)
                probe(torch.ones(1, 32, device=self.device, dtype=self.dtype))
            except (RuntimeError, NotImplementedError, AttributeError) as e:
                raise ValueError(f"draft_dtype int8 is not supported on {self.device.type} by this torch build "
                                 f"({str(e).splitlines()[0]}); use float16 or bfloat16") from e
            self.draft_weights = self.weights.int8(act, cpu_kernel)
        elif torch.finfo(dtype).bits >= torch.finfo(self.dtype).bits:
            self.draft_weights = self.weights
        else:
            self.draft_weights = self.weights.to(dtype)

    def enable_fused_draft(self, isa: str = "portable") -> None:
        """Draft with an int8 copy of the weights through the one-call C++ kernel (clasp.cpu_draft)
        in instruction set `isa` (cpu_draft.ISAS) instead of torch ops. Replaces any draft copy.
        Raises ValueError for models it does not cover and RuntimeError where the kernel cannot be
        built or the CPU cannot run `isa`."""
        from clasp.cpu_draft import FusedDraft

        if self.device.type != "cpu" or self.dtype != torch.float32:
            raise ValueError(f"the fused draft needs a float32 model on CPU, not {self.dtype} on {self.device.type}")
        if self.weights.layers[0].q_norm is not None:
            raise ValueError("the fused draft does not support models with q/k norms (Qwen3)")
        draft = self.weights.int8(self.dtype, f"clasp-{isa}")
        self.fused_draft = FusedDraft(self.spec, self.embed, draft, isa)
        self.draft_weights = draft

    def enable_fused_step(self, isa: str = "portable") -> None:
        """Run one-token passes of the full weights through the one-call fp32 kernel
        (clasp.cpu_draft.FusedFp32Step) in instruction set `isa`, sharing the matrices' blocked
        copies where they have them. Raises ValueError for models it does not cover and
        RuntimeError where the kernel cannot be built or the CPU cannot run `isa`."""
        from clasp.cpu_draft import FusedFp32Step

        if self.device.type != "cpu" or self.dtype != torch.float32:
            raise ValueError(f"the one-call step needs a float32 model on CPU, not {self.dtype} on {self.device.type}")
        if self.weights.layers[0].q_norm is not None:
            raise ValueError("the one-call step does not support models with q/k norms (Qwen3)")
        self.fused_step = FusedFp32Step(self.spec, self.embed, self.weights, isa)

    def set_multi_row_weights(self, weights: Weights, min_rows: int) -> None:
        """Use `weights` (e.g. a prepacked copy) for products of min_rows rows or more."""
        self.multi_row_weights, self.packed_min_rows = weights, min_rows

    def full_weights(self, rows: int) -> Weights:
        """The full model's weights for a product of `rows` rows: the multi-row copy from
        packed_min_rows rows on, when the backend made one."""
        return self.weights if rows < self.packed_min_rows else self.multi_row_weights

    @property
    def packed_nbytes(self) -> int:
        return 0 if self.multi_row_weights is self.weights else self.multi_row_weights.nbytes()

    @property
    def draft_has_copy(self) -> bool:
        return self.draft_weights is not self.weights

    def new_cache(self, max_length: int, num_slots: int = 1) -> KVCache:
        """A KV cache of num_slots slots of max_length positions each."""
        if max_length > self.spec.max_context:
            raise ValueError(f"cache length {max_length} exceeds the context window {self.spec.max_context}")
        self._ensure_rope(max_length)
        if self.cache_pool is not None:  # storage at fixed addresses, reused: what captured steps need
            return self.cache_pool.new_cache(self, max_length, num_slots)
        s = self.spec
        return KVCache(s.num_layers, s.num_kv_heads, s.head_dim, max_length, self.dtype, self.device, num_slots)

    def _ensure_rope(self, length: int) -> None:
        if self._rope_cos.shape[0] >= length:
            return
        length = min(self.spec.max_context, max(length, 2 * self._rope_cos.shape[0]))
        positions = torch.arange(length, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=self.dtype)
        cos, sin = self.rotary(probe, positions)  # [1, length, head_dim], attention scaling applied
        half = self.spec.head_dim // 2
        signed_sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)  # see rope()
        self._rope_cos, self._rope_sin = cos[0].to(self.dtype), signed_sin.to(self.dtype)

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
        slot: int = 0,
    ) -> torch.Tensor:
        """One segment (forward_batch with one request): logits [T or 1, vocab] in float32. A
        one-token draft goes through draft_step (the fused CPU draft where there is one)."""
        if draft and token_ids.shape[0] == 1 and hidden_states is None:
            return self.draft_step([int(token_ids[0])], [slot], [start], [skip_set], cache)
        return self.forward_batch([Segment(slot, start, token_ids, skip_set)], cache, draft, last_only, hidden_states)

    @torch.inference_mode()
    def draft_step(self, token_ids: Sequence[int], slots: Sequence[int], positions: Sequence[int],
                   skip_sets: Sequence[frozenset[int]], cache: KVCache) -> torch.Tensor:
        """One draft token for each of B requests: token_ids[b] at positions[b] of slot slots[b],
        skipping skip_sets[b]. Returns logits [B, vocab] (float32)."""
        for slot, position in zip(slots, positions):
            if position >= cache.max_length:
                raise ValueError(f"KV cache overflow: position {position + 1} > capacity {cache.max_length}")
        if self.fused_draft is None or len(token_ids) > self.fused_draft_max_rows:
            segments = [Segment(s, p, torch.tensor([t], device=self.device), k)
                        for t, s, p, k in zip(token_ids, slots, positions, skip_sets)]
            return self.forward_batch(segments, cache, draft=True)
        rows = []
        for t, s, p, k in zip(token_ids, slots, positions, skip_sets):
            rows.append(self.fused_draft.forward(t, cache.slot_view(s), p, k, self._rope_cos, self._rope_sin))
            cache.lengths[s] = p + 1
        return rows[0] if len(rows) == 1 else torch.cat(rows)

    @torch.inference_mode()
    def forward_batch(
        self,
        segments: Sequence[Segment],
        cache: KVCache,
        draft: bool = False,
        last_only: bool = False,
        hidden_states: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Run every segment's tokens; return logits [N, vocab] in float32 for all N rows in
        segment order, or with last_only one row per segment [B, vocab].

        A segment's skipped layers write no KV; everything else writes its KV at its tokens'
        positions of its slot and sets the slot's valid length to start+T. If hidden_states is a
        list, h_0..h_L ([N, hidden] each; with last_only only each segment's last row, [B, hidden],
        which is all a prefill needs) are appended to it (a skipped layer repeats the previous
        state for that segment's rows).
        """
        num_rows = sum(s.num_tokens for s in segments)
        for s in segments:
            if s.start + s.num_tokens > cache.max_length:
                raise ValueError(f"KV cache overflow: position {s.start + s.num_tokens} > capacity {cache.max_length}")
        if self.static_steps is not None:
            logits = self.static_steps.forward(segments, cache, draft, last_only, hidden_states)
            if logits is not None:
                return logits
        if hidden_states is None and (num_rows == 1 or not last_only):  # not prefill pieces: their lm_head is one row
            fused = self.fused_draft if draft and self.draft_has_copy else self.fused_step
            limit = self.fused_max_rows if fused is self.fused_draft else self.fused_step_max_rows
            if fused is not None and num_rows <= limit:
                return self._fused_forward(fused, segments, cache, num_rows)
        last_rows = None  # with last_only, the row of each segment's last token
        if last_only:
            ends = list(itertools.accumulate(s.num_tokens for s in segments))
            last_rows = slice(num_rows - 1, num_rows) if len(segments) == 1 else [e - 1 for e in ends]
        weights = self.draft_weights if draft else self.full_weights(num_rows)
        if len(segments) == 1:
            seg = segments[0]
            token_ids = seg.token_ids
            cos = self._rope_cos[seg.start:seg.start + num_rows]  # [N, head_dim]
            sin = self._rope_sin[seg.start:seg.start + num_rows]
        else:
            token_ids = torch.cat([s.token_ids for s in segments])
            positions = torch.cat([torch.arange(s.start, s.start + s.num_tokens) for s in segments]).to(self.device)
            cos, sin = self._rope_cos[positions], self._rope_sin[positions]
        x = F.embedding(token_ids, self.embed)  # [N, hidden]
        if hidden_states is not None:
            hidden_states.append(x if last_rows is None else x[last_rows].clone())  # a view would keep all rows
        # Only one-token segments (decoding, drafting, the hot path): a leaner layer with fewer torch calls.
        one = num_rows == len(segments) and weights.layers[0].q_norm is None
        layer_fn = self._token_layer if one else self._layer
        uniform = all(s.skip_set == segments[0].skip_set for s in segments)
        for i, lw in enumerate(weights.layers):
            if uniform:
                if i not in segments[0].skip_set:
                    x = layer_fn(x, lw, i, cache, segments, cos, sin)
            else:
                x = self._partial_layer(layer_fn, x, lw, i, cache, segments, cos, sin)
            if hidden_states is not None:
                hidden_states.append(x if last_rows is None else x[last_rows].clone())
        for s in segments:
            cache.lengths[s.slot] = s.start + s.num_tokens
        if last_rows is not None:
            x = x[last_rows]
        head = weights.lm_head if draft else self.full_weights(x.shape[0]).lm_head
        return head(self.norm(x, weights.final_norm, self.spec.rms_norm_eps)).float()

    def _fused_forward(self, fused, segments: Sequence[Segment], cache: KVCache, num_rows: int) -> torch.Tensor:
        """forward_batch through a one-call C++ model (clasp.cpu_draft: the fp32 step, or the int8
        draft over its copy; both take the same calls): one token alone through its one-token path,
        more rows in one call (logits for every row: last_only passes of several rows do not come
        here)."""
        if len(segments) == 1 and num_rows == 1:
            seg = segments[0]
            logits = fused.forward(int(seg.token_ids[0]), cache.slot_view(seg.slot), seg.start, seg.skip_set,
                                   self._rope_cos, self._rope_sin)
            cache.lengths[seg.slot] = seg.start + 1
            return logits
        tokens, slots, positions, skips = [], [], [], []
        for seg in segments:
            n = seg.num_tokens
            tokens += seg.token_ids.tolist()
            slots += [seg.slot] * n
            positions += range(seg.start, seg.start + n)
            skips += [seg.skip_set] * n
        logits = fused.forward_rows(tokens, slots, positions, cache, skips, self._rope_cos, self._rope_sin)
        for seg in segments:
            cache.lengths[seg.slot] = seg.start + seg.num_tokens
        return logits

    def _partial_layer(self, layer_fn, x, lw, layer, cache, segments, cos, sin) -> torch.Tensor:
        """Layer `layer` for the rows of the segments that do not skip it; the others keep x."""
        running, rows, offset = [], [], 0
        for s in segments:
            if layer not in s.skip_set:
                running.append(s)
                rows.extend(range(offset, offset + s.num_tokens))
            offset += s.num_tokens
        if not running:
            return x
        index = torch.tensor(rows, device=x.device)
        out = layer_fn(x[index], lw, layer, cache, running, cos[index], sin[index])
        return x.index_copy(0, index, out)

    def _attention_inputs(self, x: torch.Tensor, lw: LayerWeights, cos: torch.Tensor, sin: torch.Tensor):
        """Project x [N, hidden] to rotated q [N, heads, hd] and k, v [N, kv_heads, hd].
        sin is the signed sine of rope()."""
        s = self.spec
        n = x.shape[0]
        qkv = self._qkv(x, lw)
        qk_heads = s.num_heads + s.num_kv_heads
        v = qkv[:, qk_heads * s.head_dim:].view(n, s.num_kv_heads, s.head_dim)
        cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
        if lw.q_norm is None:  # q and k rotate together: they are adjacent in qkv
            qk = rope(qkv[:, :qk_heads * s.head_dim].view(n, qk_heads, s.head_dim), cos, sin)
            q, k = qk.split([s.num_heads, s.num_kv_heads], dim=1)
            return q, k, v
        q, k = qkv[:, :qk_heads * s.head_dim].view(n, qk_heads, s.head_dim).split([s.num_heads, s.num_kv_heads], 1)
        q = self.norm(q, lw.q_norm, s.rms_norm_eps)
        k = self.norm(k, lw.k_norm, s.rms_norm_eps)
        return rope(q, cos, sin), rope(k, cos, sin), v

    def _qkv(self, x: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
        qkv = lw.qkv(self.norm(x, lw.input_norm, self.spec.rms_norm_eps))
        return qkv if lw.qkv_bias is None else qkv + lw.qkv_bias.to(x.dtype)

    def _mlp_block(self, x: torch.Tensor, attn: torch.Tensor, lw: LayerWeights) -> torch.Tensor:
        """Residual adds of attention output and the MLP: x [N, hidden], attn [N, heads*hd]."""
        x = x + lw.o(attn)
        gate, up = lw.gate_up(self.norm(x, lw.post_norm, self.spec.rms_norm_eps)).chunk(2, dim=-1)
        return x + lw.down(F.silu(gate) * up)

    def _layer(self, x, lw, layer, cache, segments, cos, sin) -> torch.Tensor:
        """One layer for the rows of `segments` (x [N, hidden]); each segment attends to its own slot."""
        q, k, v = self._attention_inputs(x, lw, cos, sin)
        outputs, row = [], 0
        for seg in segments:
            n = seg.num_tokens
            keys, values = cache.write(layer, seg.slot, seg.start, k[row:row + n].transpose(0, 1),
                                       v[row:row + n].transpose(0, 1))  # [kv_heads, start+n, hd]
            # Causal within the new tokens, earlier positions all visible: a lower-right causal
            # mask, which keeps CUDA on the flash kernel (clasp.attention).
            attn = span_attention(q[row:row + n].transpose(0, 1)[None], keys[None], values[None],
                                  seg.start)  # [1, heads, n, hd]
            outputs.append(attn[0].transpose(0, 1).reshape(n, -1))
            row += n
        return self._mlp_block(x, outputs[0] if len(outputs) == 1 else torch.cat(outputs), lw)

    def _token_layer(self, x, lw, layer, cache, segments, cos, sin) -> torch.Tensor:
        """_layer for one-token segments x [B, hidden] (no q/k norms): the same arithmetic with
        about a third fewer torch calls, which matter at ~2-3 us each on a small CPU model."""
        s = self.spec
        b = x.shape[0]
        qk_width = (s.num_heads + s.num_kv_heads) * s.head_dim
        qkv = self._qkv(x, lw)  # [B, width]
        qk = rope(qkv[:, :qk_width].view(b, -1, s.head_dim), cos[:, None], sin[:, None])  # [B, heads + kv_heads, hd]
        outputs = []
        for i, seg in enumerate(segments):
            position = seg.start
            keys, values = cache.keys[layer][seg.slot], cache.values[layer][seg.slot]  # [kv_heads, capacity, hd]
            keys[:, position] = qk[i, s.num_heads:]
            values[:, position] = qkv[i, qk_width:].view(-1, s.head_dim)
            outputs.append(F.scaled_dot_product_attention(
                qk[i, :s.num_heads].view(1, s.num_heads, 1, s.head_dim), keys[None, :, :position + 1],
                values[None, :, :position + 1], enable_gqa=True).view(1, -1))  # [1, heads * hd]
        return self._mlp_block(x, outputs[0] if b == 1 else torch.cat(outputs), lw)

    @torch.inference_mode()
    def layer_candidates(self, states: torch.Tensor, layer: int, cache: KVCache, position: int,
                         draft: bool = False, slot: int = 0) -> torch.Tensor:
        """Apply one layer to B candidate states of the same token, in one batched call.

        states [B, hidden] are alternative hidden states of the token at `position`. Each
        attends over the shared context KV (positions < position, from the cache's `slot`) plus
        its own key/value; nothing is written to the cache. This is the sequence-parallel step
        of the DP: all skip counts j at layer i are evaluated together.
        """
        s = self.spec
        b = states.shape[0]
        lw = (self.draft_weights if draft else self.full_weights(b)).layers[layer]
        group = s.num_heads // s.num_kv_heads
        cos = self._rope_cos[position:position + 1].expand(b, -1)
        sin = self._rope_sin[position:position + 1].expand(b, -1)
        q, k, v = self._attention_inputs(states, lw, cos, sin)
        q = q.view(b, s.num_kv_heads, group, s.head_dim)  # [B, kv_heads, group, hd]
        ctx_k = cache.keys[layer][slot, :, :position]  # [kv_heads, P, hd]
        ctx_v = cache.values[layer][slot, :, :position]
        scale = 1.0 / math.sqrt(s.head_dim)
        # Scores in fp32 (no-ops for an fp32 model): bf16 scores would be rounded before the softmax.
        qf = q.float()
        ctx_scores = torch.einsum("bngd,npd->bngp", qf, ctx_k.float()) * scale  # [B, kv_heads, group, P]
        self_scores = torch.einsum("bngd,bnd->bng", qf, k.float())[..., None] * scale  # [B, kv_heads, group, 1]
        probs = torch.softmax(torch.cat([ctx_scores, self_scores], dim=-1), dim=-1).to(q.dtype)
        attn = torch.einsum("bngp,npd->bngd", probs[..., :position], ctx_v) + probs[..., position:] * v[:, :, None]
        return self._mlp_block(states, attn.reshape(b, -1), lw)

    # ----------------------------------------------------------------- reference path
    @torch.inference_mode()
    def layer_single(self, state: torch.Tensor, layer: int, cache: KVCache, position: int) -> torch.Tensor:
        """One layer on one state [1, hidden] through the ordinary decode path (writes the
        cache at `position`: call it on a scratch copy). Used as the DP's naive reference."""
        cos = self._rope_cos[position:position + 1]
        sin = self._rope_sin[position:position + 1]
        segment = Segment(0, position, torch.zeros(1, dtype=torch.long))
        return self._layer(state, self.weights.layers[layer], layer, cache, [segment], cos, sin)
