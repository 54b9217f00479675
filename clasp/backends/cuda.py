"""The CUDA backend: fused norms, static-shape steps captured as CUDA graphs, KV-cache storage at
fixed addresses, a draft copy chosen by measurement, and costs measured on the device at load.

Every choice here is measured on this device at load, never read from a table:
- RMSNorm: torch's fused `F.rms_norm`, kept where it matches the reference formula
  (model_runner.rms_norm: normalise in fp32, round, multiply) to within one rounding on random
  inputs; otherwise the reference.
- Static steps (clasp.static_step): the one-token step, the greedy drafting loop and verification
  passes of up to static_step.MAX_ROWS rows are captured as CUDA graphs on first use, per cache
  storage, slots, rows, skip set and weight set, and replayed; a drafting round is then K replays
  and one read to the host. They are checked against the eager pass once at load (same argmax,
  close logits) and switched off, with a warning, where capture fails or they disagree.
- KV caches come from a pool (static_step.CachePool) whose storage is reused by later requests,
  so graphs captured over it stay valid; capacities are rounded up to powers of two.
- The draft copy (`draft_dtype` auto): the candidates of DRAFT_CANDIDATES this device and torch
  can run draft a fixed text; each is timed as a captured one-token draft step and its next-token
  choices are compared with the full model's; the fastest whose agreement is close to the best
  is kept (clasp.draft_kernels.select, the CPU's rule). Verification always runs on the full
  weights, so the choice changes speed and acceptance, never the output.
- Costs (CostModel): a full step of 1, 2 and K+1 rows and a draft token, timed with CUDA events.
- Free device memory is checked before the draft copy and every KV cache is made: a copy or
  cache that would not fit raises ValueError saying how much it needs and how much is free.

Figures measured with it go in docs/performance.md.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time

import torch
import torch.nn.functional as F

from clasp import draft_kernels
from clasp.backends.base import CostModel, LoadOptions, draft_token_bytes
from clasp.draft_kernels import Candidate, DraftKernelChoice
from clasp.kv_cache import KVCache
from clasp.matrices import DenseMatrix, Fp32LogitsMatrix
from clasp.model_runner import ModelRunner, Segment, rms_norm
from clasp.static_step import CachePool, StaticSteps

log = logging.getLogger(__name__)

RESERVE_BYTES = 1 << 30  # left free beyond a copy or cache: graph pools, cuBLAS workspaces, activations
COST_CONTEXT = 128  # context positions the load-time timings attend over
COST_DRAFT_LENGTH = 8  # ClaspConfig's default K: verification is timed at K+1 rows
TIMED_REPEATS = 20
# Draft copies tried with draft_dtype auto: the full weights shared (no copy); fp8 (e4m3) weights
# with per-row activation scales through torch._scaled_mm (compute capability 8.9+: Ada, Hopper);
# weight-only int8 through torch's int8-weight kernel.
DRAFT_CANDIDATES = ("shared", "fp8-rowwise", "int8-weight-only")
FP8_MAX = 448.0  # largest float8_e4m3fn value


# ---------------------------------------------------------------------- norms
def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as one torch op (fused where torch has a kernel for the device and dtype)."""
    return F.rms_norm(x, (x.shape[-1],), weight if weight.dtype == x.dtype else weight.to(x.dtype), eps)


def norm_difference(device: torch.device, dtype: torch.dtype, hidden: int, eps: float) -> float:
    """Largest |fused - reference| over |reference| on random inputs (in units of the dtype's eps)."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(8, hidden, device=device, generator=gen).to(dtype) * 3
    w = (1 + 0.1 * torch.randn(hidden, device=device, generator=gen)).to(dtype)
    ref, fused = rms_norm(x, w, eps).float(), fused_rms_norm(x, w, eps).float()
    return float(((fused - ref).abs() / ref.abs().clamp(min=1e-3)).max()) / torch.finfo(dtype).eps


# ---------------------------------------------------------------------- memory
def free_bytes(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of device memory."""
    return torch.cuda.mem_get_info(device)


def check_free_memory(device: torch.device, need: int, what: str) -> None:
    """ValueError unless `need` bytes fit in the device's free memory with RESERVE_BYTES to spare
    (CUDA only: elsewhere, as in the CPU rehearsal of this backend, nothing is checked)."""
    if device.type != "cuda":
        return
    free, total = free_bytes(device)
    if need + RESERVE_BYTES > free:
        raise ValueError(f"{what} needs {need / 2**30:.2f} GiB, and {free / 2**30:.2f} GiB of {total / 2**30:.1f} GiB "
                         f"are free on {device} ({RESERVE_BYTES / 2**30:.0f} GiB are kept in reserve)")


# ---------------------------------------------------------------------- fp8 matrices
@dataclasses.dataclass(frozen=True)
class Fp8Weight:
    """An fp8 (e4m3) matrix for the draft copy: one scale per output channel; each product scales
    its activations per row to fp8 and multiplies with torch._scaled_mm (fp32 accumulation,
    16-bit output). Half a 16-bit matrix's bytes."""

    q: torch.Tensor  # [out, in] float8_e4m3fn, row-major (q.T is the column-major operand _scaled_mm takes)
    scale: torch.Tensor  # [1, out] float32

    dtype = torch.float8_e4m3fn

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @classmethod
    def quantize(cls, w: "torch.Tensor | DenseMatrix") -> "Fp8Weight":
        w = (w.weight if isinstance(w, DenseMatrix) else w).detach()
        scale = w.abs().amax(dim=1).float().clamp(min=1e-12) / FP8_MAX  # [out]
        q = (w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).contiguous()
        return cls(q, scale[None, :].contiguous())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] @ self.T in x's dtype."""
        x_scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX  # [T, 1]
        xq = (x.float() / x_scale).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(xq, self.q.T, scale_a=x_scale, scale_b=self.scale, out_dtype=torch.bfloat16)
        return out.to(x.dtype)

    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 4


def fp8_unavailable(device: torch.device) -> str | None:
    """Why fp8 products cannot run on this device (None: they can)."""
    if not hasattr(torch, "_scaled_mm") or not hasattr(torch, "float8_e4m3fn"):
        return "this torch build has no torch._scaled_mm"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return f"compute capability {torch.cuda.get_device_capability(device)} < (8, 9)"
    return None


# ---------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_forward(runner: ModelRunner, rows: int, draft: bool, skip_set: frozenset[int] = frozenset(),
                 context: int = COST_CONTEXT, repeats: int = TIMED_REPEATS) -> float:
    """Median ms of one forward pass of `rows` tokens after `context` positions (random tokens), on
    a scratch cache, through the runner's static steps where they cover it. CUDA events on CUDA,
    the host clock elsewhere."""
    s = runner.spec
    cache = KVCache(s.num_layers, s.num_kv_heads, s.head_dim, context + rows, runner.dtype, runner.device)
    runner._ensure_rope(context + rows)
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, s.vocab_size, (context + rows,), generator=gen).to(runner.device)
    runner.forward(ids[:context], cache, 0, last_only=True)
    segment = [Segment(0, context, ids[context:], skip_set)]
    cuda = runner.device.type == "cuda"
    marks = []  # (start, end): CUDA events, or host clock readings
    for _ in range(repeats + 3):  # the first 3 warm up (and capture)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runner.forward_batch(segment, cache, draft=draft)
            end.record()
        else:
            start = time.perf_counter()
            runner.forward_batch(segment, cache, draft=draft)
            end = time.perf_counter()
        marks.append((start, end))
    _sync(runner.device)
    ms = [a.elapsed_time(b) if cuda else (b - a) * 1e3 for a, b in marks[3:]]
    if runner.static_steps is not None:
        runner.static_steps.forget(cache)
    return statistics.median(ms)


@torch.inference_mode()
def draft_agreement(runner: ModelRunner, ids: torch.Tensor) -> float:
    """Share of positions of ids [T] where the draft's full-depth next-token choice equals the full
    model's (teacher-forced: both read the same text)."""
    s = runner.spec
    caches = [KVCache(s.num_layers, s.num_kv_heads, s.head_dim, ids.shape[0], runner.dtype, runner.device)
              for _ in range(2)]
    full = runner.forward(ids, caches[0], 0).argmax(-1)
    drafted = runner.forward_batch([Segment(0, 0, ids)], caches[1], draft=True).argmax(-1)
    return float((full == drafted).float().mean())


# ---------------------------------------------------------------------- the backend
class CudaBackend:
    name = "cuda"

    def __init__(self, graphs: bool = True) -> None:
        """graphs: capture static steps as CUDA graphs (False: every pass eager, for comparison)."""
        self.graphs = graphs
        self.draft_kernel: DraftKernelChoice | None = None
        self.norm: dict = {}
        self.costs_ms: dict[str, float] = {}
        self.graph_check: dict = {}
        self.pool: CachePool | None = None
        self._cost_model: CostModel | None = None

    def prepare(self, runner: ModelRunner, options: LoadOptions) -> DraftKernelChoice | None:
        if options.fused_draft is not None or options.draft_kernel is not None:
            what = "fused_draft" if options.draft_kernel is None else "draft_kernel"
            raise ValueError(f"{what} needs an int8 draft copy on CPU, not {options.draft_dtype} on cuda")
        if options.pack_weights:
            raise ValueError("weight packing needs an fp32 model on a CPU with oneDNN (torch.backends.mkldnn)")
        device = runner.device
        t0 = time.perf_counter()
        self._install_norm(runner)
        self._fp32_logits(runner.weights)
        self.pool = CachePool(check_memory=lambda need, what: check_free_memory(device, need, what),
                              on_release=lambda storage: runner.static_steps and runner.static_steps.forget(storage))
        runner.cache_pool = self.pool
        if self.graphs:  # captured on CUDA; eager elsewhere (the CPU rehearsal of this backend)
            runner.static_steps = StaticSteps(runner, capture=device.type == "cuda")
            self._check_graphs(runner)
        self.draft_kernel = self._set_up_draft(runner, options)
        self._fp32_logits(runner.draft_weights)
        self._measure_costs(runner)
        log.info("cuda backend ready in %.1f s: %s", time.perf_counter() - t0, self.describe())
        return self.draft_kernel

    # ------------------------------------------------------------------ pieces
    def _install_norm(self, runner: ModelRunner) -> None:
        s = runner.spec
        try:
            diff = norm_difference(runner.device, runner.dtype, s.hidden_size, s.rms_norm_eps)
        except RuntimeError as e:
            diff, error = float("inf"), str(e).splitlines()[0]
        else:
            error = None
        fused = diff <= 1.0  # within one rounding of the reference
        if fused:
            runner.norm = fused_rms_norm
        self.norm = {"fused": fused, "difference_eps": round(diff, 3) if diff != float("inf") else None,
                     **({"error": error} if error else {})}

    @staticmethod
    def _fp32_logits(weights) -> None:
        head = weights.lm_head
        if isinstance(head, DenseMatrix) and not isinstance(head, Fp32LogitsMatrix) and head.dtype in (
                torch.float16, torch.bfloat16):
            weights.lm_head = Fp32LogitsMatrix(head.weight)

    def _check_graphs(self, runner: ModelRunner) -> None:
        """The captured one-token step against the eager one, once: switched off where capture fails
        or their logits are not finite or further apart than 2% of their largest magnitude (a wrong
        position or address gives far more; the attention's summation order, in 16 bits, less). The
        argmax is recorded, not required: on random tokens a 16-bit near-tie may flip it."""
        s = runner.spec
        steps = runner.static_steps
        context = 16
        caches = [KVCache(s.num_layers, s.num_kv_heads, s.head_dim, context + 1, runner.dtype, runner.device)
                  for _ in range(2)]
        runner._ensure_rope(context + 1)
        ids = torch.randint(0, s.vocab_size, (context + 1,), generator=torch.Generator().manual_seed(2))
        ids = ids.to(runner.device)
        try:
            with torch.inference_mode():
                runner.static_steps = None
                for cache in caches:
                    runner.forward(ids[:context], cache, 0, last_only=True)
                eager = runner.forward(ids[context:], caches[0], context)
                runner.static_steps = steps
                captured = runner.forward(ids[context:], caches[1], context)
            gap = float((eager - captured).abs().max())
            scale = float(eager.abs().max())
            ok = bool(torch.isfinite(captured).all()) and gap <= 0.02 * max(scale, 1.0)
            self.graph_check = {"passed": ok, "max_logit_gap": round(gap, 5),
                                "same_argmax": bool(torch.equal(eager.argmax(-1), captured.argmax(-1)))}
        except RuntimeError as e:
            ok, self.graph_check = False, {"error": str(e).splitlines()[0]}
        steps.forget(caches[1])
        if not ok:
            log.warning("CUDA graphs are off: the captured step failed its check (%s)", self.graph_check)
            runner.static_steps = None

    def _set_up_draft(self, runner: ModelRunner, options: LoadOptions) -> DraftKernelChoice | None:
        dtype, name = options.draft_dtype, options.draft_dtype_name
        if name == "auto":
            return self._choose_draft(runner, options.calibration_ids)
        if dtype is None or (dtype != torch.int8 and torch.finfo(dtype).bits >= torch.finfo(runner.dtype).bits):
            runner.set_draft_dtype(None)
            return None
        ratio = 0.5 if dtype == torch.int8 else torch.finfo(dtype).bits / torch.finfo(runner.dtype).bits
        check_free_memory(runner.device, int(runner.weights.nbytes() * ratio), f"the {name} draft copy")
        runner.set_draft_dtype(dtype)  # raises ValueError where there is no int8 kernel
        return None

    def _candidate_copy(self, runner: ModelRunner, name: str):
        """The draft weights for a candidate (raises RuntimeError/ValueError where it cannot run)."""
        if name == "shared":
            return runner.weights
        check_free_memory(runner.device, runner.weights.nbytes() // 2, f"the {name} draft copy")
        if name == "fp8-rowwise":
            reason = fp8_unavailable(runner.device)
            if reason:
                raise ValueError(reason)
            copy = runner.weights.map_matrices(Fp8Weight.quantize)
            copy.lm_head(torch.ones(1, runner.spec.hidden_size, device=runner.device, dtype=runner.dtype))  # probe
            return copy
        runner.set_draft_dtype(torch.int8)  # probes torch's int8-weight kernel
        copy, runner.draft_weights = runner.draft_weights, runner.weights
        return copy

    def _choose_draft(self, runner: ModelRunner, ids: torch.Tensor | None) -> DraftKernelChoice:
        """Measure each candidate (one copy alive at a time beside the best so far) and keep the one
        draft_kernels.select() picks."""
        t0 = time.perf_counter()
        if ids is None or ids.shape[0] < 8:
            ids = torch.randint(0, runner.spec.vocab_size, (64,), generator=torch.Generator().manual_seed(3))
        ids = ids.to(runner.device)
        measured, kept = [], {}
        for name in DRAFT_CANDIDATES:
            try:
                copy = self._candidate_copy(runner, name)
                runner.draft_weights = copy
                ms = time_forward(runner, 1, draft=True)
                agreement = 1.0 if name == "shared" else draft_agreement(runner, ids)
                measured.append(Candidate(name, ms, agreement))
                kept[name] = copy
            except (RuntimeError, ValueError, NotImplementedError, TypeError) as e:
                measured.append(Candidate(name, None, None, error=str(e).splitlines()[0]))
            finally:
                runner.draft_weights = runner.weights
            # Keep only the best passing copy so far (shared always passes: agreement 1.0 sets the bar).
            if kept:
                chosen, _ = draft_kernels.select(measured)
                kept = {chosen: kept[chosen]} if chosen in kept else kept
            if runner.static_steps is not None:
                runner.static_steps.clear()
            if runner.device.type == "cuda":
                torch.cuda.empty_cache()
        chosen, measured = draft_kernels.select(measured)
        runner.set_draft_dtype(None)
        runner.draft_weights = kept[chosen]
        choice = DraftKernelChoice(chosen, tuple(measured), int(ids.shape[0]), time.perf_counter() - t0)
        log.info("cuda draft copy %s: %s", chosen, ", ".join(draft_kernels._describe(c) for c in measured))
        return choice

    def _measure_costs(self, runner: ModelRunner) -> None:
        k = COST_DRAFT_LENGTH
        times = {f"rows_{n}": time_forward(runner, n, draft=False) for n in (1, 2, k + 1)}
        times["draft_token"] = time_forward(runner, 1, draft=True)
        self.costs_ms = {key: round(v, 4) for key, v in times.items()}
        step = times["rows_1"]
        first = max(0.0, times["rows_2"] - step) / step
        extra = max(0.0, times[f"rows_{k + 1}"] - times["rows_2"]) / ((k - 1) * step)
        per_byte = times["draft_token"] / step / draft_token_bytes(runner, 0)
        self._cost_model = CostModel(per_byte, 1.0, first, extra)
        if runner.static_steps is not None:
            runner.static_steps.clear()  # scratch caches only

    def cost_model(self, runner: ModelRunner) -> CostModel:
        """Measured at load on this device (_measure_costs), in units of a one-row step. A runner
        this backend did not prepare gets weight-byte costs with nearly free extra rows (what the
        generic device backend assumes) rather than a measurement at every call."""
        if self._cost_model is None:
            return CostModel(1.0 / runner.weights.nbytes(), 1.0, 0.01, 0.01)
        return self._cost_model

    def describe(self) -> dict:
        return {"backend": self.name, "graphs": self.graphs, "graph_check": self.graph_check, "norm": self.norm,
                "draft_kernel": self.draft_kernel.as_dict() if self.draft_kernel else None,
                "costs_ms": self.costs_ms}
