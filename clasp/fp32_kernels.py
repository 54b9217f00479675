"""Which kernel computes the full model's fp32 CPU products of few rows, and whether a plain
decoding step runs as one C++ call: chosen at load by timing and accuracy checks, never from a CPU
flag, and recorded per machine (clasp.calibration_cache).

Candidates (FP32_KERNELS):
  torch         the plain matrices through torch (MKL), one row computed as two where measured
                faster, and a oneDNN-prepacked copy for 3+ rows where that pays (clasp.backends.cpu)
  clasp-avx512, clasp-avx2, clasp-portable  clasp.cpu_draft's Fp32Matrix over a blocked copy of
                the weights (one pass over them per 64 rows), in each instruction set this CPU runs

The products are timed on the model's own matrices (every layer and the lm_head, so they stream
from memory as in decoding) at each of ROWS, the candidates taking turns, median of REPEATS; each
candidate's products are checked against float64 on the same matrices. The blocked kernel takes the
row counts where it is at least MIN_GAIN faster than torch's best form, from one row up to the first
count where it is not (one instruction set for all). Where it takes one row, a plain step can also
run in one C++ call (cpu_draft.FusedFp32Step: norms, rotary, attention and products without the
~900 small torch calls of the runner's step); that is timed against the runner's torch step token
by token on a fixed text and must make the full model's next-token choices.

Every candidate computes the fp32 model's products, so the choice moves logits by rounding only
(the accuracy checks bound it); the tests force each path.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time

import torch

from clasp import calibration_cache
from clasp.config import FP32_KERNELS
from clasp.matrices import BlockedFp32Weight, DenseMatrix
from clasp.model_runner import MATRICES, ModelRunner, Segment

log = logging.getLogger(__name__)

ROWS = (1, 2, 5, 9, 16, 32)  # a plain step; verifying drafts of 1, 4 and 8; batches of streams' drafts
REPEATS = 3
MIN_GAIN = 0.05  # the blocked kernel must be this much faster than torch's best form to take a row count
GIVE_UP = 2.0  # a blocked candidate this many times slower than torch at some row count is not timed further
MAX_RELATIVE_ERROR = 1e-5  # of a product against float64, relative to its largest value
STEP_TOKENS = 16  # one-call steps timed (and checked) against the runner's step, after WARM_UP
WARM_UP = 2


@dataclasses.dataclass(frozen=True)
class Fp32KernelChoice:
    """The full model's few-row products and plain steps as chosen (and what was measured)."""

    isa: str | None  # the blocked kernel's instruction set (cpu_draft.FP32_ISAS); None: torch throughout
    max_rows: int  # the blocked kernel computes products of 1..max_rows rows (0: none)
    fused_step: bool  # plain one-token steps in one C++ call
    ms: dict  # {candidate: {rows: ms for all the model's products}}; torch: its best form per row count
    errors: dict  # {candidate: max relative error against float64, or why it could not run}
    step_ms: dict  # {"torch": ms, "fused": ms} per plain step, where the one-call step was measured
    step_agreement: float | None  # share of the one-call step's next tokens equal to the full model's
    seconds: float
    cached: bool = False

    @property
    def one_row(self) -> str:
        return f"clasp-{self.isa}" if self.max_rows >= 1 else "torch"

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ms"] = {name: {str(r): v for r, v in rows.items()} for name, rows in self.ms.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Fp32KernelChoice":
        ms = {name: {int(r): float(v) for r, v in rows.items()} for name, rows in d["ms"].items()}
        return cls(d["isa"], int(d["max_rows"]), bool(d["fused_step"]), ms, dict(d["errors"]), dict(d["step_ms"]),
                   d["step_agreement"], float(d["seconds"]), True)

    @classmethod
    def forced(cls, name: str, fused_step: bool = True) -> "Fp32KernelChoice":
        """`name` (one of FP32_KERNELS) for every few-row product, unmeasured."""
        if name not in FP32_KERNELS:
            raise ValueError(f"fp32_kernel must be one of {', '.join(FP32_KERNELS)}, got {name!r}")
        isa = None if name == "torch" else name.removeprefix("clasp-")
        return cls(isa, 0 if isa is None else ROWS[-1], fused_step and isa is not None,
                   {}, {}, {}, None, 0.0)


def applicable(runner: ModelRunner) -> bool:
    return runner.device.type == "cpu" and runner.dtype == torch.float32


def available(runner: ModelRunner) -> list[str]:
    """The candidates this runner and CPU can run: torch, and the blocked kernel's instruction sets
    where the extension builds."""
    if not applicable(runner):
        return []
    from clasp import cpu_draft

    try:
        isas = cpu_draft.supported_fp32_isas()
    except RuntimeError as e:
        log.warning("the fp32 CPU kernel is unavailable (%s)", e)
        isas = []
    return ["torch"] + [f"clasp-{isa}" for isa in isas]


# ----------------------------------------------------------------------------- installing
def block_weights(runner: ModelRunner, isa: str) -> None:
    """Give every matrix of the runner's full weights its blocked copy in instruction set `isa`
    (made once; later calls switch the instruction set). In place: a draft that shares the full
    weights shares the kernel too."""
    from clasp.cpu_draft import FP32_ISAS

    if isa not in FP32_ISAS:
        raise ValueError(f"isa must be one of {', '.join(FP32_ISAS)}, got {isa!r}")
    weights = runner.weights
    for lw in weights.layers:
        for name in MATRICES:
            setattr(lw, name, _blocked(getattr(lw, name), isa))
    weights.lm_head = _blocked(weights.lm_head, isa)


def _blocked(m, isa: str) -> BlockedFp32Weight:
    from clasp.cpu_draft import FP32_ISAS

    if isinstance(m, BlockedFp32Weight):
        if m.kernel.isa != FP32_ISAS[isa]:
            m.kernel.isa = FP32_ISAS[isa]
        return m
    return BlockedFp32Weight.block(m, isa)


def install(runner: ModelRunner, choice: Fp32KernelChoice) -> None:
    """Set the runner's few-row products and plain step per `choice`. Raises RuntimeError where
    this CPU cannot run its instruction set."""
    if choice.isa is None or choice.max_rows == 0:
        unblock_weights(runner)  # the blocked copies' memory goes back
        runner.fused_step = None
        return
    block_weights(runner, choice.isa)
    for m in runner.weights.matrices():
        m.min_rows, m.max_rows = 1, choice.max_rows
    if choice.fused_step and one_call_possible(runner):
        runner.enable_fused_step(choice.isa)
        runner.fused_step_max_rows = choice.max_rows  # passes of more rows take torch's products
    else:
        runner.fused_step = None


def unblock_weights(runner: ModelRunner) -> None:
    """Back to plain matrices (dropping the blocked copies), in place."""
    def plain(m):
        return DenseMatrix(m.weight, m.pad_single_row) if isinstance(m, BlockedFp32Weight) else m

    for lw in runner.weights.layers:
        for name in MATRICES:
            setattr(lw, name, plain(getattr(lw, name)))
    runner.weights.lm_head = plain(runner.weights.lm_head)


def one_call_possible(runner: ModelRunner) -> bool:
    """Whether the one-call step covers this model (not with q/k norms, as in Qwen3)."""
    return applicable(runner) and runner.weights.layers[0].q_norm is None


# ----------------------------------------------------------------------------- measuring
def _inputs(runner: ModelRunner, rows: int) -> dict[int, torch.Tensor]:
    generator = torch.Generator().manual_seed(rows)
    widths = {m.shape[1] for m in runner.weights.matrices()}
    return {k: torch.randn(rows, k, generator=generator) for k in widths}


def _relative_error(product, w: torch.Tensor, x: torch.Tensor) -> float:
    reference = x.double() @ w.double().T
    return float((product(x).double() - reference).abs().max() / reference.abs().max().clamp(min=1e-30))


def measure_products(runner: ModelRunner, isas: list[str], packed=None) -> tuple[dict, dict]:
    """({candidate: {rows: ms}}, {candidate: max relative error or reason}) for torch (its best
    form per row count: the plain matrices as the runner has them, or `packed`, a prepacked copy
    of the weights, where given) and each instruction set in `isas` (the blocked copies must exist)."""
    from clasp.cpu_draft import FP32_ISAS

    plain = [DenseMatrix(m.weight, m.pad_single_row) for m in runner.weights.matrices()]
    blocked = [m.kernel for m in runner.weights.matrices()]
    forms = {"torch": plain}
    if packed is not None:
        forms["torch-packed"] = packed.matrices()
    for isa in isas:
        forms[f"clasp-{isa}"] = blocked

    def set_isa(name: str) -> None:
        if name.startswith("clasp-"):
            code = FP32_ISAS[name.removeprefix("clasp-")]
            for k in blocked:
                if k.isa != code:
                    k.isa = code

    errors = {}
    probe = [0, 3, len(plain) - 1]  # a layer's qkv and down, and the lm_head
    with torch.inference_mode():
        for name, mats in forms.items():
            set_isa(name)
            errors[name] = max(_relative_error(mats[i], plain[i].weight, x[plain[i].shape[1]])
                               for rows in (1, ROWS[-1]) for x in [_inputs(runner, rows)] for i in probe)
        times = {name: {} for name in forms}
        active = list(forms)
        for rows in ROWS:
            xs = _inputs(runner, rows)
            names = list(active)
            for name in names:
                times[name][rows] = []
            for repeat in range(REPEATS + 1):  # the first round pays first-call costs
                for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                    set_isa(name)
                    t0 = time.perf_counter()
                    for m in forms[name]:
                        m(xs[m.shape[1]])
                    if repeat:
                        times[name][rows].append(time.perf_counter() - t0)
            # A blocked candidate over GIVE_UP times slower than torch here cannot win at more rows.
            torch_best = min(statistics.median(times[n][rows]) for n in names if n.startswith("torch"))
            active = [n for n in active if n.startswith("torch") or statistics.median(times[n][rows]) < GIVE_UP * torch_best]
    ms = {name: {rows: statistics.median(t) * 1e3 for rows, t in per.items() if t} for name, per in times.items()}
    if "torch-packed" in ms:  # torch's best form per row count
        packed_ms = ms.pop("torch-packed")
        ms["torch"] = {rows: min(v, packed_ms.get(rows, v)) for rows, v in ms["torch"].items()}
        errors["torch"] = max(errors["torch"], errors.pop("torch-packed"))
    return ms, errors


def select(ms: dict, errors: dict) -> tuple[str | None, int]:
    """(instruction set, max_rows) by the rule in the module docstring: the accurate blocked
    candidate fastest at one row (then over all rows) takes rows 1..max_rows, the largest measured
    count up to which it beats torch by MIN_GAIN at every measured count (counts between measured
    ones cost in between). (None, 0) where none qualifies."""
    accurate = [n for n in ms if n != "torch" and isinstance(errors.get(n), float) and errors[n] < MAX_RELATIVE_ERROR
                and 1 in ms[n]]
    if not accurate:
        return None, 0
    best = min(accurate, key=lambda n: (ms[n][1], sum(ms[n].values())))
    max_rows = 0
    for rows in ROWS:
        if rows not in ms[best] or not ms[best][rows] <= (1 - MIN_GAIN) * ms["torch"][rows]:
            break
        max_rows = rows
    return (best.removeprefix("clasp-"), max_rows) if max_rows else (None, 0)


def measure_step(runner: ModelRunner, ids: torch.Tensor) -> tuple[dict, float, float]:
    """({"torch": ms, "fused": ms}, agreement, max relative logit difference) of the one-call plain
    step against the runner's own step (both installed: runner.fused_step set), token by token in
    turn over the last STEP_TOKENS + WARM_UP tokens of ids [T] after a prefill of the rest; agreement
    is with the full model's next-token choices over the whole text."""
    fused = runner.fused_step
    n = min(ids.shape[0] - 1, STEP_TOKENS + WARM_UP)
    start = ids.shape[0] - n
    times = {"torch": [], "fused": []}
    agree, worst = 0, 0.0
    with torch.inference_mode():
        runner.fused_step = None
        reference = runner.forward(ids, runner.new_cache(ids.shape[0]), 0).argmax(-1)
        caches = {name: runner.new_cache(ids.shape[0]) for name in times}
        for cache in caches.values():
            runner.forward(ids[:start], cache, 0, last_only=True)
        for i, position in enumerate(range(start, ids.shape[0])):
            logits = {}
            for name in (("torch", "fused") if i % 2 else ("fused", "torch")):
                runner.fused_step = fused if name == "fused" else None
                t0 = time.perf_counter()
                logits[name] = runner.forward_batch([Segment(0, position, ids[position:position + 1])], caches[name])
                if i >= WARM_UP:
                    times[name].append(time.perf_counter() - t0)
            agree += int(logits["fused"][0].argmax() == reference[position])
            worst = max(worst, float((logits["fused"] - logits["torch"]).abs().max() / logits["torch"].abs().max()))
    runner.fused_step = fused
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}, agree / n, worst


def choose(runner: ModelRunner, ids: torch.Tensor, candidates: list[str], packed=None) -> Fp32KernelChoice:
    """Measure `candidates` (from available()) and install the choice. packed: a prepacked copy of
    the weights, for torch's few-row form (it is measured, not installed, here)."""
    t0 = time.perf_counter()
    isas = [n.removeprefix("clasp-") for n in candidates if n != "torch"]
    if not isas:
        return Fp32KernelChoice(None, 0, False, {}, {}, {}, None, time.perf_counter() - t0)
    block_weights(runner, isas[0])
    ms, errors = measure_products(runner, isas, packed)
    if "torch" not in candidates:  # one instruction set forced: measured, and used for every few-row count
        isa, max_rows = isas[0], ROWS[-1]
    else:
        isa, max_rows = select(ms, errors)
    step_ms, agreement, fused = {}, None, False
    if isa is not None:
        install(runner, Fp32KernelChoice(isa, max_rows, True, ms, errors, {}, None, 0.0))
    if runner.fused_step is not None:  # installed where the model has one (install checks one_call_possible)
        step_ms, agreement, difference = measure_step(runner, ids)
        # The one-call step computes what the runner's step does, to rounding: it must agree with the
        # full model's choices as the runner's own step does (at most one near-tie apart) and be faster.
        fused = (agreement >= 1 - 1.5 / STEP_TOKENS and difference < 1e-3
                 and step_ms["fused"] <= (1 - MIN_GAIN) * step_ms["torch"])
    choice = Fp32KernelChoice(isa, max_rows, fused, ms, errors, step_ms, agreement, time.perf_counter() - t0)
    install(runner, choice)
    log.info("fp32 products: %s for 1-%d rows, one-call plain step %s (%s; step %s, agreement %s)",
             choice.one_row, max_rows, "on" if fused else "off",
             ", ".join(f"{n} " + "/".join(f"{v:.1f}" for v in rows.values()) + " ms" for n, rows in ms.items()),
             step_ms or "-", agreement)
    return choice


def cache_path(model_identity: str, candidates: list[str]):
    return calibration_cache.record_path("fp32-kernel", {
        "model": model_identity, "candidates": candidates,
        "rule": [ROWS, REPEATS, MIN_GAIN, GIVE_UP, MAX_RELATIVE_ERROR, STEP_TOKENS, WARM_UP]})


def choose_cached(runner: ModelRunner, ids: torch.Tensor, candidates: list[str], model_identity: str,
                  packed_factory=None) -> Fp32KernelChoice:
    """choose(), measured once per machine: later loads install the recorded choice.
    packed_factory: makes the prepacked copy torch's few-row form is measured with (only called
    when measuring)."""
    path = cache_path(model_identity, candidates)
    record = calibration_cache.read(path)
    if record is not None:
        try:
            choice = Fp32KernelChoice.from_dict(record)
            install(runner, choice)
            log.info("fp32 products: %s for 1-%d rows, one-call step %s (measured earlier on this machine: %s)",
                     choice.one_row, choice.max_rows, "on" if choice.fused_step else "off", path)
            return choice
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            log.warning("ignoring the fp32 kernel record %s (%s): measuring", path, e)
    packed = packed_factory() if packed_factory is not None and "torch" in candidates else None
    choice = choose(runner, ids, candidates, packed)
    calibration_cache.write(path, choice.as_dict())
    return choice


def summary(runner: ModelRunner) -> str:
    """The full model's fp32 product forms as installed, in words (for logs and benchmark notes)."""
    if not applicable(runner):
        return f"{str(runner.dtype).removeprefix('torch.')} products on {runner.device.type}"
    head = runner.weights.lm_head
    parts = []
    if isinstance(head, BlockedFp32Weight) and head.max_rows:
        from clasp.cpu_draft import FP32_ISAS

        isa = next(name for name, code in FP32_ISAS.items() if code == head.kernel.isa)
        parts.append(f"blocked fp32 kernel ({isa}) for {head.min_rows}-{head.max_rows} rows")
    else:
        parts.append("torch fp32 products")
    parts.append("one-call plain step" if runner.fused_step is not None else "plain steps through torch ops")
    if runner.packed_nbytes:
        parts.append(f"prepacked copy from {runner.packed_min_rows} rows")
    return ", ".join(parts)
