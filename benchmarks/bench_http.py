"""HTTP benchmark: the OpenAI-compatible gateway beside the gRPC API and the in-process engine, in one run.

Starts bench_service's stack (redis-server, planner, decoder on loopback, server defaults) and the
HTTP gateway (python -m http_gateway) in front of the decoder, then for each question, one after
another with nothing in flight:

  grpc      the decoder through the SDK (ClaspClient.stream), server-default mode (clasp)
  http      the same request as an OpenAI chat completion through the gateway, with the `openai`
            client, streaming (server-sent events) with stream_options.include_usage
  engine    the in-process engine in this driver, server-default config

and, to isolate the gateway's per-request cost from decoding, `--short N` one-token requests
(max_tokens 1) through gRPC and HTTP, alternating.

Timings are client-side: time to first token is the time to the first message/chunk carrying text,
tokens/s is generated tokens over the time from sending the request to the end of the stream. All
greedy, so http and engine must produce grpc's text (checked, counted).

Results go to benchmarks/results/http-<tag>.{json,md} and benchmarks/results/http-latest.md.

Usage: PYTHONPATH=. python benchmarks/bench_http.py [--per-category N] [--max-new-tokens N] [--short N]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from statistics import mean, median

import psutil
import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable without PYTHONPATH=.
    sys.path.insert(0, str(REPO))

from benchmarks.bench_engine import (DEFAULT_OUT, QUICK_MAX_NEW_TOKENS, Question, git_commit,  # noqa: E402
                                     load_questions, machine_info, DEFAULT_QUESTIONS)
from benchmarks.bench_service import (free_port, log_tail, process_peak_rss_mib, service_env,  # noqa: E402
                                      service_stack, start_process, stop_process)
from benchmarks.report import fmt, write_report  # noqa: E402
from clasp.config import SamplingParams  # noqa: E402
from clasp.engine import Engine  # noqa: E402
from clasp.loading import resolve_device  # noqa: E402
from clients.sdk import ClaspClient, Collector, build_request  # noqa: E402

METHODS = ("grpc", "http", "engine")
READY_TIMEOUT_S = 60.0
REQUEST_TIMEOUT_S = 600.0


@dataclasses.dataclass
class Row:
    question_id: int
    category: str
    method: str
    num_tokens: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    ttft_s: float | None = None
    cpu_s: dict = dataclasses.field(default_factory=dict)  # CPU seconds each process spent on this run
    matches_grpc: bool | None = None
    error: str | None = None
    text: str = dataclasses.field(default="", repr=False)


def grpc_run(client: ClaspClient, prompt: str, max_new_tokens: int) -> dict:
    collector, ttft = Collector(), None
    t0 = time.perf_counter()
    for message in client.stream(build_request(prompt, max_new_tokens=max_new_tokens), timeout_s=REQUEST_TIMEOUT_S):
        if ttft is None and message.text:
            ttft = time.perf_counter() - t0
        collector.add(message)
    seconds = time.perf_counter() - t0
    done = collector.completion()
    return dict(text=done.text, num_tokens=len(done.token_ids), seconds=seconds, ttft_s=ttft)


def http_run(client, model: str, prompt: str, max_new_tokens: int) -> dict:
    text, ttft, usage = [], None, None
    t0 = time.perf_counter()
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                            max_tokens=max_new_tokens, stream=True,
                                            stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if ttft is None:
                ttft = time.perf_counter() - t0
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    seconds = time.perf_counter() - t0
    return dict(text="".join(text), num_tokens=usage.completion_tokens, seconds=seconds, ttft_s=ttft)


def engine_run(engine: Engine, prompt: str, max_new_tokens: int) -> dict:
    """Streams as the decoder does, so its time to first token is comparable (tokenization included)."""
    ttft, text, result = None, [], None
    t0 = time.perf_counter()
    for chunk in engine.stream(engine.encode(prompt), SamplingParams(max_new_tokens=max_new_tokens)):
        if ttft is None and chunk.text:
            ttft = time.perf_counter() - t0
        text.append(chunk.text)
        result = chunk.result or result
    seconds = time.perf_counter() - t0
    return dict(text="".join(text), num_tokens=len(result.token_ids), seconds=seconds, ttft_s=ttft)


@contextlib.contextmanager
def gateway(decoder_target: str, log: Path):
    port = free_port()
    proc = start_process([sys.executable, "-m", "http_gateway", "--host", "127.0.0.1", "--port", str(port),
                          "--decoder", decoder_target], log, service_env(""))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the gateway did not become healthy; {log.name}:\n{log_tail(log)}")
            time.sleep(0.1)
        yield url, proc
    finally:
        stop_process(proc)


def cpu_seconds(processes: dict[str, psutil.Process]) -> dict[str, float]:
    """User + system CPU seconds of each process so far, all its threads."""
    out = {}
    for name, proc in processes.items():
        t = proc.cpu_times()
        out[name] = t.user + t.system
    return out


def run_one(q: Question, method: str, fn, processes: dict[str, psutil.Process]) -> Row:
    row = Row(q.question_id, q.category, method)
    try:
        before = cpu_seconds(processes)
        for key, value in fn().items():
            setattr(row, key, value)
        after = cpu_seconds(processes)
        row.cpu_s = {name: after[name] - before[name] for name in processes}
        row.tokens_per_s = row.num_tokens / row.seconds if row.seconds > 0 else 0.0
    except Exception as e:
        row.error = f"{type(e).__name__}: {e}"
    return row


def aggregate(rows: list[Row]) -> dict:
    ok = [r for r in rows if r.error is None]
    seconds, tokens = sum(r.seconds for r in ok), sum(r.num_tokens for r in ok)
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    compared = [r for r in ok if r.matches_grpc is not None]
    return {"num_questions": len(ok), "num_errors": len(rows) - len(ok), "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else None,
            "ttft_ms": mean(ttfts) * 1000 if ttfts else None,
            "text_mismatches_vs_grpc": sum(not r.matches_grpc for r in compared) if compared else None,
            "cpu_ms_per_token": {name: sum(r.cpu_s.get(name, 0.0) for r in ok) / tokens * 1000
                                 for name in ("decoder", "gateway", "driver")} if tokens else None,
            "error": next((r.error for r in rows if r.error), None)}


def render_markdown(summary: dict) -> str:
    meta, t, short = summary["meta"], summary["overall"], summary["short"]
    m = meta["machine"]
    lines = [f"HTTP benchmark (OpenAI-compatible gateway -> gRPC decoder, beside gRPC and the in-process engine): "
             f"{m['processor']} ({m['cpu_count']} CPUs; decoder and engine torch threads {meta['threads']}; "
             f"{m['device']}), model {meta['model']}, commit {meta['git_commit'] or 'unknown'}, max new tokens "
             f"{meta['max_new_tokens']}, {meta['num_questions']} questions, greedy, server-default mode, "
             f"{meta['timestamp']}; the gateway's HTTP parser: {meta.get('gateway_http_parser', 'h11')}.", "",
             "| method | tok/s | mean TTFT ms | tokens | text equal to grpc |", "|---|---:|---:|---:|---:|"]
    for method in meta["methods"]:
        a = t[method]
        same = ("-" if a["text_mismatches_vs_grpc"] is None
                else f"{a['num_questions'] - a['text_mismatches_vs_grpc']}/{a['num_questions']}")
        lines.append(f"| {method} | {fmt(a['tokens_per_s'])} | {fmt(a['ttft_ms'], '.0f')} | {a['tokens']} | {same} |")
    r = summary["ratios"]
    cpu = {m: t[m].get("cpu_ms_per_token") or {} for m in ("grpc", "http")}
    if cpu["http"]:
        lines += ["", "CPU time per generated token (ms; all threads of each process, from /proc; the decoder's "
                      "includes OpenMP's spin-waiting, which grows when the cores are shared):", "",
                  "| method | decoder | gateway | driver (client) |", "|---|---:|---:|---:|"]
        for m in ("grpc", "http"):
            lines.append(f"| {m} | {fmt(cpu[m].get('decoder'), '.2f')} | {fmt(cpu[m].get('gateway'), '.3f')} | "
                         f"{fmt(cpu[m].get('driver'), '.3f')} |")
    lines += ["", f"- http/grpc tokens/s: {fmt(r.get('http_vs_grpc'), '.3f', 'x')} (median per question "
                  f"{fmt(r.get('http_vs_grpc_median_per_question'), '.3f', 'x')}); grpc/engine: "
                  f"{fmt(r.get('grpc_vs_engine'), '.3f', 'x')}; http/engine: {fmt(r.get('http_vs_engine'), '.3f', 'x')}",
              f"- mean TTFT, http minus grpc: {fmt(r.get('ttft_http_minus_grpc_ms'), '.1f')} ms"]
    if short:
        lines.append(f"- one-token requests ({short['n']} each, alternating): median grpc {short['grpc_ms']:.1f} ms, "
                     f"http {short['http_ms']:.1f} ms: the gateway adds {short['http_ms'] - short['grpc_ms']:.1f} ms "
                     "per request (JSON, HTTP, SSE framing and a second gRPC hop on loopback); gateway CPU "
                     f"{short['gateway_cpu_ms_per_request']:.1f} ms per one-token request (less its idle rate)")
    if r.get("gateway_cpu_ms_per_token") is not None:
        lines.append(f"- the gateway's own CPU time (less its idle rate) is {r['gateway_cpu_ms_per_token']:.2f} ms per "
                     f"generated token, {fmt(r.get('gateway_cpu_share_of_grpc_token_time'), '.2%')} of gRPC's wall "
                     "time per token in this run: on cores the decoder keeps busy, about the most it can slow tokens/s")
    errors = [f"{k}: {v['error']}" for k, v in t.items() if v.get("error")]
    if errors:
        lines.append("- errors: " + "; ".join(errors))
    rss = ", ".join(f"{n} {fmt(v, '.0f')}" for n, v in (meta.get("peak_rss_mib") or {}).items())
    lines.append(f"- peak RSS MiB: {rss}; wall time {meta['wall_seconds']:.0f} s")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Time to first token and tokens/s through the OpenAI-compatible HTTP gateway, beside the gRPC "
                    "API and the in-process engine, in one run (loopback, bounded).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS, help="Spec-Bench question.jsonl")
    p.add_argument("--per-category", type=int, default=1, help="questions per category (6 categories)")
    p.add_argument("--max-new-tokens", type=int, default=QUICK_MAX_NEW_TOKENS, help="new tokens per answer at most")
    p.add_argument("--short", type=int, default=10, help="one-token requests per API for the per-request overhead")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the decoder and the in-process engine")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory")
    p.add_argument("--tag", default=None, help="results file name: http-<tag>.json/.md (default: a timestamp)")
    return p


def main(argv: list[str] | None = None) -> int:
    import openai

    args = build_parser().parse_args(argv)
    # SIGTERM (e.g. `timeout`) unwinds like Ctrl-C, so the finally blocks stop every process started here
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    questions = load_questions(args.questions, args.per_category)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    started, timestamp = time.perf_counter(), datetime.datetime.now()
    rows: list[Row] = []
    short = None
    with contextlib.ExitStack() as resources:
        log_dir = Path(resources.enter_context(tempfile.TemporaryDirectory(prefix="clasp-bench-http-")))
        stack = resources.enter_context(service_stack(log_dir, args.threads, 1))
        url, gateway_proc = resources.enter_context(gateway(stack.target, log_dir / "gateway.log"))
        processes = {"decoder": psutil.Process(stack.processes["decoder"].pid), "gateway": psutil.Process(gateway_proc.pid),
                     "driver": psutil.Process()}
        client = resources.enter_context(ClaspClient(stack.target))
        http = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)
        model = client.model_info()["model_id"]
        engine = Engine.load(None)  # after the services: loading here does not slow their start
        print(f"ready after {time.perf_counter() - started:.1f} s: decoder {stack.target}, gateway {url}",
              file=sys.stderr, flush=True)
        runs = {"grpc": lambda p, n: grpc_run(client, p, n), "http": lambda p, n: http_run(http, model, p, n),
                "engine": lambda p, n: engine_run(engine, p, n)}
        for run in runs.values():  # warm-up: first-call costs of each path
            stack.wait_idle()
            run("Say hello in one short sentence.", 8)
        for i, q in enumerate(questions):
            # grpc and http alternate which goes first, so a drift in the machine's load favours neither
            order = ("grpc", "http", "engine") if i % 2 == 0 else ("http", "grpc", "engine")
            done = {}
            for method in order:
                stack.wait_idle()
                done[method] = run_one(q, method, lambda: runs[method](q.prompt, args.max_new_tokens), processes)
            for method in METHODS:
                row = done[method]
                if method != "grpc" and row.error is None and done["grpc"].error is None:
                    row.matches_grpc = row.text == done["grpc"].text
                rows.append(row)
                print(f"q{q.question_id:<4d} {q.category:<14s} {method:<6s} {row.num_tokens:4d} tok "
                      f"{row.tokens_per_s:6.1f} tok/s TTFT {fmt(row.ttft_s and row.ttft_s * 1000, '.0f')} ms"
                      f"{'  MISMATCH' if row.matches_grpc is False else ''}{'  ' + row.error if row.error else ''}",
                      file=sys.stderr, flush=True)
        if args.short:
            times = {"grpc": [], "http": []}
            gateway_cpu = {"grpc": 0.0, "http": 0.0}
            for _ in range(args.short):
                for method in times:
                    stack.wait_idle()
                    before = cpu_seconds(processes)
                    t0 = time.perf_counter()
                    runs[method]("Say hello.", 1)
                    times[method].append(time.perf_counter() - t0)
                    gateway_cpu[method] += cpu_seconds(processes)["gateway"] - before["gateway"]
            idle = gateway_cpu["grpc"] / sum(times["grpc"])  # the idle gateway's CPU per second (its event loop, gRPC's poller)
            short = {"n": args.short, "grpc_ms": median(times["grpc"]) * 1000, "http_ms": median(times["http"]) * 1000,
                     "gateway_cpu_ms_per_request": (gateway_cpu["http"] - idle * sum(times["http"])) / args.short * 1000}

        peak_rss = {name: process_peak_rss_mib(p.pid) for name, p in processes.items()}
    overall = {m: aggregate([r for r in rows if r.method == m]) for m in METHODS}
    tps = {m: overall[m]["tokens_per_s"] for m in METHODS}
    ttft = {m: overall[m]["ttft_ms"] for m in METHODS}
    pairs = [(h.tokens_per_s / g.tokens_per_s) for g, h in zip([r for r in rows if r.method == "grpc"],
                                                              [r for r in rows if r.method == "http"])
             if g.error is None and h.error is None and g.tokens_per_s > 0]
    def total(method: str, what: str) -> float:
        return sum(r.cpu_s.get(what, 0.0) if what != "seconds" else r.seconds
                   for r in rows if r.method == method and r.error is None)

    # The gateway's CPU for the HTTP requests, less what it spends idle (measured during the gRPC
    # requests, which it does not see), per generated token; and that against gRPC's wall time per token.
    idle_rate = total("grpc", "gateway") / total("grpc", "seconds") if total("grpc", "seconds") else 0.0
    http_tokens = overall["http"]["tokens"]
    gateway_ms = ((total("http", "gateway") - idle_rate * total("http", "seconds")) / http_tokens * 1000
                  if http_tokens else None)
    grpc_ms = 1000 / tps["grpc"] if tps["grpc"] else None
    ratios = {"gateway_cpu_ms_per_token": gateway_ms,
              "gateway_cpu_share_of_grpc_token_time": gateway_ms / grpc_ms if gateway_ms is not None and grpc_ms else None,
              "http_vs_grpc_median_per_question": median(pairs) if pairs else None,
              "http_vs_grpc": tps["http"] / tps["grpc"] if tps["http"] and tps["grpc"] else None,
              "grpc_vs_engine": tps["grpc"] / tps["engine"] if tps["grpc"] and tps["engine"] else None,
              "http_vs_engine": tps["http"] / tps["engine"] if tps["http"] and tps["engine"] else None,
              "ttft_http_minus_grpc_ms": ttft["http"] - ttft["grpc"] if ttft["http"] and ttft["grpc"] else None}
    meta = {"timestamp": timestamp.isoformat(timespec="seconds"), "machine": machine_info(resolve_device("auto")),
            "model": model, "git_commit": git_commit(), "methods": list(METHODS), "threads": args.threads,
            "max_new_tokens": args.max_new_tokens, "num_questions": len(questions),
            "gateway_http_parser": "httptools" if importlib.util.find_spec("httptools") else "h11",  # uvicorn's "auto"
            "peak_rss_mib": peak_rss, "wall_seconds": time.perf_counter() - started}
    summary = {"meta": meta, "overall": overall, "ratios": ratios, "short": short,
               "rows": [{k: v for k, v in dataclasses.asdict(r).items() if k != "text"} for r in rows]}
    markdown = render_markdown(summary)
    path = write_report(summary, args.out, "http", args.tag or timestamp.strftime("%Y%m%d-%H%M%S"), markdown)
    print(markdown, file=sys.stderr)
    print(f"wrote {path} and the .md beside it", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
