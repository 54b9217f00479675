"""Engine benchmark: CLaSp vs plain decoding vs transformers peers on Spec-Bench questions.

Runs, side by side in one process on the same weights and the same prompt ids:

  clasp             our engine, mode="clasp" with the defaults: draft copy (int8 on CPU), adaptive draft
                    control (clasp.controller) and context n-gram drafts
  ar                our engine, mode="ar" (plain autoregressive decoding, the baseline)
  clasp_fixed       clasp without the controller and n-gram drafts (always draft up to K)
  clasp_torch_draft clasp with the int8 draft run through torch ops (fbgemm, 8-bit activations)
                    instead of the kernel chosen at load
  clasp_fused_vnni, clasp_fused_avx2, clasp_fused_portable, clasp_torch_7bit  clasp with the draft
                    forced onto one kernel (clasp.draft_kernels: the one-call C++ draft in AVX-512
                    VNNI, AVX2 or portable code; fbgemm with 7-bit activations), switched on the same
                    engine before each run; what the load-time choice picked from is in meta.draft_kernel
  clasp_shared      mode="clasp" with the draft on the shared full-precision weights and M = half
                    the layers: the paper's regime, where the DP does the work (adaptive)
  clasp_shared_fixed  the same without the controller and with the paper's exit threshold 0.7: the
                    paper's algorithm as published
  clasp_shared_adaptive_m  clasp_shared with adaptive M (clasp.controller): each round's skip count
                    chosen among M, 3M/4, M/2, M/4
  clasp_m6_loi32/64/128  draft copy (int8 on CPU), M=6 chosen by the DP, re-planned every 32/64/128 rounds
  static            our engine, mode="static" (one fixed skip set)
  (not run by default: static, clasp_shared_adaptive_m, clasp_m6_loi*)
  hf_greedy         transformers model.generate(do_sample=False)
  hf_prompt_lookup  transformers generate(prompt_lookup_num_tokens=10)
  hf_early_exit     transformers generate(assistant_early_exit=~L/2) (self-speculative early exit)

Greedy by default: every method stops at EOS or max-new-tokens, so every method's output should be
the same text; our engine's modes must emit exactly `ar`'s token ids (checked, counted). With
--temperature T > 0 only our engine's methods run, each seeded per question; outputs then differ
by design (rejection sampling keeps the distribution, which tests/test_sampling.py checks) and
speedup and acceptance are reported.
For each question the methods run one after another, so a slow drift in machine load affects
all methods alike (a short spike from another process still lands on one row: check the rows). Results go to benchmarks/results/engine-<tag>.{json,md}
and benchmarks/results/engine-latest.md.

Usage: PYTHONPATH=. python benchmarks/bench_engine.py [--per-category N | --full] [...]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable without PYTHONPATH=.
    sys.path.insert(0, str(REPO))

from benchmarks.chart import chart_title, render_chart  # noqa: E402
from benchmarks.report import fmt, tokens_per_s_cell, write_report  # noqa: E402
from clasp import draft_kernels, fp32_kernels  # noqa: E402
from clasp.config import DRAFT_DTYPE_CHOICES, ClaspConfig, SamplingParams  # noqa: E402
from clasp.cpu_draft import cpu_flags, cpu_name  # noqa: E402
from clasp.draft_kernels import DraftCopies  # noqa: E402
from clasp.engine import Engine  # noqa: E402
from clasp.loading import load_model, resolve_device, resolve_dtype  # noqa: E402

DEFAULT_QUESTIONS = REPO.parent / "shared/data/spec_bench/question.jsonl"
DEFAULT_OUT = REPO / "benchmarks" / "results"
# Engine methods: (mode, config overrides on top of the flags' config).
NOT_ADAPTIVE = {"adaptive": False, "ngram_size": 0}
ENGINE_VARIANTS = {
    "ar": ("ar", {}),
    "clasp": ("clasp", {}),
    "clasp_fixed": ("clasp", NOT_ADAPTIVE),
    "clasp_torch_draft": ("clasp", {}),  # with the draft kernel of KERNEL_METHODS
    "clasp_fused_vnni": ("clasp", {}),
    "clasp_fused_avx2": ("clasp", {}),
    "clasp_fused_portable": ("clasp", {}),
    "clasp_torch_7bit": ("clasp", {}),
    "clasp_shared": ("clasp", {"draft_dtype": None}),
    "clasp_shared_adaptive_m": ("clasp", {"draft_dtype": None, "adaptive_skip": True}),
    "clasp_shared_fixed": ("clasp", {"draft_dtype": None, "draft_exit_threshold": 0.7, **NOT_ADAPTIVE}),
    "clasp_m6_loi32": ("clasp", {"num_skip_layers": 6, "replan_interval": 32}),
    "clasp_m6_loi64": ("clasp", {"num_skip_layers": 6, "replan_interval": 64}),
    "clasp_m6_loi128": ("clasp", {"num_skip_layers": 6, "replan_interval": 128}),
    "static": ("static", {}),
}
ENGINE_METHODS = tuple(ENGINE_VARIANTS)
# Methods that force one int8 CPU draft kernel (the others use the one chosen at load).
KERNEL_METHODS = {"clasp_torch_draft": "torch-fbgemm", "clasp_fused_vnni": "fused-avx512-vnni",
                  "clasp_fused_avx2": "fused-avx2", "clasp_fused_portable": "fused-portable",
                  "clasp_torch_7bit": "torch-fbgemm-7bit"}
HF_METHODS = ("hf_greedy", "hf_prompt_lookup", "hf_early_exit")
ALL_METHODS = ENGINE_METHODS + HF_METHODS  # run order within a question: ar first
DEFAULT_METHODS = ("ar", "clasp", "clasp_fixed", "clasp_torch_draft", "clasp_shared", "clasp_shared_fixed") + HF_METHODS
# Spec-Bench's six categories; the eight MT-bench categories are reported as one.
CATEGORIES = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
MT_BENCH = frozenset({"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"})
PROMPT_LOOKUP_TOKENS = 10
WARMUP_PROMPT = "Say hello in one short sentence."
WARMUP_TOKENS = 8
# Quick default, sized from measured per-token costs on the 2-core dev CPU (see build_parser's epilog):
# per question and 96 tokens, all six methods take ~50 s on a short prompt and ~60-75 s on a
# summarization/rag prompt (~700 tokens); hf_early_exit alone is about half of that.
QUICK_PER_CATEGORY = 1
QUICK_MAX_NEW_TOKENS = 96


@dataclasses.dataclass
class Question:
    question_id: int
    category: str  # one of CATEGORIES
    prompt: str  # the first turn


@dataclasses.dataclass
class QuestionRow:
    """What every benchmark row names: one method on one question, and its token counts."""

    question_id: int
    category: str
    method: str
    num_prompt_tokens: int
    num_tokens: int = 0


@dataclasses.dataclass
class Row(QuestionRow):
    """One method on one question."""

    seconds: float = 0.0
    tokens_per_s: float = 0.0
    finish_reason: str | None = None
    mean_accepted_length: float | None = None  # engine methods only: tokens emitted per verification round
    acceptance_rate: float | None = None
    num_rounds: int | None = None
    num_draft_tokens: int | None = None
    num_accepted_tokens: int | None = None
    plan_seconds: float | None = None
    skip_ratio: float | None = None  # layers skipped per model-drafted token / num_layers
    num_model_draft_tokens: int | None = None  # drafted by the layer-skip model (not n-grams)
    num_plain_rounds: int | None = None  # rounds the controller decoded without a draft
    num_ngram_draft_tokens: int | None = None
    num_ngram_accepted_tokens: int | None = None
    plan_io_seconds: float | None = None
    matches_ar: bool | None = None  # token ids equal to `ar`'s on this question
    error: str | None = None
    token_ids: list[int] = dataclasses.field(default_factory=list, repr=False)


# ---------------------------------------------------------------------- inputs
def load_questions(path: Path, per_category: int | None) -> list[Question]:
    """First-turn prompts, the first `per_category` by question_id of each category (None: all)."""
    by_category: dict[str, list[Question]] = defaultdict(list)
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            q = json.loads(line)
            category = "mt_bench" if q["category"] in MT_BENCH else q["category"]
            by_category[category].append(Question(int(q["question_id"]), category, q["turns"][0]))
    unknown = sorted(set(by_category) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"{path}: unknown categories {unknown}")
    selected = []
    for category in CATEGORIES:
        questions = sorted(by_category.get(category, []), key=lambda q: q.question_id)
        selected.extend(questions if per_category is None else questions[:per_category])
    return selected


def build_config(args: argparse.Namespace) -> ClaspConfig:
    """The speculation config; flags left unset keep ClaspConfig's defaults."""
    overrides = {name: getattr(args, name) for name in
                 ("num_skip_layers", "max_draft_length", "draft_exit_threshold", "replan_interval")
                 if getattr(args, name) is not None}
    if args.draft_dtype is not None:
        overrides["draft_dtype"] = None if args.draft_dtype == "none" else args.draft_dtype
    return ClaspConfig(**overrides)


# ---------------------------------------------------------------------- runners
def engine_runner(engine: Engine, config: ClaspConfig, method: str, temperature: float = 0.0,
                  copies: DraftCopies | None = None) -> Callable[[list[int], int], dict]:
    """A function (prompt ids, max new tokens) -> row fields, for one of ENGINE_VARIANTS.
    Sampling (temperature > 0) is seeded by the prompt's length, the same for every method.
    KERNEL_METHODS switch the draft kernel through `copies` and set it back after each run."""
    mode, overrides = ENGINE_VARIANTS[method]
    mode_config = dataclasses.replace(config, mode=mode, **overrides)
    num_layers = engine.runner.spec.num_layers
    kernel = KERNEL_METHODS.get(method)

    def run(prompt_ids: list[int], max_new_tokens: int) -> dict:
        if kernel is None:
            return run_on_current_draft(prompt_ids, max_new_tokens)
        copies.install(kernel)
        try:
            return run_on_current_draft(prompt_ids, max_new_tokens)
        finally:
            copies.install(engine.draft_kernel.chosen)

    def run_on_current_draft(prompt_ids: list[int], max_new_tokens: int) -> dict:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                                seed=len(prompt_ids) if temperature > 0 else None)
        sync(engine.runner.device)
        t0 = time.perf_counter()
        result = engine.generate(prompt_ids, params, mode_config)
        sync(engine.runner.device)
        seconds = time.perf_counter() - t0
        s = result.stats
        fields = dict(token_ids=list(result.token_ids), seconds=seconds, finish_reason=result.finish_reason)
        if mode != "ar":
            fields.update(mean_accepted_length=s.mean_accepted_length, acceptance_rate=s.acceptance_rate,
                          num_rounds=s.num_rounds, num_draft_tokens=s.num_draft_tokens,
                          num_accepted_tokens=s.num_accepted_tokens, plan_seconds=s.plan_seconds,
                          skip_ratio=s.mean_skipped_layers / num_layers, num_model_draft_tokens=s.num_model_draft_tokens,
                          num_plain_rounds=s.num_plain_rounds, num_ngram_draft_tokens=s.num_ngram_draft_tokens,
                          num_ngram_accepted_tokens=s.num_ngram_accepted_tokens, plan_io_seconds=s.plan_io_seconds)
        return fields

    return run


def hf_runner(model, eos_ids: list[int], pad_id: int, extra: dict) -> Callable[[list[int], int], dict]:
    """A function (prompt ids, max new tokens) -> row fields, for transformers generate with `extra` kwargs."""
    device = next(model.parameters()).device

    def run(prompt_ids: list[int], max_new_tokens: int) -> dict:
        input_ids = torch.tensor([prompt_ids], device=device)
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_ids,
                                 pad_token_id=pad_id, **extra)
        sync(device)
        seconds = time.perf_counter() - t0
        new_ids = out[0, input_ids.shape[1]:].tolist()
        finish = "stop" if new_ids and new_ids[-1] in eos_ids else "length"
        return dict(token_ids=new_ids, seconds=seconds, finish_reason=finish)

    return run


def build_runners(methods: list[str], engine: Engine, config: ClaspConfig, hf_model, early_exit_layer: int,
                  temperature: float = 0.0, copies: DraftCopies | None = None) -> dict:
    runners = {}
    eos_ids = sorted(engine.eos_ids)
    pad_id = engine.tokenizer.pad_token_id if engine.tokenizer.pad_token_id is not None else eos_ids[0]
    hf_extra = {"hf_greedy": {}, "hf_prompt_lookup": {"prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS},
                "hf_early_exit": {"assistant_early_exit": early_exit_layer}}
    for method in methods:
        if method in ENGINE_METHODS:
            runners[method] = engine_runner(engine, config, method, temperature, copies)
        else:
            runners[method] = hf_runner(hf_model, eos_ids, pad_id, hf_extra[method])
    return runners


def warm_up(runners: dict, prompt_ids: list[int]) -> dict[str, str]:
    """Run each method once on a short prompt; returns {method: error} for those that raised."""
    broken = {}
    for method, run in runners.items():
        try:
            run(prompt_ids, WARMUP_TOKENS)
        except Exception as e:  # a peer that does not support this model is a result, not a crash
            broken[method] = f"{type(e).__name__}: {e}"
            print(f"warm-up {method}: FAILED {broken[method]}", file=sys.stderr)
    return broken


def fill_row(row: QuestionRow, run, prompt_ids: list[int], max_new_tokens: int, broken: dict) -> bool:
    """One method's run into its row: the fields `run` returns, num_tokens from its token_ids, or the
    error it raised (or raised at warm-up). Returns whether it ran."""
    if row.method in broken:
        row.error = broken[row.method]
        return False
    try:
        for key, value in run(prompt_ids, max_new_tokens).items():
            setattr(row, key, value)
    except Exception as e:  # one failing method is a result, not a crash
        row.error = f"{type(e).__name__}: {e}"
        return False
    row.num_tokens = len(row.token_ids)
    return True


def run_question(q: Question, prompt_ids: list[int], runners: dict, broken: dict, max_new_tokens: int,
                 sampling: bool = False) -> list[Row]:
    rows = []
    ar_ids = None
    for method, run in runners.items():
        row = Row(q.question_id, q.category, method, len(prompt_ids))
        if fill_row(row, run, prompt_ids, max_new_tokens, broken):
            row.tokens_per_s = row.num_tokens / row.seconds if row.seconds > 0 else 0.0
        if method == "ar" and row.error is None:
            ar_ids = row.token_ids
        elif ar_ids is not None and row.error is None and not sampling:
            row.matches_ar = row.token_ids == ar_ids
        rows.append(row)
        status = row.error or (f"{row.num_tokens:4d} tok {row.seconds:6.2f} s {row.tokens_per_s:6.1f} tok/s"
                               + ("" if row.matches_ar is not False else "  MISMATCH vs ar"))
        print(f"q{q.question_id:<4d} {q.category:<14s} {method:<17s} {status}", file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------------- aggregation
def aggregate(rows: list[Row]) -> dict:
    """One method's rows -> totals; tokens/s is total tokens / total seconds."""
    ok = [r for r in rows if r.error is None]
    out = {"num_questions": len(ok), "num_errors": len(rows) - len(ok),
           "tokens": sum(r.num_tokens for r in ok), "seconds": sum(r.seconds for r in ok)}
    out["tokens_per_s"] = out["tokens"] / out["seconds"] if out["seconds"] > 0 else None
    compared = [r for r in ok if r.matches_ar is not None]
    out["mismatches_vs_ar"] = sum(not r.matches_ar for r in compared) if compared else None
    spec = [r for r in ok if r.num_rounds]
    if spec:
        rounds = sum(r.num_rounds for r in spec)
        drafted = sum(r.num_draft_tokens for r in spec)
        accepted = sum(r.num_accepted_tokens for r in spec)
        plan_seconds = sum(r.plan_seconds for r in spec)
        out.update(plain_round_share=sum(r.num_plain_rounds or 0 for r in spec) / rounds,
                   ngram_draft_tokens=sum(r.num_ngram_draft_tokens or 0 for r in spec),
                   ngram_accepted_tokens=sum(r.num_ngram_accepted_tokens or 0 for r in spec),
                   plan_io_share=sum(r.plan_io_seconds or 0.0 for r in spec) / sum(r.seconds for r in spec))
        out.update(mean_accepted_length=(accepted + rounds) / rounds,
                   acceptance_rate=accepted / drafted if drafted else 0.0,
                   skip_ratio=(sum(r.skip_ratio * r.num_model_draft_tokens for r in spec)
                               / max(sum(r.num_model_draft_tokens for r in spec), 1)),
                   plan_seconds=plan_seconds,
                   dp_share=plan_seconds / sum(r.seconds for r in spec))
    errors = [r.error for r in rows if r.error]
    if errors:
        out["error"] = errors[0]
    return out


def group_by_category(rows: list) -> dict[str, list]:
    """Rows per category present, in CATEGORIES order, plus "overall" (all rows)."""
    groups = {c: [r for r in rows if r.category == c] for c in CATEGORIES}
    groups = {c: g for c, g in groups.items() if g}
    groups["overall"] = rows
    return groups


def summarize_rows(rows: list[Row], methods: list[str]) -> dict:
    """{category or "overall": {method: aggregate, ..., "speedup_vs_ar": {method: ratio}}}."""
    tables = {}
    for name, group in group_by_category(rows).items():
        table = {m: aggregate([r for r in group if r.method == m]) for m in methods}
        ar = table.get("ar", {}).get("tokens_per_s")
        table["speedup_vs_ar"] = {m: (t["tokens_per_s"] / ar if ar and t["tokens_per_s"] else None)
                                  for m, t in table.items() if m != "ar"}
        tables[name] = table
    return tables


# ---------------------------------------------------------------------- environment
def sync(device: torch.device) -> None:
    """Wait for queued device work, so that a wall-clock timer measures it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_peak_mib(device: torch.device) -> float | None:
    """Peak memory torch allocated on a CUDA device (the models live there, not in RSS); None on CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def peak_rss_mib() -> float:
    """This process's peak resident set size (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def git_commit() -> str | None:
    """HEAD's short hash, with "-dirty" when tracked files differ from it; None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0 or not head.stdout.strip():
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: torch.device) -> dict:
    return {"platform": platform.platform(), "processor": cpu_name(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "device": str(device), "cpu_flags": cpu_flags(),
            "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


# ---------------------------------------------------------------------- output
def render_markdown(summary: dict) -> str:
    """The results as markdown: tokens/s per method, speedups over ar, and the speculation figures."""
    meta, tables = summary["meta"], summary["tables"]
    m = meta["machine"]
    methods = meta["methods"]
    sampling = meta.get("temperature", 0.0) > 0
    lines = [f"Engine benchmark: {m['processor']} ({m['cpu_count']} CPUs, {m['torch_threads']} torch threads, "
             f"{m['device']}{', ' + m['cuda_device'] if m.get('cuda_device') else ''}), model {meta['model']}, "
             f"{meta['dtype']}, commit {meta['git_commit'] or 'unknown'}, max new tokens {meta['max_new_tokens']}, "
             f"questions per category: {meta['questions_per_category']}, "
             f"{'temperature ' + str(meta['temperature']) if sampling else 'greedy'}, {meta['timestamp']}.", ""]
    others = [x for x in methods if x != "ar"]
    header = (["Category"] + [f"{x} tok/s" for x in methods] + [f"{x}/ar" for x in others if "ar" in methods])
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, table in tables.items():
        cells = [name] + [tokens_per_s_cell(table.get(x)) for x in methods]
        if "ar" in methods:
            cells += [fmt(table["speedup_vs_ar"].get(x), ".2f", "x") for x in others]
        lines.append("| " + " | ".join(cells) + " |")
    speculative = [x for x in methods if tables["overall"].get(x, {}).get("mean_accepted_length") is not None]
    if speculative:
        lines += ["", "Speculation, per method over all questions:", "",
                  "| method | mean accepted length | acceptance | plain rounds | n-gram drafted / accepted | "
                  "skip ratio | DP time share | plan I/O share |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for x in speculative:
            t = tables["overall"][x]
            lines.append(f"| {x} | {fmt(t['mean_accepted_length'], '.2f')} | {fmt(t['acceptance_rate'], '.1%')} | "
                         f"{fmt(t.get('plain_round_share'), '.0%')} | {t.get('ngram_draft_tokens', 0)} / "
                         f"{t.get('ngram_accepted_tokens', 0)} | {fmt(t['skip_ratio'], '.0%')} | "
                         f"{fmt(t['dp_share'], '.1%')} | {fmt(t.get('plan_io_share'), '.2%')} |")
        lines += ["", "Mean accepted length per category: " + "; ".join(
            f"{name} " + ", ".join(f"{x} {fmt(tables[name].get(x, {}).get('mean_accepted_length'), '.2f')}"
                                   for x in speculative) for name in tables if name != "overall")]
    lines += ["", _notes(summary)]
    return "\n".join(lines) + "\n"


def _notes(summary: dict) -> str:
    meta, overall = summary["meta"], summary["tables"]["overall"]
    notes = []
    same = [f"{m} {t['num_questions'] - t['mismatches_vs_ar']}/{t['num_questions']}"
            for m, t in overall.items() if m in ALL_METHODS and t.get("mismatches_vs_ar") is not None]
    if same:
        notes.append("questions whose token ids equal ar's: " + ", ".join(same))
    bound = meta.get("bandwidth")
    if bound:
        ar = overall.get("ar", {}).get("tokens_per_s")
        notes.append(f"memory bandwidth {bound['gb_per_s']:.1f} GB/s (read of a {bound['buffer_mib']} MiB buffer); "
                     f"the full model reads {bound['bytes_per_token'] / 2**20:.0f} MiB of weights per plain step, "
                     f"so a step takes at least {bound['min_ms_per_token']:.1f} ms"
                     + (f"; ar ran at {1000 / ar:.1f} ms/token, {bound['min_ms_per_token'] * ar / 1000:.0%} of that bound"
                        if ar else "")
                     + ("; on a GPU a model this small is bound by kernel launches, not bytes"
                        if meta["machine"].get("cuda_device") else ""))
    cfg = meta["config"]
    notes.append(f"config: M={meta['num_skip_layers']} of {meta['num_layers']} layers (shared-weight variants: "
                 f"{meta.get('shared_num_skip_layers')}), K={cfg['max_draft_length']}, exit threshold "
                 f"{cfg['draft_exit_threshold']}, replan every {cfg['replan_interval']} rounds, draft dtype "
                 f"{meta.get('draft_copy_dtype') or 'shared weights'} ({meta.get('draft_copy_mib', 0):.0f} MiB extra), "
                 f"{meta.get('fp32_products') or 'prepacked verification weights %.0f MiB (from %d rows)' % (meta.get('packed_weights_mib', 0), meta.get('packed_min_rows', 3))}, n-gram "
                 f"size {cfg.get('ngram_size')}; HF early exit at layer {meta['early_exit_layer']}, prompt lookup "
                 f"{PROMPT_LOOKUP_TOKENS} tokens")
    errors = [f"{m}: {t['error']}" for m, t in overall.items() if m in ALL_METHODS and t.get("error")]
    notes += [f"error {e}" for e in errors]
    gpu = f", peak CUDA memory allocated {meta['cuda_peak_mib']:.0f} MiB" if meta.get("cuda_peak_mib") else ""
    notes.append(f"peak RSS {meta['peak_rss_mib']:.0f} MiB (process, both models loaded){gpu}; "
                 f"wall time {meta['wall_seconds']:.0f} s")
    return "\n".join(f"- {n}" for n in notes)


def measure_bandwidth(device: torch.device, mib: int = 1024, repeats: int = 5) -> float:
    """Bytes per second reading a buffer much larger than the caches (best of `repeats`)."""
    buffer = torch.ones(mib * 2**20 // 4, device=device)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        buffer.sum()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return mib * 2**20 / best


def write_results(summary: dict, out_dir: Path, tag: str, prefix: str = "engine",
                  render: Callable[[dict], str] = render_markdown, baseline: str = "ar") -> Path:
    """<prefix>-<tag>.{json,md,png} in out_dir, and <prefix>-latest.{md,png} overwritten."""
    json_path = write_report(summary, out_dir, prefix, tag, render(summary))
    stem = f"{prefix}-{tag}"
    png = render_chart(summary, out_dir / f"{stem}.png", baseline, chart_title(summary, f"{prefix} benchmark"))
    shutil.copyfile(png, out_dir / f"{prefix}-latest.png")
    return json_path


# ---------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    defaults = ClaspConfig()
    parser = argparse.ArgumentParser(
        description="Benchmark CLaSp against plain decoding and transformers peers on Spec-Bench questions "
                    "(first turn only, greedy, per category: mt_bench, translation, summarization, qa, "
                    "math_reasoning, rag).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Quick default: --per-category {QUICK_PER_CATEGORY} --max-new-tokens {QUICK_MAX_NEW_TOKENS}, all six "
               "methods (6 questions x 6 methods). From measured per-token costs on a 2-core CPU (plain decoding "
               "~55-60 ms/token, hf_early_exit ~250-300 ms/token) that is ~6 minutes including loading and warm-up, "
               "less when answers end at EOS, more when the CPU is shared. --max-new-tokens 128 takes ~7.5 minutes, "
               "--per-category 2 ~11.5; --full runs all 480 questions (hours on a CPU). Results: benchmarks/results/engine-<tag>.{json,md} and engine-latest.md.")
    add_question_args(parser, DEFAULT_METHODS, ALL_METHODS, ",".join(DEFAULT_METHODS), "ar")
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="local Hugging Face model directory (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    g.add_argument("--dtype", default="auto",
                   help="float32, bfloat16, float16 or auto: float32 on CPU, bfloat16 on CUDA (default: auto)")
    g.add_argument("--threads", type=int, default=os.cpu_count(),
                   help=f"torch CPU threads for every method (default: os.cpu_count() = {os.cpu_count()})")
    g = parser.add_argument_group("speculation (our engine; unset = ClaspConfig default)")
    g.add_argument("--num-skip-layers", type=int, default=None,
                   help=f"M, layers skipped while drafting (default: {defaults.copied_draft_skip_ratio * 100:.0f}%% of the "
                        f"layers with a half-precision draft copy, {defaults.shared_draft_skip_ratio * 100:.0f}%% when the "
                        "draft shares the weights)")
    g.add_argument("--max-draft-length", type=int, default=None,
                   help=f"K, tokens drafted per round at most (default: {defaults.max_draft_length})")
    g.add_argument("--draft-exit-threshold", type=float, default=None,
                   help=f"stop drafting when the draft's top probability falls below this "
                        f"(default: {defaults.draft_exit_threshold})")
    g.add_argument("--replan-interval", type=int, default=None,
                   help=f"LOI, re-run the DP every N verification rounds (default: {defaults.replan_interval})")
    g.add_argument("--draft-dtype", default=None, choices=DRAFT_DTYPE_CHOICES,
                   help=f"dtype of the draft's weight copy; 'none' shares the full weights "
                        f"(default: {defaults.draft_dtype})")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="sample at this temperature (our engine's methods only; default: 0, greedy)")
    g = parser.add_argument_group("peers")
    g.add_argument("--early-exit-layer", type=int, default=None,
                   help="layer for transformers' assistant_early_exit (default: half the model's layers)")
    g = parser.add_argument_group("output")
    g.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="results directory (default: benchmarks/results); engine-latest.md there is overwritten")
    g.add_argument("--name", default="engine",
                   help="results file prefix: <name>-<tag>.{json,md,png} and <name>-latest.{md,png} (default: engine)")
    g.add_argument("--tag", default=None, help="results file name: <name>-<tag>.json/.md (default: a timestamp)")
    return parser


def add_question_args(parser: argparse.ArgumentParser, default_methods, all_methods, default_note: str,
                      baseline: str) -> None:
    """The sample and method flags both benchmarks share."""
    g = parser.add_argument_group("questions")
    g.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS,
                   help="Spec-Bench question.jsonl (default: ../shared/data/spec_bench/question.jsonl from the repo root)")
    g.add_argument("--per-category", type=int, default=QUICK_PER_CATEGORY,
                   help=f"questions per category, the first N by question_id (default: {QUICK_PER_CATEGORY})")
    g.add_argument("--full", action="store_true", help="run every question (overrides --per-category)")
    g.add_argument("--max-new-tokens", type=int, default=QUICK_MAX_NEW_TOKENS,
                   help=f"new tokens per answer at most; every method also stops at EOS (default: {QUICK_MAX_NEW_TOKENS})")
    g.add_argument("--methods", default=",".join(default_methods),
                   help=f"comma-separated subset of {','.join(all_methods)} (default: {default_note}). '{baseline}' is "
                        "the baseline for speedups and token-id equality; without it those columns are n/a")


def parse_methods(text: str, allowed: tuple[str, ...] = ALL_METHODS) -> list[str]:
    """The --methods list in `allowed`'s order (the baseline first: the others compare against it)."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in allowed]
    if unknown or not methods:
        raise SystemExit(f"--methods: unknown {unknown or 'empty list'}; choose from {','.join(allowed)}")
    return [m for m in allowed if m in methods]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    methods = parse_methods(args.methods)
    if args.temperature > 0 and any(m in HF_METHODS for m in methods):
        if args.methods != ",".join(DEFAULT_METHODS):
            raise SystemExit("--temperature: sampling runs our engine's methods only; drop the hf_* methods")
        methods = [m for m in methods if m not in HF_METHODS]
    transformers.utils.logging.set_verbosity_error()  # keep stderr to the progress lines
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    timestamp = datetime.datetime.now()
    config = build_config(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)

    engine = Engine.load(args.model, config, device=str(device), dtype=str(dtype).removeprefix("torch."))
    num_layers = engine.runner.spec.num_layers
    early_exit_layer = args.early_exit_layer or num_layers // 2
    hf_model = load_model(args.model, dtype, device)[0] if any(m in HF_METHODS for m in methods) else None
    copies = None
    if any(m in KERNEL_METHODS for m in methods):
        runnable = set(draft_kernels.available(engine.runner)) if engine.draft_kernel else set()
        missing = [m for m in methods if m in KERNEL_METHODS and KERNEL_METHODS[m] not in runnable]
        if missing:  # a kernel this CPU (or a non-int8 draft) cannot run is a fact of the machine, not an error
            methods = [m for m in methods if m not in missing]
            print(f"draft kernels not available here (available: {','.join(sorted(runnable)) or 'none'}): "
                  f"leaving out {','.join(missing)}", file=sys.stderr)
        copies = DraftCopies(engine.runner, engine.draft_kernel.chosen if engine.draft_kernel else None)
    runners = build_runners(methods, engine, config, hf_model, early_exit_layer, args.temperature, copies)

    questions = load_questions(args.questions, None if args.full else args.per_category)
    print(f"{len(questions)} questions x {len(methods)} methods ({','.join(methods)}), "
          f"max {args.max_new_tokens} new tokens, {torch.get_num_threads()} threads", file=sys.stderr)
    broken = warm_up(runners, engine.encode(WARMUP_PROMPT))
    rows = []
    for q in questions:
        rows += run_question(q, engine.encode(q.prompt), runners, broken, args.max_new_tokens, args.temperature > 0)
    bandwidth = measure_bandwidth(device)
    bytes_per_token = engine.runner.weights.nbytes()  # a plain step reads every layer, the final norm and the lm_head

    per_category = "all" if args.full else args.per_category
    meta = {"timestamp": timestamp.isoformat(timespec="seconds"), "machine": machine_info(device),
            "model": engine.model_name, "model_path": args.model, "dtype": str(dtype).removeprefix("torch."),
            "git_commit": git_commit(), "methods": methods, "max_new_tokens": args.max_new_tokens,
            "questions_per_category": per_category, "num_questions": len(questions),
            "questions_file": str(args.questions), "config": dataclasses.asdict(config), "num_layers": num_layers,
            "temperature": args.temperature,
            "shared_num_skip_layers": config.skip_count(num_layers, False),
            "bandwidth": {"gb_per_s": bandwidth / 1e9, "buffer_mib": 1024, "bytes_per_token": bytes_per_token,
                          "min_ms_per_token": 1000 * bytes_per_token / bandwidth},
            "num_skip_layers": config.skip_count(num_layers, engine.runner.draft_has_copy),
            "early_exit_layer": early_exit_layer, "prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS,
            "warmup_errors": broken, "peak_rss_mib": peak_rss_mib(), "cuda_peak_mib": cuda_peak_mib(device),
            "weights_mib": engine.runner.weights.nbytes() / 2**20,
            "draft_copy_mib": (engine.runner.draft_weights.nbytes() / 2**20 if engine.runner.draft_has_copy else 0.0),
            "packed_weights_mib": engine.runner.packed_nbytes / 2**20, "packed_min_rows": engine.runner.packed_min_rows,
            "fused_draft": engine.runner.fused_draft is not None, "fp32_products": fp32_kernels.summary(engine.runner),
            "draft_kernel": engine.draft_kernel.as_dict() if engine.draft_kernel else None,
            "draft_copy_dtype": (str(config.draft_torch_dtype(engine.runner.device.type)).removeprefix("torch.")
                                 if engine.runner.draft_has_copy else None),
            "wall_seconds": time.perf_counter() - started}
    row_dicts = [{k: v for k, v in dataclasses.asdict(r).items() if k != "token_ids"} for r in rows]
    summary = {"meta": meta, "tables": summarize_rows(rows, methods), "rows": row_dicts}
    path = write_results(summary, args.out, args.tag or timestamp.strftime("%Y%m%d-%H%M%S"), prefix=args.name)
    print(render_markdown(summary), file=sys.stderr)
    print(f"wrote {path} and the .md and .png beside it", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
