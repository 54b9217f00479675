"""The one-call int8 CPU draft: build, load and run `cpu_draft.cpp`.

A draft token through torch ops spends about half its time on per-op overhead rather than on
streaming the int8 weights (docs/performance.md, "CPU kernels"). The C++ kernel runs the whole
token (every non-skipped layer, the final norm and the lm_head) in one call over the same int8
matrices. It is compiled once with torch's extension builder into the cache directory
(`python -m clasp build-kernels`, part of `make setup`; ~1 minute) and loaded in milliseconds
after that. It has AVX-512 VNNI, AVX2 and portable code for the same integer arithmetic; which
one runs is chosen by timing at load (clasp.draft_kernels). It only ever proposes tokens: the full model verifies them, so it changes speed and
acceptance, never the output.

The same extension has an fp32 matrix for the full model's few-row products (fp32_matrix): the
weights in 16-row blocks, streamed once for all rows of a product (up to 16), in AVX-512F, AVX2
or portable code, all plain fp32 arithmetic (they match torch's fp32 product to rounding).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

from clasp.kv_cache import KVCache
from clasp.loading import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_draft.cpp")

_module = None


# The instruction sets the kernel has code for, fastest first where the CPU has them, with the
# kernel's codes (cpu_draft.cpp, enum Isa). All compute the same integer products; which one is
# fastest on a given CPU is measured at load (clasp.draft_kernels), not assumed from the flags.
ISAS = {"avx512-vnni": 2, "avx2": 1, "portable": 0}
# The fp32 products' instruction sets (Fp32Matrix), with the same codes.
FP32_ISAS = {"avx512": 3, "avx2": 1, "portable": 0}


def cpu_flags() -> list[str]:
    """The CPU's SIMD flags from /proc/cpuinfo (for logs and benchmark records), without
    building anything; empty where the OS does not say."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return sorted(flag for flag in line.split(":", 1)[1].split()
                                  if flag.startswith(("avx", "fma", "amx", "sse4", "f16c", "vnni")))
    except OSError:
        pass
    return []


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def supported_isas() -> list[str]:
    """The kernel's instruction sets this CPU can run (asked of the CPU by the compiled kernel)."""
    ext = load_extension()
    return [name for name, code in ISAS.items() if ext.cpu_supports(code)]


def supported_fp32_isas() -> list[str]:
    """The fp32 products' instruction sets this CPU can run, fastest first where present."""
    ext = load_extension()
    return [name for name, code in FP32_ISAS.items() if ext.cpu_supports(code)]


def _isa_code(isa: str) -> int:
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {', '.join(ISAS)}, got {isa!r}")
    return ISAS[isa]


def _isa_name(code: int) -> str:
    return next(name for name, c in ISAS.items() if c == code)


def unavailable_reason() -> str | None:
    """Why the kernel cannot be built here, or None."""
    from torch.utils.cpp_extension import is_ninja_available

    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the CPU draft kernel is built for x86-64 Linux, not {platform.system()} {platform.machine()}"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r}) on PATH"
    venv_bin = str(Path(sys.executable).parent)  # pip's ninja lands beside the interpreter, maybe not on PATH
    if not is_ninja_available() and (Path(venv_bin) / "ninja").exists():
        os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def build_dir() -> Path:
    """Where the compiled kernel lives: per source text and torch version."""
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
    return cache_dir() / "kernels" / f"cpu_draft-{digest}"


def _module_name() -> str:
    return f"clasp_cpu_draft_{build_dir().name.split('-')[-1]}"


def load_extension():
    """The compiled extension module: imported directly where it was built before (no compiler
    needed, read-only filesystems fine), else built now. Raises RuntimeError with the reason."""
    global _module
    if _module is not None:
        return _module
    directory, name = build_dir(), _module_name()
    built = directory / f"{name}.so"
    if built.exists():
        loader = importlib.machinery.ExtensionFileLoader(name, str(built))
        spec = importlib.util.spec_from_file_location(name, str(built), loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        _module = module
        return _module
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    from torch.utils.cpp_extension import load

    directory.mkdir(parents=True, exist_ok=True)
    log.info("building the CPU draft kernel into %s (once, about a minute)", directory)
    try:
        # No -march: AVX-512 VNNI code is compiled per function and chosen at run time, so one
        # build (e.g. in a container image) runs on any x86-64 CPU.
        _module = load(name=name, sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp"],
                       extra_ldflags=["-fopenmp"], build_directory=str(directory), verbose=False)
    except Exception as e:  # compiler and linker failures surface as several exception types
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"building the CPU draft kernel failed: {detail}") from e
    return _module


def block_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] -> [ceil(N/16), ceil(K/4), 16, 4], zero-padded: the kernel's layout, where each
    64-byte line holds 4 consecutive inputs of 16 output rows."""
    n, k = q.shape
    n16, k4 = -(-n // 16) * 16, -(-k // 4) * 4
    padded = torch.zeros(n16, k4, dtype=torch.int8)
    padded[:n, :k] = q
    return padded.view(n16 // 16, 16, k4 // 4, 4).permute(0, 2, 1, 3).contiguous()


def int8_matrix(q: torch.Tensor, scale: torch.Tensor, isa: str = "portable"):
    """The kernel's matrix for int8 q [N, K] with per-row float32 scales; q may be freed after.
    Raises RuntimeError where this CPU cannot run `isa`."""
    ext = load_extension()
    return ext.Int8Matrix(block_int8(q), scale.float().contiguous(), q.sum(1, dtype=torch.int32).contiguous(),
                          q.shape[0], q.shape[1], None, _isa_code(isa))


def block_fp32(w: torch.Tensor) -> torch.Tensor:
    """float32 [N, K] -> [ceil(N/16), K, 16], zero-padded rows: the fp32 kernel's layout, where each
    64-byte line holds one input of 16 output rows."""
    n, k = w.shape
    n16 = -(-n // 16) * 16
    padded = torch.zeros(n16, k, dtype=torch.float32)
    padded[:n] = w.detach()
    return padded.view(n16 // 16, 16, k).transpose(1, 2).contiguous()


def fp32_matrix(w: torch.Tensor, isa: str = "portable", bias: torch.Tensor | None = None):
    """The kernel's fp32 matrix for w [N, K] (copied into its blocked layout; w may be freed after):
    `m(x)` or `m.forward(x)` is x [T, K] @ w.T (+ bias) as float32 [T, N], for any T (one pass
    over the weights per 64 rows). `m.isa` is the FP32_ISAS code in use and can be switched.
    Raises ValueError for an unknown `isa`, RuntimeError where this CPU cannot run it."""
    if isa not in FP32_ISAS:
        raise ValueError(f"isa must be one of {', '.join(FP32_ISAS)}, got {isa!r}")
    w = getattr(w, "weight", w)  # a clasp.matrices.DenseMatrix, or a bare tensor
    if w.dim() != 2 or not w.dtype.is_floating_point or w.device.type != "cpu":
        raise ValueError(f"expected a 2-D floating-point CPU matrix, got {tuple(w.shape)} {w.dtype} on {w.device}")
    ext = load_extension()
    return ext.Fp32Matrix(block_fp32(w.float()), w.shape[0], w.shape[1],
                          None if bias is None else bias.float().contiguous(), FP32_ISAS[isa])


class FusedDraft:
    """A draft token per call over a runner's int8 draft copy (Int8Weight with kernel matrices,
    which the copy's own torch-path products share), in one of the kernel's instruction sets
    (ISAS); `isa` can be switched at any time, since every instruction set reads the same layout.
    """

    def __init__(self, spec, embed: torch.Tensor, weights, isa: str = "portable") -> None:
        ext = load_extension()
        self._weights = weights
        self._model = ext.DraftModel(embed, weights.final_norm.float().contiguous(), weights.lm_head.kernel,
                                     spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.rms_norm_eps,
                                     _isa_code(isa))
        for lw in weights.layers:
            if lw.q_norm is not None:
                raise ValueError("the fused CPU draft does not support q/k norms (Qwen3)")
            self._model.add_layer(lw.qkv.kernel, lw.qkv_bias, lw.o.kernel, lw.gate_up.kernel, lw.down.kernel,
                                  lw.input_norm.float().contiguous(), lw.post_norm.float().contiguous())
        self._skips: dict[frozenset[int], list[int]] = {}

    @property
    def isa(self) -> str:
        return _isa_name(self._model.isa)

    @isa.setter
    def isa(self, isa: str) -> None:
        """Switch the whole draft (this model and the copy's matrices, which multi-row draft
        products use) to another instruction set. Raises RuntimeError where the CPU lacks it."""
        code = _isa_code(isa)
        self._model.isa = code
        for matrix in self._weights.matrices():
            matrix.kernel.isa = code

    def forward(self, token_id: int, cache: KVCache, position: int, skip_set: frozenset[int],
                cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Logits [1, vocab] (float32) of the draft for token_id at `position`; writes its KV."""
        skip = self._skips.get(skip_set)
        if skip is None:
            skip = self._skips[skip_set] = sorted(skip_set)
            if len(self._skips) > 64:  # skip sets change every few rounds at most; keep the map small
                self._skips = {skip_set: skip}
        return self._model.forward(token_id, cache.keys, cache.values, position, cos, sin, skip)

    def forward_rows(self, token_ids: list[int], slots: list[int], positions: list[int], cache: KVCache,
                     skip_sets: list[frozenset[int]], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] of one draft token for each of N requests (token_ids[i] at positions[i]
        of slot slots[i], skipping skip_sets[i]) in one call: each layer's int8 products read the
        weights once for all the rows that run it. Writes their KV (not cache.lengths)."""
        return self._model.forward_rows(token_ids, slots, positions, cache.keys, cache.values, cos, sin,
                                        [sorted(k) for k in skip_sets])


class FusedFp32Step:
    """A plain fp32 decode step per call: one token through every layer (bar a skip set), the
    final norm and the lm_head in one C++ call, over Fp32Matrix copies of a runner's fp32 weights
    (the model's arithmetic in fp32, as ModelRunner.forward, to rounding), in one of FP32_ISAS.
    The copies cost the model's weight bytes again while the runner keeps its own.
    """

    def __init__(self, spec, embed: torch.Tensor, weights, isa: str = "portable") -> None:
        """weights: the runner's full weights. Matrices with a blocked copy already
        (clasp.matrices.BlockedFp32Weight) share its weights, so the step costs no memory; plain
        ones are copied. The step keeps its own instruction set (`isa`), set here and by the setter:
        switching a shared matrix's does not switch the step's."""
        if isa not in FP32_ISAS:
            raise ValueError(f"isa must be one of {', '.join(FP32_ISAS)}, got {isa!r}")
        from clasp.matrices import BlockedFp32Weight, DenseMatrix

        def kernel(m):
            if isinstance(m, BlockedFp32Weight):
                return m.kernel
            w = m.weight if isinstance(m, DenseMatrix) else m
            if not isinstance(w, torch.Tensor) or w.dtype != torch.float32:
                raise ValueError("the fused fp32 step needs the runner's plain float32 weights")
            return fp32_matrix(w, isa)

        ext = load_extension()
        self._model = ext.Fp32Model(embed.float().contiguous(), weights.final_norm.float().contiguous(),
                                    kernel(weights.lm_head), spec.num_heads, spec.num_kv_heads,
                                    spec.head_dim, spec.rms_norm_eps, FP32_ISAS[isa])
        for lw in weights.layers:
            if lw.q_norm is not None:
                raise ValueError("the fused fp32 step does not support q/k norms (Qwen3)")
            self._model.add_layer(kernel(lw.qkv), lw.qkv_bias, kernel(lw.o), kernel(lw.gate_up), kernel(lw.down),
                                  lw.input_norm.float().contiguous(), lw.post_norm.float().contiguous())

    @property
    def isa(self) -> str:
        return next(name for name, c in FP32_ISAS.items() if c == self._model.isa)

    @isa.setter
    def isa(self, isa: str) -> None:
        """Switch every product and helper; raises RuntimeError where the CPU lacks `isa`."""
        if isa not in FP32_ISAS:
            raise ValueError(f"isa must be one of {', '.join(FP32_ISAS)}, got {isa!r}")
        self._model.isa = FP32_ISAS[isa]

    def forward(self, token_id: int, cache: KVCache, position: int, skip_set: frozenset[int], cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        """Logits [1, vocab] (float32) for token_id at `position`; writes its KV (not cache.length).
        cos/sin: the runner's rotary tables (sin signed as in model_runner.rope). The same call as
        FusedDraft.forward."""
        return self._model.forward(token_id, cache.keys, cache.values, position, cos, sin, sorted(skip_set))

    def forward_rows(self, token_ids: list[int], slots: list[int], positions: list[int], cache: KVCache,
                     skip_sets: list[frozenset[int]], cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] for N rows in one call: row i is token_ids[i] at positions[i] of slot
        slots[i] (a request's rows are consecutive positions: a verification is causal within
        itself), skipping skip_sets[i]. Writes their KV (not cache.lengths). The same call as
        FusedDraft.forward_rows."""
        return self._model.forward_rows(token_ids, slots, positions, cache.keys, cache.values, cos, sin,
                                        [sorted(k) for k in skip_sets])
