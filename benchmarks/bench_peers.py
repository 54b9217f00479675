"""llama.cpp beside our engine: decode speed at the bandwidth bound, and greedy output equality.

Runs in one process, on the same Spec-Bench sample as benchmarks/bench_engine.py (its quick
mode: the first question of each category, 96 new tokens; the same chat prompt token ids, made by
our tokenizer and fed to llama.cpp as ids, so every method sees the identical prompt), greedy,
the methods one after another within each question:

  ar          our engine, plain autoregressive decoding (fp32; the reference)
  clasp       our engine with its defaults (self-speculative decoding, output equal to ar's)
  llama_f32   llama.cpp (llama-cpp-python) on the same weights converted to GGUF F32, F32 KV cache
  llama_f16   the same converted to F16 (llama.cpp's default F16 KV cache)
  llama_q8_0  the same converted to Q8_0 (F16 KV cache)

Decode tok/s counts from the first generated token: (tokens - 1) / (time from the first token to
the last), so prompt processing is excluded (reported separately as time to first token). The
bandwidth bound is measured in the same run (a read of a 1 GiB buffer with the same threads,
before and after the questions, the better of the two): a plain decoder reads every weight once
per token, so its bound is bandwidth / weight bytes per token at its precision (ours: the fp32
matrices, norms and lm_head; llama.cpp: the GGUF file's tensors, the tied embedding read as the
output matrix). Speculative decoding is not bound by it: clasp's % is against the fp32 bound.
llama.cpp F32's greedy token ids are compared with ar's per question (and F16's and Q8_0's, at
other precisions, for context); where they differ, the position of the first divergence.

Results: benchmarks/results/peers-<tag>.{json,md} and peers-latest.md. `make bench-peers`
builds llama-cpp-python once into the cache and converts the GGUF files first; without
llama-cpp-python this script says so and exits with status 2.

Usage: PYTHONPATH=. python benchmarks/bench_peers.py --llama-cpp-dir DIR --gguf-dir DIR [...]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable without PYTHONPATH=.
    sys.path.insert(0, str(REPO))

from benchmarks.report import write_report  # noqa: E402
from benchmarks.bench_engine import (CATEGORIES, ENGINE_VARIANTS, WARMUP_PROMPT, QuestionRow,  # noqa: E402
                                     add_question_args, fill_row, warm_up, git_commit, group_by_category, load_questions,
                                     machine_info, measure_bandwidth, parse_methods, peak_rss_mib)
from clasp import fp32_kernels  # noqa: E402
from clasp.config import DRAFT_KERNELS, FP32_KERNELS, ClaspConfig, SamplingParams  # noqa: E402
from clasp.engine import Engine  # noqa: E402
from clasp.loading import EMBEDDED_MODEL_NAME  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results"
OURS = ("ar", "clasp")
PEERS = {"llama_f32": "f32", "llama_f16": "f16", "llama_q8_0": "q8_0"}  # method: GGUF --outtype
METHODS = OURS + tuple(PEERS)
GGML_TYPE_F32 = 0  # llama.cpp's ggml_type for an F32 KV cache (llama_cpp.GGML_TYPE_F32)
BANDWIDTH_BUFFER_MIB = 1024


@dataclasses.dataclass
class Row(QuestionRow):
    """One method on one question (decode speed apart from prompt processing)."""

    first_token_seconds: float = 0.0  # prompt processing up to the first generated token
    decode_seconds: float = 0.0  # from the first generated token to the last
    decode_tokens_per_s: float | None = None  # (num_tokens - 1) / decode_seconds
    finish_reason: str | None = None
    matches_ar: bool | None = None  # token ids equal to ar's on this question
    first_divergence: int | None = None  # index of the first token that differs from ar's
    load_average: float | None = None  # the 1-minute load average when this run ended (other processes)
    error: str | None = None
    token_ids: list[int] = dataclasses.field(default_factory=list, repr=False)


# ---------------------------------------------------------------------- llama.cpp
def import_llama_cpp(site_dir: Path | None):
    """llama_cpp from `site_dir` (the cache's --target install; the venv's own packages come first)."""
    if site_dir is not None:
        if not site_dir.is_dir():
            raise ImportError(f"{site_dir} does not exist")
        sys.path.append(str(site_dir))
    import llama_cpp

    return llama_cpp


def gguf_weight_bytes(path: Path) -> int:
    """Bytes a plain decode step reads from a GGUF file: every tensor, except the token embedding
    where a separate output matrix exists (then only one embedding row is read)."""
    import gguf

    tensors = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    return sum(tensors.values())


def llama_cpp_runner(llama_cpp, path: Path, threads: int, n_ctx: int, f32_kv: bool,
                     eos_ids: frozenset[int]) -> Callable[[list[int], int], dict]:
    """A function (prompt ids, max new tokens) -> row fields: greedy decoding through the Llama
    object's eval (the prompt in batches, then one token per call), argmax of the last logits."""
    kv = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_kv else {}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False, **kv)
    n_vocab = llm.n_vocab()

    def last_argmax() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return int(np.argmax(logits))  # the first of equal maxima, as torch's argmax

    def run(prompt_ids: list[int], max_new_tokens: int) -> dict:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt_ids)
        ids = [last_argmax()]
        t_first = time.perf_counter()
        while ids[-1] not in eos_ids and len(ids) < max_new_tokens:
            llm.eval([ids[-1]])
            ids.append(last_argmax())
        t_end = time.perf_counter()
        return dict(token_ids=ids, first_token_seconds=t_first - t0, decode_seconds=t_end - t_first,
                    finish_reason="stop" if ids[-1] in eos_ids else "length")

    run.llm = llm  # kept alive with the runner
    return run


# ---------------------------------------------------------------------- our engine
def engine_decode_runner(engine: Engine, config: ClaspConfig, method: str) -> Callable[[list[int], int], dict]:
    """A function (prompt ids, max new tokens) -> row fields for one of ENGINE_VARIANTS, greedy,
    timed from the first chunk that carries a token (the prefill's) to the end."""
    mode, overrides = ENGINE_VARIANTS[method]
    mode_config = dataclasses.replace(config, mode=mode, **overrides)

    def run(prompt_ids: list[int], max_new_tokens: int) -> dict:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        t0 = time.perf_counter()
        t_first, result = None, None
        for chunk in engine.stream(prompt_ids, params, mode_config):
            if t_first is None and chunk.token_ids:
                t_first = time.perf_counter()
            result = chunk.result
        t_end = time.perf_counter()
        return dict(token_ids=list(result.token_ids), first_token_seconds=t_first - t0,
                    decode_seconds=t_end - t_first, finish_reason=result.finish_reason)

    return run


# ---------------------------------------------------------------------- running
def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first index where a and b differ (the shorter one's length if one is a prefix); None if equal."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run_question(question, prompt_ids: list[int], runners: dict, broken: dict, max_new_tokens: int) -> list[Row]:
    rows, ar_ids = [], None
    for method, run in runners.items():
        row = Row(question.question_id, question.category, method, len(prompt_ids))
        if fill_row(row, run, prompt_ids, max_new_tokens, broken) and row.num_tokens > 1 and row.decode_seconds > 0:
            row.decode_tokens_per_s = (row.num_tokens - 1) / row.decode_seconds
        row.load_average = os.getloadavg()[0]
        if method == "ar" and row.error is None:
            ar_ids = row.token_ids
        elif ar_ids is not None and row.error is None:
            row.matches_ar = row.token_ids == ar_ids
            row.first_divergence = first_divergence(row.token_ids, ar_ids)
        rows.append(row)
        print(f"q{question.question_id} {question.category} {method}: {row.num_tokens} tokens, "
              f"{_fmt(row.decode_tokens_per_s)} tok/s decode, first token {row.first_token_seconds:.2f} s"
              + ("" if row.matches_ar is None else f", equal to ar: {row.matches_ar}") + f", load {row.load_average:.2f}"
              + (f", ERROR {row.error}" if row.error else ""), file=sys.stderr)
    return rows


def aggregate(rows: list[Row], bound_tokens_per_s: float | None) -> dict:
    ok = [r for r in rows if r.error is None and r.decode_tokens_per_s is not None]
    decoded = sum(r.num_tokens - 1 for r in ok)
    seconds = sum(r.decode_seconds for r in ok)
    out = {"num_questions": len(ok), "num_errors": len(rows) - len(ok), "decode_tokens": decoded,
           "decode_seconds": seconds, "decode_tokens_per_s": decoded / seconds if seconds > 0 else None,
           "first_token_seconds": sum(r.first_token_seconds for r in ok) / len(ok) if ok else None}
    out["of_bound"] = (out["decode_tokens_per_s"] / bound_tokens_per_s
                       if out["decode_tokens_per_s"] and bound_tokens_per_s else None)
    compared = [r for r in ok if r.matches_ar is not None]
    out["equal_to_ar"] = sum(r.matches_ar for r in compared) if compared else None
    errors = [r.error for r in rows if r.error]
    if errors:
        out["error"] = errors[0]
    return out


RATIOS = (("ar", "llama_f32"), ("clasp", "llama_f32"), ("ar", "llama_f16"), ("clasp", "llama_f16"),
          ("ar", "llama_q8_0"), ("clasp", "llama_q8_0"))


def summarize(rows: list[Row], methods: list[str], bounds: dict[str, float]) -> dict:
    """{category or "overall": {method: aggregate, "ratios": {"ours/peer": decode tok/s ratio}}}."""
    tables = {}
    for name, group in group_by_category(rows).items():
        table = {m: aggregate([r for r in group if r.method == m], bounds.get(m)) for m in methods}
        table["ratios"] = {f"{a}/{b}": (table[a]["decode_tokens_per_s"] / table[b]["decode_tokens_per_s"]
                                        if a in table and b in table and table[a]["decode_tokens_per_s"]
                                        and table[b]["decode_tokens_per_s"] else None)
                           for a, b in RATIOS if a in methods and b in methods}
        tables[name] = table
    return tables


# ---------------------------------------------------------------------- output
def _fmt(value, spec: str = ".1f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def render_markdown(summary: dict) -> str:
    meta, tables = summary["meta"], summary["tables"]
    m = meta["machine"]
    methods = meta["methods"]
    flags = " ".join(f for f in m["cpu_flags"] if f.startswith(("avx2", "avx512", "fma", "avx_vnni", "amx")))
    lines = [f"Peers benchmark: {m['processor']} ({m['cpu_count']} CPUs; flags {flags}), {meta['threads']} threads "
             f"for every method, load average {meta['load_average'][0]:.2f} before / "
             f"{meta['load_average_after'][0]:.2f} after; model {meta['model']}, our dtype {meta['dtype']}; "
             f"llama-cpp-python {meta['versions'].get('llama_cpp_python')} (built from its sdist, GGML_NATIVE=ON), "
             f"torch {meta['versions']['torch']}; commit {meta['git_commit'] or 'unknown'}; max new tokens "
             f"{meta['max_new_tokens']}, questions per category: {meta['questions_per_category']}, greedy, "
             f"{meta['timestamp']}.", ""]
    overall = tables["overall"]
    bw = meta["bandwidth"]
    lines += ["| method | weights MiB/token | decode tok/s | % of bandwidth bound | first token s (mean) | "
              "greedy ids equal to ar |", "|---|---:|---:|---:|---:|---:|"]
    for x in methods:
        t = overall[x]
        equal = "reference" if x == "ar" else (f"{t['equal_to_ar']}/{t['num_questions']}"
                                               if t.get("equal_to_ar") is not None else "n/a")
        note = " (vs the fp32 bound)" if x == "clasp" and t.get("of_bound") else ""
        lines.append(f"| {x} | {bw['bytes_per_token'][x] / 2**20:.0f} | {_fmt(t['decode_tokens_per_s'])} | "
                     f"{_fmt(t['of_bound'], '.0%')}{note} | {_fmt(t['first_token_seconds'], '.2f')} | {equal} |")
    ratio_names = list(overall["ratios"])
    lines += ["", "Decode tok/s per Spec-Bench category, and ours / llama.cpp:", "",
              "| category | " + " | ".join(methods) + " | " + " | ".join(ratio_names) + " |",
              "|---|" + "---:|" * (len(methods) + len(ratio_names))]
    for name, table in tables.items():
        cells = [name] + [_fmt(table[x]["decode_tokens_per_s"]) for x in methods]
        cells += [_fmt(table["ratios"][r], ".2f", "x") for r in ratio_names]
        lines.append("| " + " | ".join(cells) + " |")
    peers = [x for x in methods if x in PEERS]
    if "ar" in methods and peers:
        lines += ["", "Greedy token ids against ar's, per question (= equal; else the index of the first "
                      "differing token):", "",
                  "| question | category | prompt tokens | " + " | ".join(x for x in methods if x != "ar") + " |",
                  "|---|---|---:|" + "---:|" * (len(methods) - 1)]
        by_question = {}
        for r in summary["rows"]:
            by_question.setdefault((r["question_id"], r["category"], r["num_prompt_tokens"]), {})[r["method"]] = r
        for (qid, category, num_prompt), per in by_question.items():
            cells = [str(qid), category, str(num_prompt)]
            for x in methods:
                if x == "ar":
                    continue
                r = per.get(x)
                cells.append("error" if r is None or r["error"] else "=" if r["matches_ar"]
                             else f"differs at {r['first_divergence']}")
            lines.append("| " + " | ".join(cells) + " |")
    loads = [r["load_average"] for r in summary["rows"] if r.get("load_average") is not None]
    lines += ["", f"- 1-minute load average after each run: {min(loads):.2f}-{max(loads):.2f} (this run adds about "
                  f"{meta['threads']}; more means other processes shared the cores)" if loads else "- load: n/a",
              f"- bandwidth {bw['gb_per_s']:.1f} GB/s: a {meta['threads']}-thread torch sum over a "
                  f"{BANDWIDTH_BUFFER_MIB} MiB buffer, the better of before ({bw['before_gb_per_s']:.1f}) and after "
                  f"({bw['after_gb_per_s']:.1f}); bound tok/s = bandwidth / weight bytes per token: "
                  + ", ".join(f"{x} {bw['bound_tokens_per_s'][x]:.1f}" for x in methods if x in bw["bound_tokens_per_s"]),
              f"- decode tok/s excludes prompt processing: (tokens - 1) / time from the first generated token; "
              f"llama.cpp KV cache: F32 for llama_f32, F16 (its default) for the others",
              f"- our engine: {meta['engine']}",
              f"- llama.cpp system info: {meta['llama_cpp_system_info']}",
              f"- peak RSS {meta['peak_rss_mib']:.0f} MiB (all models loaded); wall time {meta['wall_seconds']:.0f} s"]
    errors = [f"{x}: {overall[x]['error']}" for x in methods if overall[x].get("error")]
    lines += [f"- error {e}" for e in errors]
    return "\n".join(lines) + "\n"


def write_results(summary: dict, out_dir: Path, tag: str, latest: bool = True) -> Path:
    return write_report(summary, out_dir, "peers", tag, render_markdown(summary), latest)


# ---------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="llama.cpp (F32, F16, Q8_0 GGUF) beside our ar and clasp on Spec-Bench questions: decode "
                    "tok/s, % of the measured bandwidth bound, greedy output equality.",
        epilog="`make bench-peers` builds llama-cpp-python into the cache and converts the GGUF files, then runs "
               "this. The quick default (6 questions x 5 methods, 96 new tokens) takes ~2 minutes on 2 quiet cores; "
               "llama.cpp slows down sharply when other processes share the cores (see the load averages).")
    add_question_args(parser, METHODS, METHODS, ",".join(METHODS), "ar")
    parser.add_argument("--llama-cpp-dir", type=Path, default=None,
                        help="where llama-cpp-python is installed (pip --target); default: import from the venv")
    parser.add_argument("--gguf-dir", type=Path, required=True,
                        help=f"directory with {EMBEDDED_MODEL_NAME}-{{f32,f16,q8_0}}.gguf (made by make bench-peers)")
    parser.add_argument("--threads", type=int, default=2, help="threads for torch and llama.cpp (default: 2)")
    parser.add_argument("--fp32-kernel", default="auto", choices=("auto",) + FP32_KERNELS,
                        help="force our fp32 products and plain step (default: chosen at load)")
    parser.add_argument("--draft-kernel", default="auto", choices=("auto",) + DRAFT_KERNELS,
                        help="force our int8 draft kernel (default: chosen at load)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (default: benchmarks/results)")
    parser.add_argument("--tag", default=None, help="results file name: peers-<tag>.{json,md} (default: a timestamp)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    methods = parse_methods(args.methods, METHODS)
    started, timestamp, load = time.perf_counter(), datetime.datetime.now(), os.getloadavg()
    llama_cpp = None
    if any(m in PEERS for m in methods):
        try:
            llama_cpp = import_llama_cpp(args.llama_cpp_dir)
        except (ImportError, OSError) as e:
            print(f"llama-cpp-python is not available ({type(e).__name__}: {e}). `make bench-peers` builds it once "
                  "into the cache; if that failed, its log is build.log beside the install.", file=sys.stderr)
            return 2
        missing = [p for m in methods if m in PEERS
                   if not (p := args.gguf_dir / f"{EMBEDDED_MODEL_NAME}-{PEERS[m]}.gguf").exists()]
        if missing:
            print(f"GGUF files missing: {', '.join(map(str, missing))} (`make bench-peers` converts them)",
                  file=sys.stderr)
            return 2
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    config = ClaspConfig()
    engine = Engine.load(None, config, device="cpu", dtype="float32",
                         fp32_kernel=None if args.fp32_kernel == "auto" else args.fp32_kernel,
                         draft_kernel=None if args.draft_kernel == "auto" else args.draft_kernel)
    questions = load_questions(args.questions, None if args.full else args.per_category)
    prompts = [engine.encode(q.prompt) for q in questions]  # the chat template, as bench_engine
    n_ctx = -(-(max(len(p) for p in prompts) + args.max_new_tokens + 16) // 256) * 256
    bandwidth_before = measure_bandwidth(torch.device("cpu"), BANDWIDTH_BUFFER_MIB)

    runners = {}
    for m in methods:
        if m in OURS:
            runners[m] = engine_decode_runner(engine, config, m)
        else:
            path = args.gguf_dir / f"{EMBEDDED_MODEL_NAME}-{PEERS[m]}.gguf"
            runners[m] = llama_cpp_runner(llama_cpp, path, args.threads, n_ctx, m == "llama_f32", engine.eos_ids)
    print(f"{len(questions)} questions x {len(methods)} methods ({','.join(methods)}), max {args.max_new_tokens} "
          f"new tokens, {args.threads} threads, llama.cpp n_ctx {n_ctx}", file=sys.stderr)
    broken = warm_up(runners, engine.encode(WARMUP_PROMPT))
    rows = []
    for q, prompt_ids in zip(questions, prompts):
        rows += run_question(q, prompt_ids, runners, broken, args.max_new_tokens)
    bandwidth_after = measure_bandwidth(torch.device("cpu"), BANDWIDTH_BUFFER_MIB)
    bandwidth = max(bandwidth_before, bandwidth_after)

    bytes_per_token = {m: engine.runner.weights.nbytes() for m in OURS if m in methods}
    for m in methods:
        if m in PEERS:
            bytes_per_token[m] = gguf_weight_bytes(args.gguf_dir / f"{EMBEDDED_MODEL_NAME}-{PEERS[m]}.gguf")
    bounds = {m: bandwidth / b for m, b in bytes_per_token.items()}
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "numpy": np.__version__, "gguf": importlib.metadata.version("gguf")}
    system_info = None
    if llama_cpp is not None:
        versions["llama_cpp_python"] = llama_cpp.__version__
        system_info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    meta = {"timestamp": timestamp.isoformat(timespec="seconds"), "machine": machine_info(torch.device("cpu")),
            "model": engine.model_name, "dtype": "float32", "git_commit": git_commit(), "methods": methods,
            "threads": args.threads, "max_new_tokens": args.max_new_tokens,
            "questions_per_category": "all" if args.full else args.per_category, "num_questions": len(questions),
            "questions_file": str(args.questions), "categories": list(CATEGORIES), "versions": versions,
            "llama_cpp_system_info": system_info, "llama_cpp_n_ctx": n_ctx,
            "gguf_files": {m: str(args.gguf_dir / f"{EMBEDDED_MODEL_NAME}-{PEERS[m]}.gguf") for m in methods
                           if m in PEERS},
            "bandwidth": {"gb_per_s": bandwidth / 1e9, "before_gb_per_s": bandwidth_before / 1e9,
                          "after_gb_per_s": bandwidth_after / 1e9, "buffer_mib": BANDWIDTH_BUFFER_MIB,
                          "bytes_per_token": bytes_per_token, "bound_tokens_per_s": bounds},
            "engine": (f"draft kernel {engine.draft_kernel.chosen if engine.draft_kernel else 'none'}, "
                       f"{fp32_kernels.summary(engine.runner)}, config "
                       f"{json.dumps(dataclasses.asdict(config))}"),
            "load_average": list(load), "load_average_after": list(os.getloadavg()),
            "warmup_errors": broken, "peak_rss_mib": peak_rss_mib(), "wall_seconds": time.perf_counter() - started}
    row_dicts = [{k: v for k, v in dataclasses.asdict(r).items() if k != "token_ids"} for r in rows]
    summary = {"meta": meta, "tables": summarize(rows, methods, bounds), "rows": row_dicts}
    forced = args.fp32_kernel != "auto" or args.draft_kernel != "auto"  # not the default run: no -latest page
    path = write_results(summary, args.out, args.tag or timestamp.strftime("%Y%m%d-%H%M%S"), latest=not forced)
    print(render_markdown(summary), file=sys.stderr)
    print(f"wrote {path} and the .md beside it", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
