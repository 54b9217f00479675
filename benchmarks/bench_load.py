"""Throughput under concurrency (`make bench-load`): N concurrent streaming clients through gRPC.

Starts its own redis-server, planner and decoder (bench_service's stack, server defaults: every
admitted stream decodes in one batch). For each N in --concurrency and each mode (ar, clasp),
N clients stream greedy Spec-Bench questions at once: the same --requests requests at every N (so
every level does the same work, long prompts included), each client taking the next question when
it finishes. Reported per (mode, N): aggregate generated tokens
per second over the wave's wall time, p50/p95 time to first token and time per output token
(client side), and how many outputs equal the in-process engine's plain greedy decoding of the
same question, token for token. Beside it, in the same run, transformers `generate` on a
left-padded batch of the same N prompts (greedy, the same max new tokens).

JSON + markdown + a chart (aggregate tok/s against N) under benchmarks/results/ (load-bench-*).

Usage: PYTHONPATH=. python benchmarks/bench_load.py [--concurrency 1,2,4,8,16] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.bench_engine import (DEFAULT_OUT, DEFAULT_QUESTIONS, git_commit, load_questions,  # noqa: E402
                                     machine_info)
from benchmarks.bench_service import service_stack  # noqa: E402
from benchmarks.load import percentile  # noqa: E402
from clasp.config import ClaspConfig, SamplingParams  # noqa: E402
from clasp.engine import Engine  # noqa: E402
from clasp.loading import load_model  # noqa: E402
from clients.sdk import ClaspClient, build_request  # noqa: E402

MODES = ("ar", "clasp")


def one_request(target: str, prompt: str, mode: str, max_new_tokens: int) -> dict:
    started = time.perf_counter()
    first, tokens, code = None, [], "OK"
    try:
        with ClaspClient(target, retries=0) as client:
            request = build_request(prompt, max_new_tokens=max_new_tokens, mode=mode)
            for message in client.stream(request, timeout_s=900):
                if message.token_ids and first is None:
                    first = time.perf_counter() - started
                tokens.extend(message.token_ids)
    except grpc.RpcError as e:
        code = e.code().name
    total = time.perf_counter() - started
    return dict(code=code, tokens=tokens, ttft_s=first, seconds=total,
                tpot_s=(total - first) / (len(tokens) - 1) if first is not None and len(tokens) > 1 else None)


def wave(target: str, prompts: list[str], mode: str, clients: int, max_new_tokens: int) -> tuple[list, float]:
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda text: one_request(target, text, mode, max_new_tokens), prompts))
    return results, time.perf_counter() - started


def hf_batch(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, eos_ids: set[int]) -> dict:
    """transformers generate on a left-padded batch; tokens counted up to each row's EOS."""
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)
    seconds = time.perf_counter() - started
    count = 0
    for row in out[:, width:].tolist():
        for t in row:
            count += 1
            if t in eos_ids:
                break
    return {"tokens": count, "seconds": round(seconds, 3), "tokens_per_s": count / seconds}


def render(report: dict) -> str:
    lines = [f"# Load benchmark ({report['date']}, commit {report['commit']})", "",
             f"{report['machine'].get('processor', '')}; flags {' '.join(report['machine'].get('cpu_flags') or [])}; model "
             f"{report['model']} fp32, greedy, {report['max_new_tokens']} new tokens, Spec-Bench questions, "
             f"through gRPC (decoder defaults: one batch of up to --max-concurrent streams). Every N runs the "
             f"same {report.get('requests', '?')} requests (prompts of {min(report.get('prompt_tokens') or [0])}-"
             f"{max(report.get('prompt_tokens') or [0])} tokens).", "",
             "| N | ar tok/s | clasp tok/s | clasp/ar | transformers batch tok/s | ar TTFT p50/p95 s | clasp TTFT p50/p95 s "
             "| ar TPOT p50/p95 ms | clasp TPOT p50/p95 ms | exact ar / clasp |",
             "|---:|---:|---:|---:|---:|---|---|---|---|---|"]
    for n, row in sorted(report["results"].items(), key=lambda kv: int(kv[0])):
        ar, cl, hf = row["ar"], row["clasp"], row.get("hf_batch") or {}

        def pair(m, key, scale=1.0, spec=".2f"):
            v = m[key]
            return "/".join("-" if v[q] is None else format(v[q] * scale, spec) for q in ("p50", "p95"))
        lines.append(f"| {n} | {ar['tokens_per_s']:.1f} | {cl['tokens_per_s']:.1f} | "
                     f"{cl['tokens_per_s'] / ar['tokens_per_s']:.2f}x | {hf.get('tokens_per_s', 0):.1f} | "
                     f"{pair(ar, 'ttft_s')} | {pair(cl, 'ttft_s')} | {pair(ar, 'tpot_s', 1e3, '.0f')} | "
                     f"{pair(cl, 'tpot_s', 1e3, '.0f')} | {ar['exact']}/{ar['requests']} / {cl['exact']}/{cl['requests']} |")
    single = report["results"].get("1")
    eight = report["results"].get("8")
    if single and eight:
        lines += ["", f"Aggregate at 8 streams over 1: ar {eight['ar']['tokens_per_s'] / single['ar']['tokens_per_s']:.2f}x, "
                      f"clasp {eight['clasp']['tokens_per_s'] / single['clasp']['tokens_per_s']:.2f}x. "
                      f"Decoder RSS after: {report.get('decoder_rss_mib')} MiB."]
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted(int(n) for n in report["results"])
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("ar", "ar (gRPC)"), ("clasp", "clasp (gRPC)"), ("hf_batch", "transformers padded batch")):
        ys = [report["results"][str(n)].get(key, {}).get("tokens_per_s") for n in ns]
        ax.plot(ns, ys, marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate tokens / s")
    ax.set_title("Throughput against concurrency")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated numbers of concurrent clients")
    p.add_argument("--requests", type=int, default=16,
                   help="requests per wave, the same at every N (at least the largest N; Spec-Bench questions "
                        "taken in turn from the 6 categories)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS)
    p.add_argument("--no-hf", action="store_true", help="skip transformers' padded-batch generate")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args()
    levels = [int(n) for n in args.concurrency.split(",")]
    if not levels or min(levels) < 1 or max(levels) > 64:
        p.error("--concurrency: numbers in [1, 64]")
    if not max(levels) <= args.requests <= 256:
        p.error(f"--requests: between the largest N ({max(levels)}) and 256")
    torch.set_num_threads(2)
    questions = load_questions(args.questions, per_category=max(1, -(-args.requests // 6)))
    # Categories in turn, so that the requests (and each wave's first N) mix them.
    rank: dict[str, int] = {}
    order = []
    for q in questions:
        order.append((rank.get(q.category, 0), q))
        rank[q.category] = rank.get(q.category, 0) + 1
    questions = [q for _, q in sorted(order, key=lambda x: x[0])][:args.requests]
    engine = Engine.load(None, ClaspConfig(mode="ar"), device="cpu", dtype="float32")
    texts = [q.prompt for q in questions]
    prompts = [engine.encode(text) for text in texts]
    references = [engine.generate(ids, SamplingParams(max_new_tokens=args.max_new_tokens), ClaspConfig(mode="ar")).token_ids
                  for ids in prompts]
    eos_ids = set(engine.eos_ids)
    tokenizer = engine.tokenizer
    del engine
    hf_model = None if args.no_hf else load_model(None, torch.float32, torch.device("cpu"))[0]
    report = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": git_commit(),
              "machine": machine_info(torch.device("cpu")), "model": "SmolLM2-135M-Instruct",
              "max_new_tokens": args.max_new_tokens, "concurrency": levels, "requests": args.requests,
              "prompt_tokens": [len(p) for p in prompts], "results": {}}
    with tempfile.TemporaryDirectory() as logs, service_stack(Path(logs), 2, 1) as stack:
        for n in levels:
            count = args.requests
            batch = [texts[i % len(texts)] for i in range(count)]
            batch_ids = [prompts[i % len(prompts)] for i in range(count)]
            refs = [references[i % len(prompts)] for i in range(count)]
            row = {}
            for mode in MODES:
                results, seconds = wave(stack.target, batch, mode, n, args.max_new_tokens)
                ok = [r for r in results if r["code"] == "OK"]
                tokens = sum(len(r["tokens"]) for r in ok)
                row[mode] = {"requests": count, "completed": len(ok), "seconds": round(seconds, 3),
                             "tokens": tokens, "tokens_per_s": tokens / seconds,
                             "exact": sum(r["tokens"] == ref for r, ref in zip(results, refs) if r["code"] == "OK"),
                             "codes": sorted({r["code"] for r in results}),
                             "ttft_s": {f"p{q}": percentile([r["ttft_s"] for r in ok if r["ttft_s"]], q) for q in (50, 95)},
                             "tpot_s": {f"p{q}": percentile([r["tpot_s"] for r in ok if r["tpot_s"]], q) for q in (50, 95)}}
                print(f"N={n} {mode}: {row[mode]['tokens_per_s']:.1f} tok/s, exact {row[mode]['exact']}/{count}",
                      flush=True)
            if hf_model is not None:
                row["hf_batch"] = hf_batch(hf_model, tokenizer, batch_ids[:n], args.max_new_tokens, eos_ids)
                print(f"N={n} transformers batch: {row['hf_batch']['tokens_per_s']:.1f} tok/s", flush=True)
            report["results"][str(n)] = row
        import psutil

        report["decoder_rss_mib"] = round(psutil.Process(stack.processes["decoder"].pid).memory_info().rss / 2**20)
    tag = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"load-bench-{tag}.json").write_text(json.dumps(report, indent=2))
    md = render(report)
    (args.out / f"load-bench-{tag}.md").write_text(md)
    (args.out / "load-bench-latest.md").write_text(md)
    chart(report, args.out / f"load-bench-{tag}.png")
    chart(report, args.out / "load-bench-latest.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
