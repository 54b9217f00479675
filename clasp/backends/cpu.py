"""The CPU backend: fp32 matrices with measured product forms, a prepacked copy for verification,
and an int8 draft copy whose kernel is chosen by timing and an accuracy check.

Every choice here is measured on this machine at load, never read from a CPU flag:
- per weight shape, whether one fp32 row is computed as two (calibrate_single_row);
- whether to keep a oneDNN-prepacked copy, and from how many rows it is used (calibrate_packed_rows);
- which int8 kernel runs the draft (clasp.draft_kernels, cached per machine).
"""

from __future__ import annotations

import logging
import os
import time

import torch

from clasp import calibration_cache, draft_kernels, fp32_kernels
from clasp.backends.base import CostModel, LoadOptions
from clasp.draft_kernels import DraftKernelChoice
from clasp.fp32_kernels import Fp32KernelChoice
from clasp.matrices import DenseMatrix, PackedWeight
from clasp.model_runner import MATRICES, ModelRunner, Weights

log = logging.getLogger(__name__)


# Whether a single fp32 row on CPU is computed as two rows, per weight shape (calibrate_single_row).
# On some CPUs MKL's matrix-vector kernel streams weights at a third of the speed of its
# two-column product (docs/performance.md, "one fp32 row computed as two"). How much depends on
# the shape, the CPU and the BLAS build, so it is measured per shape, not assumed.
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
    the same. In phases when the VM's memory bandwidth is taken elsewhere both forms slow down
    alike and one row can come out slightly ahead; padding in such a phase costs at most that,
    while not padding costs up to 2x whenever the phase ends (figures: docs/performance.md).
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

    Which kernel wins for one or two rows depends on the CPU: on one host MKL's two rows stream the
    weights about as fast as one and packing pays only from 3 rows; on another, two rows cost
    nearly two steps unpacked (docs/performance.md). Timed on the model's own matrices (every layer and the
    lm_head, so they stream from memory as in decoding), plain and packed alternately, `repeats`
    pairs; the packed copy must be 15% faster by the median ratio to take over a row count.
    """
    pairs = [(getattr(p, m), getattr(q, m)) for p, q in zip(plain.layers, packed.layers) for m in MATRICES]
    pairs.append((plain.lm_head, packed.lm_head))

    def run(which: int, xs: dict[int, torch.Tensor]) -> float:
        t0 = time.perf_counter()
        for pair in pairs:
            pair[which](xs[pair[0].shape[1]])
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


def calibrate_fused_draft_rows(runner: ModelRunner, ids: torch.Tensor, batch_sizes=(2, 4, 8),
                               repeats: int = 5) -> int:
    """The largest batch for which B one-token fused draft calls beat one multi-row fused call over
    the same int8 matrices (which reads the weights once for all B rows): 1 where batching wins from 2.
    Timed alternately on B slots holding the calibration text, median of `repeats` paired ratios;
    batching must be 10% faster to take over (the fused call is the tuned single-stream path)."""
    from clasp.model_runner import Segment

    position = ids.shape[0] - 1
    largest = 1
    with torch.inference_mode():
        for b in batch_sizes:
            cache = runner.new_cache(ids.shape[0], num_slots=b)
            for slot in range(b):
                runner.forward(ids[:position], cache, 0, slot=slot)
            token = int(ids[position])

            def fused() -> float:
                t0 = time.perf_counter()
                for slot in range(b):
                    runner.fused_draft.forward(token, cache.slot_view(slot), position, frozenset(), runner._rope_cos,
                                               runner._rope_sin)
                return time.perf_counter() - t0

            def batched() -> float:
                t0 = time.perf_counter()
                runner.forward_batch([Segment(slot, position, ids[position:position + 1]) for slot in range(b)],
                                     cache, draft=True)
                return time.perf_counter() - t0

            fused(), batched()  # first-call costs
            ratios = sorted(batched() / fused() for _ in range(repeats))
            if ratios[len(ratios) // 2] < 0.9:
                break
            largest = b
    log.info("fused draft: one call per request up to %d requests per step, one multi-row call beyond", largest)
    return largest


def single_row_choices() -> dict[str, bool]:
    """{"OUTxIN": computed as two rows} for every shape calibrated in this process (for logs)."""
    return {f"{o}x{i}": pad for (o, i), pad in sorted(_PAD_SINGLE_ROW.items())}


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


def packing_available(runner: ModelRunner) -> bool:
    """Whether a prepacked copy can be made: fp32 on a CPU with oneDNN in this torch build."""
    return runner.device.type == "cpu" and runner.dtype == torch.float32 and torch.backends.mkldnn.is_available()


def pack_weights(runner: ModelRunner) -> None:
    """Keep a second, oneDNN-prepacked copy of the full weights for products of 3+ rows (or fewer
    where measured faster): verification, prefill and the DP. Costs the model's fp32 weight bytes
    again in memory; raises ValueError where packing is not available."""
    if not packing_available(runner):
        raise ValueError("weight packing needs an fp32 model on a CPU with oneDNN (torch.backends.mkldnn)")
    if runner.multi_row_weights is runner.weights:
        packed = runner.weights.packed()
        runner.set_multi_row_weights(packed, calibrate_packed_rows(runner.weights, packed))


def calibrate_single_rows(runner: ModelRunner) -> None:
    """calibrate_single_row for every dense fp32 matrix of the runner, recorded per machine
    (clasp.calibration_cache) so that later loads skip the measurement."""
    matrices = [m for m in runner.weights.matrices() if isinstance(m, DenseMatrix)]
    shapes = sorted({tuple(m.shape) for m in matrices})
    path = calibration_cache.record_path("single-row", {"shapes": shapes, "bytes": _CALIBRATION_BYTES})
    record = calibration_cache.read(path) or {}
    for shape in shapes:
        key = f"{shape[0]}x{shape[1]}"
        if isinstance(record.get(key), bool):
            _PAD_SINGLE_ROW.setdefault(shape, record[key])
    recorded = all(isinstance(record.get(f"{o}x{i}"), bool) for o, i in shapes)
    for m in matrices:
        m.pad_single_row = calibrate_single_row(m.shape)
    if not recorded:  # something was measured now
        calibration_cache.write(path, {f"{o}x{i}": _PAD_SINGLE_ROW[(o, i)] for o, i in shapes})


def weight_copy_fits(runner: ModelRunner) -> bool:
    """Whether a second copy of the full weights (a prepacked or blocked one) fits a quarter of the
    memory this process may use."""
    return runner.weights.nbytes() <= physical_memory() // 4


def set_up_fp32(runner: ModelRunner, options: LoadOptions) -> Fp32KernelChoice | None:
    """The full model's few-row products and plain step per options.fp32_kernel: measured among
    every candidate this machine runs (None), exactly torch's ("torch", not measured), or one
    instruction set of the blocked kernel (measured and logged, used for every few-row count)."""
    forced = options.fp32_kernel
    if forced is not None and forced not in fp32_kernels.FP32_KERNELS:
        raise ValueError(f"fp32_kernel must be one of {', '.join(fp32_kernels.FP32_KERNELS)}, got {forced!r}")
    names = fp32_kernels.available(runner)

    def install_forced(name: str) -> Fp32KernelChoice:
        choice = fp32_kernels.Fp32KernelChoice.forced(name)
        fp32_kernels.install(runner, choice)
        return choice

    if forced == "torch" or names == ["torch"] and forced is None:
        return install_forced("torch")
    if forced is not None:
        if forced not in names:
            raise ValueError(f"fp32_kernel {forced} cannot run here (available: {', '.join(names) or 'none'})")
        names = [forced]
    elif not weight_copy_fits(runner):  # the blocked copy costs the weights again
        log.info("fp32 products through torch: a blocked copy of %d MiB would not fit a quarter of memory",
                 runner.weights.nbytes() >> 20)
        return install_forced("torch")
    if options.calibration_ids is None:  # nothing to measure with: a forced kernel as is, else torch's products
        return None if forced is None else install_forced(forced)

    def packed():
        return runner.weights.packed() if packing_available(runner) and weight_copy_fits(runner) else None

    return fp32_kernels.choose_cached(runner, options.calibration_ids, names, options.model_identity, packed)


def fused_draft_rows_cached(runner: ModelRunner, options: LoadOptions) -> int:
    """calibrate_fused_draft_rows, recorded per machine for this model and draft kernel."""
    kernel = runner.fused_draft.isa if runner.fused_draft is not None else None
    path = calibration_cache.record_path("fused-draft-rows", {"model": options.model_identity, "isa": kernel})
    record = calibration_cache.read(path)
    if record is not None and isinstance(record.get("rows"), int) and record["rows"] >= 1:
        return record["rows"]
    rows = calibrate_fused_draft_rows(runner, options.calibration_ids)
    calibration_cache.write(path, {"rows": rows})
    return rows


def set_up_draft(runner: ModelRunner, options: LoadOptions) -> DraftKernelChoice | None:
    """Give the runner its draft copy per options.draft_dtype. An int8 copy gets the kernel chosen by
    measurement (clasp.draft_kernels) among those allowed: all (fused_draft None), the fused C++
    draft's (True), torch ops' (False), or exactly `draft_kernel`."""
    draft_dtype, fused_draft, draft_kernel = options.draft_dtype, options.fused_draft, options.draft_kernel
    forced = fused_draft is not None or draft_kernel is not None
    if forced and draft_dtype != torch.int8:
        what = "fused_draft" if draft_kernel is None else "draft_kernel"
        raise ValueError(f"{what} needs an int8 draft copy on CPU, not {draft_dtype} on cpu")
    if draft_dtype != torch.int8:
        runner.set_draft_dtype(draft_dtype)
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
        return draft_kernels.choose_cached(runner, options.calibration_ids, names, options.model_identity)
    except ValueError as e:
        if forced:
            raise
        if options.draft_dtype_name != "auto":
            raise ValueError(f"draft_dtype int8 is not supported on cpu by this torch build ({e}); "
                             f"use float16 or bfloat16") from e
        log.warning("no int8 kernel runs here (%s): the draft copy falls back to float16", e)
        runner.set_draft_dtype(torch.float16)
        return None


class CpuBackend:
    name = "cpu"

    def __init__(self) -> None:
        self.draft_kernel: DraftKernelChoice | None = None
        self.fp32_kernel: Fp32KernelChoice | None = None

    def prepare(self, runner: ModelRunner, options: LoadOptions) -> DraftKernelChoice | None:
        if runner.dtype == torch.float32:
            calibrate_single_rows(runner)  # now, not in the first request
            self.fp32_kernel = set_up_fp32(runner, options)
        self.draft_kernel = set_up_draft(runner, options)
        if runner.fused_draft is not None and options.calibration_ids is not None:
            runner.fused_draft_max_rows = fused_draft_rows_cached(runner, options)
        pack = options.pack_weights
        if pack is None:  # where torch keeps the few-row products, where it fits
            pack = (packing_available(runner) and weight_copy_fits(runner)
                    and (self.fp32_kernel is None or self.fp32_kernel.isa is None))  # no third copy
        if pack:
            pack_weights(runner)
        return self.draft_kernel

    def cost_model(self, runner: ModelRunner) -> CostModel:
        """From weight bytes: a plain step reads every weight once; the first extra verification row
        costs more than later ones, since a plain step has a one-row kernel of its own (measured
        ratios: docs/performance.md)."""
        return CostModel(1.0 / runner.weights.nbytes(), 1.0, 0.2, 0.07 if runner.packed_nbytes else 0.15)

    def describe(self) -> dict:
        fp32 = self.fp32_kernel
        return {"backend": self.name, "single_row_as_two": single_row_choices(),
                "fp32_kernel": None if fp32 is None else {"few_rows": f"{fp32.one_row} for 1-{fp32.max_rows} rows"
                                                          if fp32.max_rows else "torch",
                                                          "one_call_step": fp32.fused_step},
                "draft_kernel": self.draft_kernel.chosen if self.draft_kernel else None}


