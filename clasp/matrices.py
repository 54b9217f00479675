"""Weight matrices that know how to multiply.

The model's forward pass calls `w(x)` for x [T, in] and gets x @ w.T [T, out] in x's dtype; it never
asks what kind of matrix `w` is. Which kind each matrix becomes is decided once, at load, by a
backend (clasp.backends), which also measures what the choice depends on. Kinds:

  DenseMatrix   a plain tensor in any dtype and device, with the few-row product form and, on CPU,
                the option of computing a single row as two (the backend measures it per shape)
  BlockedFp32Weight  an fp32 CPU matrix with a blocked copy for clasp.cpu_draft's few-row kernel
  PackedWeight  an fp32 CPU matrix prepacked in oneDNN's blocked layout (products of 3+ rows)
  Int8Weight    a weight-only int8 matrix for the draft copy (fbgemm, clasp.cpu_draft's kernel, or
                torch's int8-weight kernel)
  Fp32LogitsMatrix  a 16-bit CUDA lm_head that accumulates and writes fp32 logits

Every kind has `shape` ([out, in]), `dtype` (of its stored weights), `nbytes()` (bytes a product
reads) and `__call__`. Performance figures behind these rules are in docs/performance.md.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.nn.functional as F

FEW_ROWS = 16  # up to this many rows, (w @ x.T).T beats F.linear on CPU (docs/performance.md)


class DenseMatrix:
    """A plain matrix. Products of up to FEW_ROWS rows are computed as (w @ x.T).T, which this torch
    build runs 2-3x faster than F.linear for few rows on CPU; larger ones (prefill) use F.linear.
    pad_single_row: compute a single row as two identical rows (on some CPUs BLAS's two-column
    kernel streams the weights much faster than its matrix-vector kernel; the CPU backend measures
    it per shape)."""

    __slots__ = ("weight", "pad_single_row")

    def __init__(self, weight: torch.Tensor, pad_single_row: bool = False) -> None:
        self.weight = weight  # [out, in]
        self.pad_single_row = pad_single_row

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        xw = x.to(w.dtype)
        rows = x.shape[0]
        if rows == 1 and self.pad_single_row:
            out = (w @ torch.cat([xw, xw]).T).T[:1]
        elif rows <= FEW_ROWS:
            out = (w @ xw.T).T.contiguous()
        else:
            out = F.linear(xw, w)
        return out.to(x.dtype)

    def to(self, dtype: torch.dtype) -> "DenseMatrix":
        """A copy in `dtype` (single-row padding is an fp32 rule: a copy starts without it)."""
        return DenseMatrix(self.weight.to(dtype).contiguous())

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class BlockedFp32Weight(DenseMatrix):
    """An fp32 CPU matrix with a second copy in clasp.cpu_draft's blocked layout, whose kernel
    (`cpu_draft.Fp32Matrix`, one pass over the weights for up to 64 rows) computes products of
    `min_rows` to `max_rows` rows; other row counts (prefill, the DP's wide batches) take the plain
    matrix's path. The CPU backend sets the range and the kernel's instruction set by timing and an
    accuracy check at load (clasp.fp32_kernels); max_rows 0 turns the kernel off."""

    __slots__ = ("kernel", "min_rows", "max_rows")

    def __init__(self, weight: torch.Tensor, kernel, min_rows: int = 1, max_rows: int = 16,
                 pad_single_row: bool = False) -> None:
        super().__init__(weight, pad_single_row)
        self.kernel = kernel
        self.min_rows, self.max_rows = min_rows, max_rows

    @classmethod
    def block(cls, w: "torch.Tensor | DenseMatrix", isa: str) -> "BlockedFp32Weight":
        """w with its blocked copy for instruction set `isa` (clasp.cpu_draft.FP32_ISAS)."""
        from clasp.cpu_draft import fp32_matrix

        dense = w if isinstance(w, DenseMatrix) else DenseMatrix(w)
        return cls(dense.weight, fp32_matrix(dense.weight, isa), pad_single_row=dense.pad_single_row)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.min_rows <= x.shape[0] <= self.max_rows and x.dtype == torch.float32:
            return self.kernel.forward(x)
        return super().__call__(x)

    def to(self, dtype: torch.dtype) -> DenseMatrix:
        return DenseMatrix(self.weight.to(dtype).contiguous())

    def nbytes(self) -> int:  # a product reads one of the two copies
        return self.weight.numel() * self.weight.element_size()

    def stored_nbytes(self) -> int:
        return 2 * self.nbytes()


class Fp32LogitsMatrix(DenseMatrix):
    """A 16-bit lm_head on CUDA whose product accumulates and writes fp32 (torch.mm's out_dtype), at
    the same weight bytes: 16-bit logits are rounded to 0.06-0.125 at typical magnitudes, which
    makes exact argmax ties between draft and verification common. Falls back to the plain
    product (then widened) where this torch lacks that overload."""

    __slots__ = ()
    _available = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if Fp32LogitsMatrix._available:
            try:
                return torch.mm(x.to(self.weight.dtype), self.weight.T, out_dtype=torch.float32)
            except (RuntimeError, TypeError) as e:
                Fp32LogitsMatrix._available = False
                warnings.warn(f"fp32 logits from a {self.weight.dtype} lm_head are not available ({e}); "
                              f"using {self.weight.dtype} logits", RuntimeWarning, stacklevel=2)
        return super().__call__(x).float()


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
    dtype = torch.int8

    @classmethod
    def quantize(cls, w: "torch.Tensor | DenseMatrix", act_dtype: torch.dtype, cpu_kernel: str = "fbgemm") -> "Int8Weight":
        """cpu_kernel (CPU only): one of CPU_KERNELS. Raises RuntimeError where the CPU or this
        build cannot run it."""
        if cpu_kernel not in cls.CPU_KERNELS:
            raise ValueError(f"cpu_kernel must be one of {', '.join(cls.CPU_KERNELS)}, got {cpu_kernel!r}")
        w = (w.weight if isinstance(w, DenseMatrix) else w).detach().float()
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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] @ self.T, in x's dtype."""
        if self.kernel is not None:
            return self.kernel.forward(x.float()).to(x.dtype)
        if self.packed is not None:
            return torch.ops.quantized.linear_dynamic(x.float(), self.packed, self.reduce_range).to(x.dtype)
        return torch.ops.aten._weight_int8pack_mm(x.to(self.act_dtype), self.q, self.scale.to(self.act_dtype)).to(x.dtype)

    matmul = __call__

    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] + self.scale.numel() * self.scale.element_size()


@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """An fp32 CPU matrix prepacked once in oneDNN's blocked layout, for products of 3+ rows.

    On some CPUs MKL's few-row products slow down sharply past two rows while oneDNN on prepacked
    weights stays flat from 3 to 8 rows, so verifying a 5-token draft costs about one plain step.
    Whether 1-2 rows use it too depends on the CPU: the CPU backend measures it
    (clasp.backends.cpu.calibrate_packed_rows; docs/performance.md).
    """

    packed: torch.Tensor  # oneDNN (mkldnn) tensor
    shape: tuple[int, int]  # [out, in]

    MIN_ROWS = 3  # products with fewer rows use the plain matrix, unless calibrate_packed_rows says otherwise
    ROWS_HINT = 8  # the batch size oneDNN lays the weight out for (3-8 rows measured fastest with 8)
    dtype = torch.float32

    @classmethod
    def pack(cls, w: "torch.Tensor | DenseMatrix") -> "PackedWeight":
        w = w.weight if isinstance(w, DenseMatrix) else w
        return cls(torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), cls.ROWS_HINT), tuple(w.shape))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, None, "none", [], "")

    matmul = __call__

    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * 4


Matrix = "DenseMatrix | PackedWeight | Int8Weight"


def as_matrix(w: "torch.Tensor | DenseMatrix | PackedWeight | Int8Weight") -> "DenseMatrix | PackedWeight | Int8Weight":
    """A matrix object for w (a plain tensor becomes a DenseMatrix)."""
    return DenseMatrix(w) if isinstance(w, torch.Tensor) else w


def nbytes(t) -> int:
    """Bytes of a matrix object or a plain tensor (0 for None)."""
    if t is None:
        return 0
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else t.nbytes()


def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ w.T (+ bias) in x's dtype, for any matrix kind or a plain tensor."""
    out = as_matrix(w)(x)
    return out if bias is None else out + bias.to(x.dtype)
