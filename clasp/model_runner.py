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
import warnings

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


@dataclasses.dataclass(frozen=True)
class Int8Weight:
    """A weight-only int8 matrix for the draft: symmetric, one scale per output channel.

    On CPU its products run in one of CPU_KERNELS: fbgemm's dynamic-quantization kernel on a
    prepacked copy (activations quantized per call, per tensor, to 8 bits, or to 7 with
    "fbgemm-7bit"), or the blocked layout of clasp.cpu_draft's kernel in one of its instruction
    sets, which the one-call draft shares. Without AVX-512 VNNI, fbgemm sums pairs of u8 x s8
    products in saturating 16-bit lanes (vpmaddubsw), so full 8-bit activations lose accuracy
    there; 7-bit activations cannot saturate. Which kernel a draft uses is chosen at load by
    timing and an accuracy check (clasp.draft_kernels), not from CPU flags.
    Elsewhere it goes through torch's int8-weight kernel with activations in `act_dtype`.
    """

    shape: tuple[int, int]  # [out, in]
    q: torch.Tensor | None  # int8 [out, in], row-major; None on CPU when only fbgemm's packed copy is kept
    scale: torch.Tensor  # [out] float32
    packed: object | None  # fbgemm's prepacked weight (CPU)
    act_dtype: torch.dtype
    kernel: object | None = None  # clasp.cpu_draft's Int8Matrix (CPU, cpu_kernel "clasp-<isa>")
    reduce_range: bool = False  # fbgemm: 7-bit activations

    CPU_KERNELS = ("fbgemm", "fbgemm-7bit", "clasp-avx512-vnni", "clasp-avx2", "clasp-portable")

    @classmethod
    def quantize(cls, w: torch.Tensor, act_dtype: torch.dtype, cpu_kernel: str = "fbgemm") -> "Int8Weight":
        """cpu_kernel (CPU only): one of CPU_KERNELS. Raises RuntimeError where the CPU or this
        build cannot run it."""
        if cpu_kernel not in cls.CPU_KERNELS:
            raise ValueError(f"cpu_kernel must be one of {', '.join(cls.CPU_KERNELS)}, got {cpu_kernel!r}")
        w = w.detach().float()
        scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0).contiguous()
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        if w.device.type != "cpu":
            return cls(tuple(w.shape), q, scale, None, act_dtype)
        if cpu_kernel.startswith("clasp-"):
            from clasp.cpu_draft import int8_matrix

            return cls(tuple(w.shape), None, scale, None, torch.float32,
                       int8_matrix(q, scale, isa=cpu_kernel.removeprefix("clasp-")))
        with warnings.catch_warnings():  # quantized tensors are deprecated; the packing op is what we need
            warnings.simplefilter("ignore")
            zero = torch.zeros(w.shape[0], dtype=torch.long)
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
            packed = torch.ops.quantized.linear_prepack(qw, None)
        return cls(tuple(w.shape), None, scale, packed, torch.float32, reduce_range=cpu_kernel == "fbgemm-7bit")

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] @ self.T, in x's dtype."""
        if self.kernel is not None:
            return self.kernel.forward(x.float()).to(x.dtype)
        if self.packed is not None:
            return torch.ops.quantized.linear_dynamic(x.float(), self.packed, self.reduce_range).to(x.dtype)
        return torch.ops.aten._weight_int8pack_mm(x.to(self.act_dtype), self.q, self.scale.to(self.act_dtype)).to(x.dtype)

    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] + self.scale.numel() * self.scale.element_size()


@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """An fp32 CPU matrix prepacked once in oneDNN's blocked layout, for products of 3+ rows.

    MKL's few-row products slow down sharply past two rows on the dev CPU (all the embedded
    model's matrices: 2 rows 17 ms, 3 rows 25, 6 rows 37, 8 rows 42); oneDNN on prepacked
    weights stays at 20-25 ms from 3 to 8 rows, so verifying a 5-token draft costs about one
    plain step. 1-2 rows stay on the plain matrix where MKL is faster there, which depends on the
    CPU: ModelRunner.pack_weights measures it (calibrate_packed_rows; docs/performance.md).
    """

    packed: torch.Tensor  # oneDNN (mkldnn) tensor
    shape: tuple[int, int]  # [out, in]

    MIN_ROWS = 3  # products with fewer rows use the plain matrix, unless calibrate_packed_rows says otherwise
    ROWS_HINT = 8  # the batch size oneDNN lays the weight out for (3-8 rows measured fastest with 8)

    @classmethod
    def pack(cls, w: torch.Tensor) -> "PackedWeight":
        return cls(torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), cls.ROWS_HINT), tuple(w.shape))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, None, "none", [], "")

    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * 4


def nbytes(t: "torch.Tensor | Int8Weight | PackedWeight | None") -> int:
    if t is None:
        return 0
    return t.nbytes() if isinstance(t, (Int8Weight, PackedWeight)) else t.numel() * t.element_size()


MATRICES = ("qkv", "o", "gate_up", "down")  # the LayerWeights fields that are matrices


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
        """A copy with matrices in `dtype`; norms and biases stay (shared; norms run in the
        activations' dtype anyway)."""
        return dataclasses.replace(self, **{name: getattr(self, name).to(dtype).contiguous() for name in MATRICES})

    def int8(self, act_dtype: torch.dtype, cpu_kernel: str = "fbgemm") -> "LayerWeights":
        """A copy with int8 matrices; norms and biases stay as they are (shared)."""
        return dataclasses.replace(self, **{name: Int8Weight.quantize(getattr(self, name), act_dtype, cpu_kernel)
                                            for name in MATRICES})


@dataclasses.dataclass
class Weights:
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # [hidden]
    lm_head: torch.Tensor  # [vocab, hidden]

    def to(self, dtype: torch.dtype) -> "Weights":
        """A copy in another dtype (the draft copy); matmuls cast activations to it and back."""
        return Weights([lw.to(dtype) for lw in self.layers], self.final_norm, self.lm_head.to(dtype).contiguous())

    def int8(self, act_dtype: torch.dtype, cpu_kernel: str = "fbgemm") -> "Weights":
        """The draft copy with weight-only int8 matrices (the lm_head too)."""
        return Weights([lw.int8(act_dtype, cpu_kernel) for lw in self.layers], self.final_norm,
                       Int8Weight.quantize(self.lm_head, act_dtype, cpu_kernel))

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
        layers = [dataclasses.replace(lw, **{name: PackedWeight.pack(getattr(lw, name)) for name in MATRICES})
                  for lw in self.layers]
        return Weights(layers, self.final_norm, PackedWeight.pack(self.lm_head))

    def layer_nbytes(self) -> int:
        """Bytes of one layer (the first; all layers have the same shapes)."""
        return sum(nbytes(getattr(self.layers[0], f.name)) for f in dataclasses.fields(self.layers[0]))


FEW_ROWS = 16  # up to this many rows, (w @ x.T).T beats F.linear on CPU (README, performance notes)


# Whether a single fp32 row on CPU is computed as two rows, per weight shape (calibrate_single_row).
# On the dev CPU, MKL's matrix-vector kernel streams the model's weights at ~10 GB/s and its
# two-column matrix product at ~30 GB/s: all the model's matrices took 50 ms one way and 16 ms
# the other (docs/performance.md). How much depends on the shape, the CPU and the BLAS build,
# so it is measured per shape, not assumed.
_PAD_SINGLE_ROW: dict[tuple[int, int], bool] = {}
_CALIBRATION_BYTES = 64 * 2**20  # larger than CPU caches, like a model's weights


def calibrate_single_row(shape: tuple[int, int], repeats: int = 9) -> bool:
    """Whether one fp32 CPU row times a weight of `shape` [out, in] is faster computed as two rows.

    Measured once per process and shape on matrices of ones (values do not matter to BLAS),
    enough copies to exceed 64 MiB so the weights stream from memory as a model's do; one and
    two rows are timed alternately, `repeats` pairs, and the median ratio decides. A property
    of the CPU, the BLAS and the shape: a small model loaded later cannot change a larger
    model's choice (its shapes differ, and where they are equal so is the answer).

    The burden of proof is on one row, which must be 25% faster: the two mistakes do not cost
    the same. On the dev CPU two rows take 105-140 us on the down projection's shape and one row
    220-260, but in phases when the VM's memory bandwidth is taken elsewhere both take 260-330,
    one row sometimes 10-17% ahead. Padding in such a phase costs at most that; not padding costs
    2x whenever the phase ends. The old rule (best of 7, two rows must win by 10%) left the
    decoder's down projection unpadded when the services calibrated while the other loaded:
    plain decoding through gRPC ran at 0.71-0.82x of the same engine in-process.
    """
    shape = (int(shape[0]), int(shape[1]))
    if shape not in _PAD_SINGLE_ROW and shape[0] * shape[1] * 4 < 2**20:
        _PAD_SINGLE_ROW[shape] = False  # cache-resident: either way is fast
    elif shape not in _PAD_SINGLE_ROW:
        out, inp = shape
        mats = [torch.ones(out, inp) for _ in range(max(1, -(-_CALIBRATION_BYTES // (out * inp * 4))))]
        x = torch.ones(1, inp)
        x2 = torch.cat([x, x])

        def run(inputs: torch.Tensor) -> float:
            t0 = time.perf_counter()
            for m in mats:
                m @ inputs.T
            return time.perf_counter() - t0

        with torch.inference_mode():
            run(x), run(x2)  # first-call costs
            ratios = sorted(run(x) / run(x2) for _ in range(repeats))  # paired: noise hits both alike
        _PAD_SINGLE_ROW[shape] = not ratios[len(ratios) // 2] < 0.8
    return _PAD_SINGLE_ROW[shape]


def calibrate_packed_rows(plain: Weights, packed: Weights, repeats: int = 5) -> int:
    """The fewest rows (1, 2 or PackedWeight.MIN_ROWS) from which the packed copy computes the
    model's products faster than the plain matrices on their few-row path.

    Which kernel wins for one or two rows depends on the CPU. On the dev AMD EPYC, MKL's two-row
    product streams the weights about as fast as one row (the embedded model's 2-row step 25-28 ms,
    1 row 22-25) and packing only pays from 3 rows. On an Intel Xeon host of the same VM family
    MKL's two rows took 58-69 ms against 37-51 packed and 30-40 for one row, so every 1-token
    verification cost nearly two steps. Timed on the model's own matrices (every layer and the
    lm_head, so they stream from memory as in decoding), plain and packed alternately, `repeats`
    pairs; the packed copy must be 15% faster by the median ratio to take over a row count.
    """
    pairs = [(getattr(p, m), getattr(q, m)) for p, q in zip(plain.layers, packed.layers) for m in MATRICES]
    pairs.append((plain.lm_head, packed.lm_head))

    def run(which: int, xs: dict[int, torch.Tensor]) -> float:
        t0 = time.perf_counter()
        for pair in pairs:
            linear(xs[pair[0].shape[1]], pair[which])
        return time.perf_counter() - t0

    min_rows = PackedWeight.MIN_ROWS
    with torch.inference_mode():
        for rows in (2, 1):  # packing that loses at 2 rows loses at 1
            xs = {w.shape[1]: torch.ones(rows, w.shape[1]) for w, _ in pairs}
            run(0, xs), run(1, xs)  # first-call costs
            ratios = sorted(run(1, xs) / run(0, xs) for _ in range(repeats))
            if not ratios[len(ratios) // 2] < 0.85:
                break
            min_rows = rows
    return min_rows


def single_row_choices() -> dict[str, bool]:
    """{"OUTxIN": computed as two rows} for every shape calibrated in this process (for logs)."""
    return {f"{o}x{i}": pad for (o, i), pad in sorted(_PAD_SINGLE_ROW.items())}


def _pad_single_row(shape: torch.Size) -> bool:
    pad = _PAD_SINGLE_ROW.get(shape)  # a dict hit per call: the decode path's case
    return calibrate_single_row(shape) if pad is None else pad


def linear(x: torch.Tensor, w: "torch.Tensor | Int8Weight", bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ w[out, in].T in w's dtype, returned in x's dtype.

    For the few rows of decoding and verification this is computed as (w @ x.T).T: on CPU this
    torch build's F.linear is 2-3x slower there (and on the large lm_head). For prefill-sized
    inputs F.linear is faster (1200 rows: 2.4 s vs 3.9 s for the whole model). A single fp32 row
    on CPU may be computed as two (see _PAD_SINGLE_ROW); fp16 is faster as one row. Int8Weight
    and PackedWeight run their own kernels (their `matmul`).
    """
    if isinstance(w, (Int8Weight, PackedWeight)):
        out = w.matmul(x)
        return out if bias is None else out + bias.to(x.dtype)
    xw = x.to(w.dtype)
    if x.shape[0] == 1 and w.dtype == torch.float32 and w.device.type == "cpu" and _pad_single_row(w.shape):
        out = (w @ torch.cat([xw, xw]).T).T[:1]
    elif x.shape[0] <= FEW_ROWS:
        out = (w @ xw.T).T.contiguous()
    else:
        out = F.linear(xw, w)
    out = out.to(x.dtype)
    return out if bias is None else out + bias.to(x.dtype)


_FP32_LOGITS = {"cuda": True}  # False once torch.mm(out_dtype=) has failed here: then 16-bit logits


def head_logits(x: torch.Tensor, head: "torch.Tensor | Int8Weight | PackedWeight") -> torch.Tensor:
    """fp32 logits [T, vocab] of normed states x.

    On CUDA a 16-bit lm_head accumulates and writes fp32 (torch.mm's out_dtype), at the same weight
    bytes: 16-bit logits are rounded to 0.06-0.125 at typical magnitudes, which makes exact argmax
    ties between draft and verification common. Elsewhere, and where this torch lacks that
    overload, the product is in the weights' dtype and then widened.
    """
    if (x.is_cuda and isinstance(head, torch.Tensor) and head.dtype in (torch.float16, torch.bfloat16)
            and _FP32_LOGITS["cuda"]):
        try:
            return torch.mm(x.to(head.dtype), head.T, out_dtype=torch.float32)
        except (RuntimeError, TypeError) as e:
            _FP32_LOGITS["cuda"] = False
            warnings.warn(f"fp32 logits from a {head.dtype} lm_head are not available ({e}); "
                          f"using {head.dtype} logits", RuntimeWarning, stacklevel=2)
    return linear(x, head).float()


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
        self.multi_row_weights = weights  # for 3+ rows (full_weights); replaced by pack_weights
        self.packed_min_rows = PackedWeight.MIN_ROWS  # rows from which multi_row_weights is used (calibrated)
        self.fused_draft = None  # clasp.cpu_draft.FusedDraft: one C++ call per draft token (enable_fused_draft)
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
            for name in MATRICES:  # now, not in the first request
                calibrate_single_row(getattr(layers[0], name).shape)
            calibrate_single_row(weights.lm_head.shape)
        return cls(spec, param.detach(), weights, base.rotary_emb, param.device, param.dtype)

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
                linear(torch.ones(1, 32, device=self.device, dtype=self.dtype), probe)
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

    @staticmethod
    def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
        """Whether pack_weights() can work here: fp32 on a CPU with oneDNN in this torch build."""
        return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()

    def pack_weights(self) -> None:
        """Keep a second, oneDNN-prepacked copy of the full weights for products of 3+ rows:
        verification, prefill and the DP (PackedWeight). Costs the model's fp32 weight bytes
        again in memory; raises ValueError where packing is not available."""
        if not self.packing_available(self.device, self.dtype):
            raise ValueError("weight packing needs an fp32 model on a CPU with oneDNN (torch.backends.mkldnn)")
        if self.multi_row_weights is self.weights:
            self.multi_row_weights = self.weights.packed()
            self.packed_min_rows = calibrate_packed_rows(self.weights, self.multi_row_weights)

    def full_weights(self, rows: int) -> Weights:
        """The full model's weights for a product of `rows` rows: the prepacked copy from
        packed_min_rows rows on (calibrated at packing; PackedWeight.MIN_ROWS), when there is one."""
        return self.weights if rows < self.packed_min_rows else self.multi_row_weights

    @property
    def packed_nbytes(self) -> int:
        return 0 if self.multi_row_weights is self.weights else self.multi_row_weights.nbytes()

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
    ) -> torch.Tensor:
        """Run tokens at positions start..start+T; return logits [T or 1, vocab] in float32.

        Skipped layers write no KV; everything else writes its KV at the tokens' positions
        and sets the cache's valid length to start+T. If hidden_states is a list, h_0..h_L
        ([T, hidden] each) are appended to it (skipped layers repeat the previous state).
        """
        num_tokens = token_ids.shape[0]
        if draft and num_tokens == 1 and hidden_states is None and self.fused_draft is not None:
            if start >= cache.max_length:
                raise ValueError(f"KV cache overflow: position {start + 1} > capacity {cache.max_length}")
            logits = self.fused_draft.forward(int(token_ids[0]), cache, start, skip_set, self._rope_cos, self._rope_sin)
            cache.length = start + 1
            return logits
        weights = self.draft_weights if draft else self.full_weights(num_tokens)
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
        # One token (decoding and drafting, the hot path): a leaner layer with fewer torch calls.
        one = num_tokens == 1 and weights.layers[0].q_norm is None
        if one:
            if start >= cache.max_length:
                raise ValueError(f"KV cache overflow: position {start + 1} > capacity {cache.max_length}")
            cos, sin = cos.view(1, -1), sin.view(1, -1)
        for i, lw in enumerate(weights.layers):
            if i not in skip_set:
                x = (self._token_layer(x, lw, i, cache, start, cos, sin) if one
                     else self._layer(x, lw, i, cache, start, cos, sin, mask))
            if hidden_states is not None:
                hidden_states.append(x)
        cache.length = start + num_tokens
        if last_only:
            x = x[-1:]
        head = weights.lm_head if draft else self.full_weights(x.shape[0]).lm_head
        return head_logits(rms_norm(x, weights.final_norm, self.spec.rms_norm_eps), head)

    def _attention_inputs(self, x: torch.Tensor, lw: LayerWeights, cos: torch.Tensor, sin: torch.Tensor):
        """Project x [N, hidden] to rotated q [N, heads, hd] and k, v [N, kv_heads, hd].
        sin is the signed sine of rope()."""
        s = self.spec
        n = x.shape[0]
        qkv = linear(rms_norm(x, lw.input_norm, s.rms_norm_eps), lw.qkv, lw.qkv_bias)
        qk_heads = s.num_heads + s.num_kv_heads
        v = qkv[:, qk_heads * s.head_dim:].view(n, s.num_kv_heads, s.head_dim)
        cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
        if lw.q_norm is None:  # q and k rotate together: they are adjacent in qkv
            qk = rope(qkv[:, :qk_heads * s.head_dim].view(n, qk_heads, s.head_dim), cos, sin)
            q, k = qk.split([s.num_heads, s.num_kv_heads], dim=1)
            return q, k, v
        q, k = qkv[:, :qk_heads * s.head_dim].view(n, qk_heads, s.head_dim).split([s.num_heads, s.num_kv_heads], 1)
        q = rms_norm(q, lw.q_norm, s.rms_norm_eps)
        k = rms_norm(k, lw.k_norm, s.rms_norm_eps)
        return rope(q, cos, sin), rope(k, cos, sin), v

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

    def _token_layer(self, x, lw, layer, cache, position, cos, sin) -> torch.Tensor:
        """_layer for one token x [1, hidden] at `position` (no q/k norms): the same arithmetic
        with about a third fewer torch calls, which matter at ~2-3 us each on a small CPU model."""
        s = self.spec
        qk_width = (s.num_heads + s.num_kv_heads) * s.head_dim
        qkv = linear(rms_norm(x, lw.input_norm, s.rms_norm_eps), lw.qkv, lw.qkv_bias)[0]
        qk = rope(qkv[:qk_width].view(-1, s.head_dim), cos, sin)  # [heads + kv_heads, hd]
        keys, values = cache.keys[layer][0], cache.values[layer][0]  # [kv_heads, capacity, hd]
        keys[:, position] = qk[s.num_heads:]
        values[:, position] = qkv[qk_width:].view(-1, s.head_dim)
        attn = F.scaled_dot_product_attention(qk[:s.num_heads].view(1, s.num_heads, 1, s.head_dim),
                                              keys[None, :, :position + 1], values[None, :, :position + 1],
                                              enable_gqa=True)  # [1, heads, 1, hd]
        return self._mlp_block(x, attn.view(1, -1), lw)

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
        b = states.shape[0]
        lw = (self.draft_weights if draft else self.full_weights(b)).layers[layer]
        group = s.num_heads // s.num_kv_heads
        cos = self._rope_cos[position:position + 1].expand(b, -1)
        sin = self._rope_sin[position:position + 1].expand(b, -1)
        q, k, v = self._attention_inputs(states, lw, cos, sin)
        q = q.view(b, s.num_kv_heads, group, s.head_dim)  # [B, kv_heads, group, hd]
        ctx_k = cache.keys[layer][0, :, :position]  # [kv_heads, P, hd]
        ctx_v = cache.values[layer][0, :, :position]
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
        return self._layer(state, self.weights.layers[layer], layer, cache, position, cos, sin, None)
