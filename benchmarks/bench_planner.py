"""Planner benchmark: the DP's time per plan as the context, M and the number of layers grow.

Each plan is one sequence-parallel DP (clasp.planner.plan_layers) over a real context: a Spec-Bench
prompt prefilled to the wanted length, hidden states from the full model at its last token. The
layer count is varied by planning over the first L layers only (the DP's cost is one batched
call of up to M+1 rows per layer, so it grows with L x M rows, and attention with the context).
Time is the median of --repeats plans. Also compares the DP scored with the full weights against
the draft's copy (draft=True), and the decoder-side cost of one decoding step for scale.

Usage: PYTHONPATH=. python benchmarks/bench_planner.py [--contexts 128,512,1024,2048] [--skips 6,15,29]
Results: benchmarks/results/planner-<tag>.{json,md} and planner-latest.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.report import write_report  # noqa: E402
from benchmarks.bench_engine import DEFAULT_OUT, DEFAULT_QUESTIONS, git_commit, machine_info, sync  # noqa: E402
from clasp.config import ClaspConfig  # noqa: E402
from clasp.decoding import prefill  # noqa: E402
from clasp.engine import Engine  # noqa: E402
from clasp.planner import plan_layers  # noqa: E402


def context_ids(engine: Engine, questions: Path, length: int) -> list[int]:
    """`length` token ids: Spec-Bench prompts concatenated (summarization/rag ones are long)."""
    ids: list[int] = []
    with open(questions, encoding="utf-8") as f:
        for line in f:
            ids += engine.encode(json.loads(line)["turns"][0], chat=False)
            if len(ids) >= length:
                return ids[:length]
    raise ValueError(f"{questions} has fewer than {length} tokens")


def time_plan(engine: Engine, ids: list[int], max_skip: int, layers: int, repeats: int, draft: bool) -> float:
    runner = engine.runner
    cache = runner.new_cache(len(ids) + 1)
    with torch.inference_mode():
        _, hidden = prefill(runner, cache, torch.tensor(ids, device=runner.device), collect_hidden=True)
        # Plan for the last token: the cache must hold positions before it only.
        cache.truncate(len(ids) - 1)
        times = []
        for _ in range(repeats):
            plan, _ = plan_layers(runner, cache, hidden[:layers + 1], len(ids) - 1, min(max_skip, layers - 1),
                                  draft=draft)
            times.append(plan.seconds)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None, help="local HF model directory (default: the embedded model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--contexts", default="128,512,1024,2048", help="context lengths, tokens")
    parser.add_argument("--skips", default="6,15,29", help="M values (capped at L-1)")
    parser.add_argument("--layer-fractions", default="0.5,1.0", help="plan over this fraction of the layers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--tag", default=None)
    args = parser.parse_args(argv)
    contexts = [int(x) for x in args.contexts.split(",")]
    skips = [int(x) for x in args.skips.split(",")]
    timestamp = datetime.datetime.now()
    engine = Engine.load(args.model, ClaspConfig(), args.device, args.dtype)
    num_layers = engine.runner.spec.num_layers
    layer_counts = sorted({max(2, round(float(f) * num_layers)) for f in args.layer_fractions.split(",")})
    rows = []
    for length in contexts:
        ids = context_ids(engine, args.questions, length)
        for layers in layer_counts:
            for m in sorted({min(m, layers - 1) for m in skips}):  # M is capped at L-1
                for draft in ([False, True] if engine.runner.draft_has_copy and layers == num_layers else [False]):
                    seconds = time_plan(engine, ids, m, layers, args.repeats, draft)
                    rows.append({"context": length, "layers": layers, "max_skip": min(m, layers - 1),
                                 "draft_weights": draft, "seconds": seconds})
                    print(f"context {length:5d}  layers {layers:3d}  M {min(m, layers - 1):3d}  "
                          f"{'draft copy' if draft else 'full      '}  {seconds * 1000:8.1f} ms", file=sys.stderr)
    # A plain decoding step at the longest context, for scale.
    runner = engine.runner
    ids = context_ids(engine, args.questions, contexts[-1])
    cache = runner.new_cache(len(ids) + 1)
    with torch.inference_mode():
        prefill(runner, cache, torch.tensor(ids[:-1], device=runner.device), collect_hidden=False)
        steps = []
        for _ in range(args.repeats):
            cache.truncate(len(ids) - 1)
            token = torch.tensor(ids[-1:], device=runner.device)
            sync(runner.device)
            t0 = time.perf_counter()
            runner.forward(token, cache, len(ids) - 1)
            sync(runner.device)
            steps.append(time.perf_counter() - t0)
    meta = {"timestamp": timestamp.isoformat(timespec="seconds"), "machine": machine_info(runner.device),
            "model": engine.model_name, "dtype": str(runner.dtype).removeprefix("torch."), "git_commit": git_commit(),
            "num_layers": num_layers, "repeats": args.repeats,
            "decode_step_seconds": statistics.median(steps), "decode_step_context": contexts[-1]}
    summary = {"meta": meta, "rows": rows}
    markdown = render(summary)
    write_report(summary, args.out, "planner", args.tag or timestamp.strftime("%Y%m%d-%H%M%S"), markdown)
    print(markdown, file=sys.stderr)
    return 0


def render(summary: dict) -> str:
    meta = summary["meta"]
    m = meta["machine"]
    lines = [f"DP time per plan (median of {meta['repeats']}): {m.get('cuda_device') or m['processor']} ({m['cpu_count']} CPUs, "
             f"{m['torch_threads']} threads, {m['device']}), {meta['model']} ({meta['num_layers']} layers), "
             f"{meta['dtype']}, commit {meta['git_commit']}, {meta['timestamp']}.", "",
             "| context tokens | layers planned | M | weights | ms per plan |", "|---:|---:|---:|---|---:|"]
    for r in summary["rows"]:
        lines.append(f"| {r['context']} | {r['layers']} | {r['max_skip']} | "
                     f"{'draft copy' if r['draft_weights'] else 'full'} | {r['seconds'] * 1000:.1f} |")
    lines += ["", f"- one plain decoding step at {meta['decode_step_context']} tokens of context: "
                  f"{meta['decode_step_seconds'] * 1000:.1f} ms"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
