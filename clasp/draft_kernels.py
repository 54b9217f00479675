"""Which kernel runs the int8 CPU draft: chosen at load by timing and an accuracy check.

Kernels rank differently on different CPUs, and a fast kernel can be a wrong one: without AVX-512
VNNI, fbgemm's full-range int8 products saturate 16-bit sums and its draft agrees with the model
on about half the tokens the exact kernels do (docs/performance.md). So nothing is picked from a
CPU flag. Every candidate this machine can run drafts a fixed text one token at a time on the
model's own weights, the candidates taking turns token by token so that load from elsewhere
slows them alike; each is timed, and its next-token choices are compared with the fp32 model's
on the same text. The fastest candidate whose agreement is close to the best one's is chosen.

Candidates (config.DRAFT_KERNELS):
  fused-avx512-vnni, fused-avx2, fused-portable  the one-call C++ draft (clasp.cpu_draft) in
                     each instruction set the CPU has; one blocked int8 copy serves all three
  torch-fbgemm, torch-fbgemm-7bit  torch ops over fbgemm's prepacked int8 weights, with 8-bit or
                     7-bit activations; one packed copy serves both

The draft only proposes tokens, so the choice changes speed and acceptance, never the output.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from pathlib import Path

import torch

from clasp import calibration_cache
from clasp.config import DRAFT_KERNELS, FUSED_DRAFT_KERNELS as FUSED, TORCH_DRAFT_KERNELS as TORCH
from clasp.model_runner import ModelRunner

log = logging.getLogger(__name__)

# A fixed English text: the draft's next-token choices on it are compared with the full model's.
CALIBRATION_TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes "
                    "Gutenberg combined movable metal type, oil-based ink and a wooden press. Books became "
                    "cheaper, literacy spread across Europe, and new ideas travelled faster than ever before.")
# A candidate passes when its agreement is at least this far below the best candidate's
# (the exact kernels differ by a few tokens on this text: one activation rounded the other way
# changes later logits by ~1) and above the floor.
AGREEMENT_MARGIN = 0.1
MIN_AGREEMENT = 0.5
WARM_UP_TOKENS = 4
# A candidate more than this many times slower than one that has agreed with the model so far
# stops after a few timed tokens: it cannot be the fastest accurate one (saves ~1-2 s of load).
GIVE_UP_RATIO = 1.8
GIVE_UP_MIN_AGREEMENT = 0.7
TIMED_BEFORE_GIVING_UP = 8


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One draft kernel as measured at load."""

    name: str
    ms_per_token: float | None  # median over the timed tokens; None where it could not run
    agreement: float | None  # share of positions whose draft argmax equals the fp32 model's
    passed: bool = False
    error: str | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class DraftKernelChoice:
    chosen: str
    candidates: tuple[Candidate, ...]
    calibration_tokens: int
    seconds: float  # load time spent measuring (by the process that measured)
    cached: bool = False  # read from this machine's calibration cache instead of measured now

    def as_dict(self) -> dict:
        return {"chosen": self.chosen, "calibration_tokens": self.calibration_tokens,
                "seconds": round(self.seconds, 3), "cached": self.cached,
                "candidates": [c.as_dict() for c in self.candidates]}

    @classmethod
    def from_dict(cls, d: dict) -> "DraftKernelChoice":
        return cls(str(d["chosen"]), tuple(Candidate(**c) for c in d["candidates"]), int(d["calibration_tokens"]),
                   float(d["seconds"]), True)


class DraftCopies:
    """The candidates' weight copies for one runner, each built on first use and switched between
    without copying again (the fused instruction sets share one copy, both fbgemm variants another)."""

    def __init__(self, runner: ModelRunner, current: str | None = None) -> None:
        """current: the kernel the runner's draft copy already uses (it is reused, not rebuilt)."""
        self.runner = runner
        self._fused = (runner.draft_weights, runner.fused_draft) if current in FUSED else None
        self._fbgemm = None  # {reduce_range: weights}
        if current in TORCH:
            full = _with_reduce_range(runner.draft_weights, False)
            self._fbgemm = {False: full, True: _with_reduce_range(full, True)}

    def install(self, name: str) -> None:
        from clasp.cpu_draft import FusedDraft

        r = self.runner
        if name in FUSED:
            isa = name.removeprefix("fused-")
            if self._fused is None:
                r.enable_fused_draft(isa)
                self._fused = (r.draft_weights, r.fused_draft)
            weights, fused = self._fused
            assert isinstance(fused, FusedDraft)
            if fused.isa != isa:
                fused.isa = isa
            r.draft_weights, r.fused_draft = weights, fused
        elif name in TORCH:
            if self._fbgemm is None:
                r.set_draft_dtype(torch.int8, "fbgemm")
                self._fbgemm = {False: r.draft_weights, True: _with_reduce_range(r.draft_weights, True)}
            r.fused_draft = None
            r.draft_weights = self._fbgemm[name == "torch-fbgemm-7bit"]
        else:
            raise ValueError(f"draft kernel must be one of {', '.join(DRAFT_KERNELS)}, got {name!r}")


def _with_reduce_range(weights, reduce_range: bool):
    from clasp.model_runner import MATRICES, Weights

    def swap(w):
        return dataclasses.replace(w, reduce_range=reduce_range)

    layers = [dataclasses.replace(lw, **{m: swap(getattr(lw, m)) for m in MATRICES}) for lw in weights.layers]
    return Weights(layers, weights.final_norm, swap(weights.lm_head))


def reference_choices(runner: ModelRunner, ids: torch.Tensor) -> torch.Tensor:
    """The fp32 model's argmax after each prefix of ids [T]: [T] int64."""
    cache = runner.new_cache(ids.shape[0])
    return runner.forward(ids, cache, 0).argmax(-1)


def measure(runner: ModelRunner, ids: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(median ms per draft token, agreement) of the runner's current draft over ids [T]: the
    draft runs the text one token at a time with no layer skipped, on its own cache."""
    cache = runner.new_cache(ids.shape[0])
    times, choices = [], []
    for position in range(ids.shape[0]):
        t0 = time.perf_counter()
        choices.append(runner.forward(ids[position:position + 1], cache, position, draft=True)[0].argmax())
        times.append(time.perf_counter() - t0)
    agreement = float((torch.stack(choices) == reference).float().mean())
    return statistics.median(times[WARM_UP_TOKENS:]) * 1e3, agreement


def _lockstep(runner: ModelRunner, drafts: "DraftCopies", names: list[str], ids: torch.Tensor,
              reference: torch.Tensor, give_up: bool) -> list[Candidate]:
    """measure() for several candidates at once, token by token in turn (rotating who goes first),
    so that a burst of load from elsewhere slows them alike instead of one of them. With give_up,
    after WARM_UP_TOKENS + TIMED_BEFORE_GIVING_UP tokens a candidate over GIVE_UP_RATIO times slower
    than one that has agreed so far stops (agreement None: it cannot be the fastest accurate one)."""
    errors, times, choices = {}, {}, {}
    for name in names:
        try:
            drafts.install(name)  # builds each copy once, before any timing
            times[name], choices[name] = [], []
        except (RuntimeError, ValueError) as e:
            errors[name] = str(e).splitlines()[0]
    active = list(times)
    caches = {name: runner.new_cache(ids.shape[0]) for name in active}
    stopped = {}
    for position in range(ids.shape[0]):
        turn = position % max(len(active), 1)
        for name in active[turn:] + active[:turn]:
            drafts.install(name)
            t0 = time.perf_counter()
            logits = runner.forward(ids[position:position + 1], caches[name], position, draft=True)
            choices[name].append(int(logits[0].argmax()))
            times[name].append(time.perf_counter() - t0)
        if give_up and position + 1 == WARM_UP_TOKENS + TIMED_BEFORE_GIVING_UP:
            so_far = reference[:position + 1].tolist()
            ms = {n: statistics.median(times[n][WARM_UP_TOKENS:]) * 1e3 for n in active}
            agreeing = [ms[n] for n in active
                        if sum(a == b for a, b in zip(choices[n], so_far)) / len(so_far) >= GIVE_UP_MIN_AGREEMENT]
            if agreeing:
                stopped = {n: ms[n] for n in active if ms[n] > GIVE_UP_RATIO * min(agreeing)}
                active = [n for n in active if n not in stopped]
    measured = []
    for name in names:
        if name in errors:
            measured.append(Candidate(name, None, None, error=errors[name]))
        elif name in stopped:
            measured.append(Candidate(name, stopped[name], None, error=(
                f"stopped after {TIMED_BEFORE_GIVING_UP} timed tokens: over {GIVE_UP_RATIO}x slower than an "
                f"agreeing candidate")))
        else:
            agreement = sum(a == b for a, b in zip(choices[name], reference.tolist())) / len(choices[name])
            measured.append(Candidate(name, statistics.median(times[name][WARM_UP_TOKENS:]) * 1e3, agreement))
    return measured


def available(runner: ModelRunner) -> list[str]:
    """The candidates this runner and CPU can try (the fused kernel needs a compiled extension)."""
    if runner.device.type != "cpu":
        return []
    names = []
    if runner.dtype == torch.float32 and runner.weights.layers[0].q_norm is None:
        from clasp import cpu_draft

        try:
            isas = cpu_draft.supported_isas()
        except RuntimeError as e:
            log.warning("the fused CPU draft is unavailable (%s)", e)
            isas = []
        names += [f"fused-{isa}" for isa in isas]
    if "fbgemm" in torch.backends.quantized.supported_engines:
        names += list(TORCH)
    return names


def select(measured: list[Candidate]) -> tuple[str, list[Candidate]]:
    """The rule: every candidate that ran passes when its agreement is at least MIN_AGREEMENT
    and within AGREEMENT_MARGIN of the best one's; the fastest that passes is chosen (if none
    passes, the most accurate). Returns the chosen name and the candidates with `passed` set.
    Raises ValueError if none ran."""
    ran = [c for c in measured if c.agreement is not None and c.ms_per_token is not None]
    if not ran:
        raise ValueError("no int8 draft kernel could run: " + "; ".join(f"{c.name}: {c.error}" for c in measured))
    bar = max(MIN_AGREEMENT, max(c.agreement for c in ran) - AGREEMENT_MARGIN)
    measured = [dataclasses.replace(c, passed=c in ran and c.agreement >= bar) for c in measured]
    passing = [c for c in measured if c.passed]
    if not passing:  # every kernel disagrees with this model often: take the most accurate
        log.warning("no draft kernel agrees with the model on %.0f%% of a test text; using the most accurate",
                    100 * MIN_AGREEMENT)
        return max(ran, key=lambda c: c.agreement).name, measured
    return min(passing, key=lambda c: c.ms_per_token).name, measured


def choose(runner: ModelRunner, ids: torch.Tensor, candidates: list[str]) -> DraftKernelChoice:
    """Measure each candidate on ids [T] (a tokenized CALIBRATION_TEXT), install the one select()
    picks, and return the figures. Raises ValueError if none can run."""
    if not candidates:
        raise ValueError("no int8 draft kernel can run here")
    t0 = time.perf_counter()
    reference = reference_choices(runner, ids)
    drafts = DraftCopies(runner)
    measured = _lockstep(runner, drafts, candidates, ids, reference, give_up=True)
    stopped = [c.name for c in measured if c.agreement is None and c.ms_per_token is not None]
    if stopped and not any(c.agreement is not None and c.agreement >= MIN_AGREEMENT for c in measured):
        rerun = {c.name: c for c in _lockstep(runner, drafts, stopped, ids, reference, give_up=False)}
        measured = [rerun.get(c.name, c) for c in measured]
    chosen, measured = select(measured)
    drafts.install(chosen)
    choice = DraftKernelChoice(chosen, tuple(measured), int(ids.shape[0]), time.perf_counter() - t0)
    log.info("draft kernel %s: %s", chosen, ", ".join(_describe(c) for c in measured))
    return choice


def _describe(c: Candidate) -> str:
    if c.agreement is not None:
        return f"{c.name} {c.ms_per_token:.2f} ms agreement {c.agreement:.2f}{'' if c.passed else ' (failed)'}"
    if c.ms_per_token is not None:
        return f"{c.name} {c.ms_per_token:.2f} ms (slower: accuracy not checked)"
    return f"{c.name} unavailable ({c.error})"


def cache_path(model_identity: str, candidates: list[str]) -> Path:
    """Where this machine's choice for this model and candidate list is kept: keyed by everything
    the measurement depends on (clasp.calibration_cache.machine_key, the model's identity and
    shapes, the calibration text and the rule), so any change measures anew."""
    return calibration_cache.record_path("draft-kernel", {
        "model": model_identity, "candidates": candidates, "text": CALIBRATION_TEXT,
        "rule": [AGREEMENT_MARGIN, MIN_AGREEMENT, WARM_UP_TOKENS, GIVE_UP_RATIO, GIVE_UP_MIN_AGREEMENT,
                 TIMED_BEFORE_GIVING_UP]})


def choose_cached(runner: ModelRunner, ids: torch.Tensor, candidates: list[str],
                  model_identity: str) -> DraftKernelChoice:
    """choose(), measured once per machine (clasp.calibration_cache): a later load of the same
    model with the same candidates installs the recorded choice without measuring."""
    path = cache_path(model_identity, candidates)
    record = calibration_cache.read(path)
    if record is not None:
        try:
            choice = DraftKernelChoice.from_dict(record)
            if choice.chosen in candidates:
                DraftCopies(runner).install(choice.chosen)
                log.info("draft kernel %s (measured earlier on this machine: %s)", choice.chosen, path)
                return choice
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            log.warning("ignoring the draft kernel calibration cache %s (%s): measuring", path, e)
    choice = choose(runner, ids, candidates)
    calibration_cache.write(path, choice.as_dict())
    return choice
