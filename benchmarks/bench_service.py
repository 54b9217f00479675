"""Service benchmark: the engine benchmark's Spec-Bench sample, decoded through the gRPC services.

Starts a real stack on loopback (redis-server with a random password, the planner, the decoder,
all with server defaults) and runs, one after another for each question:

  grpc_ar        the decoder, mode="ar" (plain decoding): the baseline
  grpc_clasp     the decoder, mode="clasp" with the server's defaults (M=0 with the draft copy, int8 on CPU)
  grpc_clasp_dp  the decoder, mode="clasp", num_skip_layers=6 with adaptive M (skip counts 6, 4, 3, 2, 0):
                 the DP active, plans made by the planner
  engine_ar      the in-process engine in this driver, mode="ar"
  engine_clasp   the in-process engine in this driver, mode="clasp"

The services and the driver share the CPU cores, so nothing overlaps: every method starts only when
the planner has answered every plan request (no request in flight anywhere), and the engine runs in
the driver while the services are idle, with as many torch threads as the decoder. grpc/engine per
mode is then the cost of serving (gRPC, the asyncio loop and its worker thread, the plan bus).

gRPC timings are client-side: tokens/s is generated tokens over the time from sending the request to
the final message (server-side tokenization and prefill included), and time to first token is the
time to the first streamed message that carries tokens. Each gRPC request uses a fresh session, so
no plan carries over from an earlier question. Engine timings come from bench_engine's runner
(prefill included, tokenization excluded: a few ms). All methods are greedy, so every method must
emit exactly grpc_ar's token ids (checked, counted).

Results go to benchmarks/results/service-<tag>.{json,md} and benchmarks/results/service-latest.md.

Usage: PYTHONPATH=. python benchmarks/bench_service.py [--per-category N | --full] [...]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from statistics import mean
from typing import Callable, Iterator

import redis
import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable without PYTHONPATH=.
    sys.path.insert(0, str(REPO))

from benchmarks.bench_engine import (DEFAULT_OUT, QUICK_MAX_NEW_TOKENS,  # noqa: E402
                                     QUICK_PER_CATEGORY, WARMUP_PROMPT, WARMUP_TOKENS, Question,
                                     engine_runner, git_commit, load_questions, machine_info,
                                     add_question_args, group_by_category, parse_methods, peak_rss_mib,
                                     write_results)
from benchmarks.report import fmt, tokens_per_s_cell  # noqa: E402
from clasp.config import ClaspConfig  # noqa: E402
from clasp.engine import Engine  # noqa: E402
from clasp.loading import model_identity, resolve_device, resolve_dtype  # noqa: E402
from clients.sdk import ClaspClient, Collector, build_request  # noqa: E402
from serving.plan_wire import PLAN_REQUEST_STREAM, PLANNER_GROUP  # noqa: E402

DP_SKIP_LAYERS = 6  # M for grpc_clasp_dp: the DP has layers to choose, so the planner does real work
GRPC_OPTIONS = {"grpc_ar": {"mode": "ar"}, "grpc_clasp": {"mode": "clasp"},
                "grpc_clasp_dp": {"mode": "clasp", "num_skip_layers": DP_SKIP_LAYERS, "adaptive_skip": True}}
ENGINE_MODES = {"engine_ar": "ar", "engine_clasp": "clasp"}
METHODS = ("grpc_ar", "grpc_clasp", "grpc_clasp_dp", "engine_ar", "engine_clasp")  # run order within a question
BASELINE = "grpc_ar"  # token ids every method must equal, and the denominator of the gRPC speedups
RATIOS = {  # name: (numerator, denominator), both tokens/s
    "clasp_vs_ar_grpc": ("grpc_clasp", "grpc_ar"),
    "clasp_dp_vs_ar_grpc": ("grpc_clasp_dp", "grpc_ar"),
    "grpc_vs_engine_clasp": ("grpc_clasp", "engine_clasp"),
    "grpc_vs_engine_ar": ("grpc_ar", "engine_ar"),
    "clasp_vs_ar_engine": ("engine_clasp", "engine_ar"),
}
REDIS_SERVER = Path(sys.executable).parent / "redis-server"
READY_TIMEOUT_S = 180.0
IDLE_TIMEOUT_S = 30.0
PUBLISH_DELAY_S = 0.15  # the decoder's plan bus flushes its outbox every 50 ms
REQUEST_TIMEOUT_S = 600.0
LOG_PROBLEMS_KEPT = 20  # warning/error lines kept per service log in the results


@dataclasses.dataclass
class ServiceRow:
    """One method on one question."""

    question_id: int
    category: str
    method: str
    num_prompt_tokens: int | None = None
    num_tokens: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    ttft_s: float | None = None  # gRPC only: client-side, to the first streamed message with tokens
    finish_reason: str | None = None
    mean_accepted_length: float | None = None  # clasp modes: tokens emitted per verification round
    mean_skipped_layers: float | None = None  # clasp modes: layers skipped per model-drafted token
    num_rounds: int | None = None
    num_draft_tokens: int | None = None
    num_accepted_tokens: int | None = None
    plan_versions: list[int] | None = None  # gRPC only: planner plans the decoder adopted, in order
    plan_io_seconds: float | None = None  # gRPC only: decoder time on plan requests and adoption
    decode_seconds: float | None = None  # gRPC only: the generation's time in the decoder's engine
    matches_grpc_ar: bool | None = None
    error: str | None = None
    token_ids: list[int] = dataclasses.field(default_factory=list, repr=False)


ROW_FIELDS = frozenset(f.name for f in dataclasses.fields(ServiceRow))
Runner = Callable[[str, int], dict]  # (prompt text, max new tokens) -> ServiceRow fields


# ---------------------------------------------------------------------- the service stack
@dataclasses.dataclass
class Stack:
    """A running redis-server, planner and decoder, and the driver's view of them."""

    target: str  # the decoder's gRPC address
    redis: redis.Redis
    processes: dict[str, subprocess.Popen]
    logs: dict[str, Path]

    def wait_idle(self) -> None:
        """Return once the planner has acknowledged every plan request published so far."""
        time.sleep(PUBLISH_DELAY_S)
        deadline = time.monotonic() + IDLE_TIMEOUT_S
        while not planner_idle(self.redis):
            if time.monotonic() > deadline:
                print(f"warning: planner still busy after {IDLE_TIMEOUT_S:.0f} s; going on", file=sys.stderr)
                return
            time.sleep(0.05)

    def report(self) -> dict:
        """Peak RSS and the warning/error lines of the planner's and decoder's logs (read while running)."""
        names = ("planner", "decoder")
        return {"peak_rss_mib": {n: process_peak_rss_mib(self.processes[n].pid) for n in names},
                "log_problems": {n: log_problems(self.logs[n]) for n in names}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def planner_idle(client: redis.Redis) -> bool:
    """Every plan request in the stream was delivered to the planner group and acknowledged."""
    try:
        last = client.xinfo_stream(PLAN_REQUEST_STREAM)["last-generated-id"]
        groups = client.xinfo_groups(PLAN_REQUEST_STREAM)
    except redis.ResponseError:  # no stream yet: nothing was ever requested
        return True
    group = next((g for g in groups if g["name"] == PLANNER_GROUP.encode()), None)
    return group is not None and group["last-delivered-id"] == last and group["pending"] == 0


def service_env(password: str) -> dict[str, str]:
    """This environment without CLASP_* settings (the services run on their defaults), plus what they need."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLASP_")}
    env.update(CLASP_REDIS_PASSWORD=password, PYTHONPATH=str(REPO),
               CLASP_CACHE_DIR=os.environ.get("CLASP_CACHE_DIR", str(REPO / ".cache")))
    return env


def start_process(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def stop_process(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_until_serving(name: str, target: str, proc: subprocess.Popen, log: Path, deadline: float) -> None:
    """Health SERVING at target, or RuntimeError with the log's tail when the process exits or time runs out."""
    with ClaspClient(target) as client:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; {log.name}:\n{log_tail(log)}")
            try:
                client.wait_ready(min(5.0, max(deadline - time.monotonic(), 0.1)))
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} not serving after {READY_TIMEOUT_S:.0f} s; {log.name}:\n"
                                       f"{log_tail(log)}") from None


def wait_for_redis(client: redis.Redis, proc: subprocess.Popen, log: Path, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if client.ping():
                return
        except redis.RedisError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not start; redis.log:\n{log_tail(log)}")
        time.sleep(0.05)


@contextlib.contextmanager
def service_stack(log_dir: Path, decoder_threads: int, planner_threads: int) -> Iterator[Stack]:
    """Start redis-server, the planner and the decoder; yield once both services serve; always stop all three."""
    password = secrets.token_hex(16)
    redis_port, planner_port, decoder_port = free_port(), free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    env = service_env(password)
    logs = {name: log_dir / f"{name}.log" for name in ("redis", "planner", "decoder")}
    processes: dict[str, subprocess.Popen] = {}
    client = None
    try:
        processes["redis"] = start_process(
            [str(REDIS_SERVER), "--port", str(redis_port), "--bind", "127.0.0.1", "--requirepass", password,
             "--save", "", "--appendonly", "no", "--dir", str(log_dir)], logs["redis"], env)
        client = redis.Redis(host="127.0.0.1", port=redis_port, password=password, socket_timeout=5.0)
        wait_for_redis(client, processes["redis"], logs["redis"])
        common = ["--host", "127.0.0.1", "--metrics-port", "0", "--redis-url", redis_url]
        processes["planner"] = start_process(
            [sys.executable, "-m", "planner_service", "--port", str(planner_port), *common,
             "--threads", str(planner_threads)], logs["planner"], env)
        processes["decoder"] = start_process(
            [sys.executable, "-m", "decoder_service", "--port", str(decoder_port), *common,
             "--threads", str(decoder_threads)], logs["decoder"], env)
        deadline = time.monotonic() + READY_TIMEOUT_S
        for name, port in (("planner", planner_port), ("decoder", decoder_port)):
            wait_until_serving(name, f"127.0.0.1:{port}", processes[name], logs[name], deadline)
        yield Stack(f"127.0.0.1:{decoder_port}", client, processes, logs)
    finally:
        for name in ("decoder", "planner", "redis"):
            if name in processes:
                stop_process(processes[name])
        if client is not None:
            client.close()


def process_peak_rss_mib(pid: int) -> float | None:
    """A running process's peak resident set size (VmHWM), Linux only."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def log_problems(path: Path) -> dict:
    """Count, and the first lines, of warning/error records (JSON lines) and tracebacks in a service log."""
    problems = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
            bad = isinstance(record, dict) and record.get("level") in ("warning", "error", "critical", "exception")
        except ValueError:
            bad = "Traceback" in line or "Error" in line
        if bad:
            problems.append(line)
    return {"count": len(problems), "first": problems[:LOG_PROBLEMS_KEPT]}


# ---------------------------------------------------------------------- runners
def grpc_runner(client: ClaspClient, options: dict) -> Runner:
    """Stream one request to the decoder (a fresh session each time) and time it client-side."""
    speculative = options["mode"] != "ar"

    def run(prompt: str, max_new_tokens: int) -> dict:
        request = build_request(prompt, session_id=f"bench-{uuid.uuid4().hex[:16]}", max_new_tokens=max_new_tokens,
                                **options)
        collector = Collector()  # the SDK's own accumulation, as ClaspClient.generate uses it
        ttft = None
        t0 = time.perf_counter()
        for message in client.stream(request, timeout_s=REQUEST_TIMEOUT_S):
            if ttft is None and (message.token_ids or message.text):
                ttft = time.perf_counter() - t0
            collector.add(message)
        seconds = time.perf_counter() - t0
        if collector.final is None:
            raise RuntimeError("the stream ended without a final message")
        done = collector.completion()
        s = done.stats
        fields = dict(token_ids=done.token_ids, seconds=seconds, ttft_s=ttft, finish_reason=done.finish_reason,
                      num_prompt_tokens=done.num_prompt_tokens, plan_versions=s["plan_versions"])
        if speculative:
            fields.update(mean_accepted_length=s["mean_accepted_length"], num_rounds=s["num_rounds"],
                          mean_skipped_layers=s["mean_skipped_layers"],
                          num_draft_tokens=s["num_draft_tokens"], num_accepted_tokens=s["num_accepted_tokens"],
                          plan_io_seconds=s["plan_io_seconds"], decode_seconds=s["decode_seconds"])
        return fields

    return run


def in_process_runner(engine: Engine, mode: str) -> Runner:
    """bench_engine's runner for one mode (server-default config), on prompt text."""
    run_ids = engine_runner(engine, engine.config, mode)

    def run(prompt: str, max_new_tokens: int) -> dict:
        prompt_ids = engine.encode(prompt)
        fields = {k: v for k, v in run_ids(prompt_ids, max_new_tokens).items() if k in ROW_FIELDS}
        return {**fields, "num_prompt_tokens": len(prompt_ids)}

    return run


def build_runners(methods: list[str], client: ClaspClient | None, engine: Engine | None) -> dict[str, Runner]:
    return {m: grpc_runner(client, GRPC_OPTIONS[m]) if m in GRPC_OPTIONS else in_process_runner(engine, ENGINE_MODES[m])
            for m in methods}


def warm_up(runners: dict[str, Runner], settle: Callable[[], None]) -> dict[str, str]:
    """Run each method once on a short prompt; returns {method: error} for those that raised."""
    broken = {}
    for method, run in runners.items():
        settle()
        try:
            run(WARMUP_PROMPT, WARMUP_TOKENS)
        except Exception as e:
            broken[method] = f"{type(e).__name__}: {e}"
            print(f"warm-up {method}: FAILED {broken[method]}", file=sys.stderr, flush=True)
    return broken


def run_method(q: Question, method: str, run: Runner, max_new_tokens: int) -> ServiceRow:
    row = ServiceRow(q.question_id, q.category, method)
    try:
        for key, value in run(q.prompt, max_new_tokens).items():
            setattr(row, key, value)
        row.num_tokens = len(row.token_ids)
        row.tokens_per_s = row.num_tokens / row.seconds if row.seconds > 0 else 0.0
    except Exception as e:
        row.error = f"{type(e).__name__}: {e}"
    return row


def progress_line(row: ServiceRow) -> str:
    if row.error:
        status = row.error
    else:
        status = f"{row.num_tokens:4d} tok {row.seconds:6.2f} s {row.tokens_per_s:6.1f} tok/s"
        if row.ttft_s is not None:
            status += f"  TTFT {row.ttft_s * 1000:5.0f} ms"
        if row.plan_versions:
            status += f"  plans {len(row.plan_versions)}"
        if row.matches_grpc_ar is False:
            status += "  MISMATCH vs grpc_ar"
    return f"q{row.question_id:<4d} {row.category:<14s} {row.method:<14s} {status}"


def run_question(q: Question, runners: dict[str, Runner], broken: dict[str, str], max_new_tokens: int,
                 settle: Callable[[], None]) -> list[ServiceRow]:
    """Every method on one question, one at a time, each starting with nothing in flight."""
    rows = []
    baseline_ids = None
    for method, run in runners.items():
        if method in broken:
            row = ServiceRow(q.question_id, q.category, method, error=broken[method])
        else:
            settle()
            row = run_method(q, method, run, max_new_tokens)
        if method == BASELINE and row.error is None:
            baseline_ids = row.token_ids
        elif baseline_ids is not None and row.error is None:
            row.matches_grpc_ar = row.token_ids == baseline_ids
        rows.append(row)
        print(progress_line(row), file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------------- aggregation
def aggregate(rows: list[ServiceRow]) -> dict:
    """One method's rows -> totals; tokens/s is total tokens / total seconds."""
    ok = [r for r in rows if r.error is None]
    seconds = sum(r.seconds for r in ok)
    tokens = sum(r.num_tokens for r in ok)
    out = {"num_questions": len(ok), "num_errors": len(rows) - len(ok), "tokens": tokens, "seconds": seconds,
           "tokens_per_s": tokens / seconds if seconds > 0 else None}
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    out["ttft_ms"] = mean(ttfts) * 1000 if ttfts else None
    compared = [r for r in ok if r.matches_grpc_ar is not None]
    out["mismatches_vs_grpc_ar"] = sum(not r.matches_grpc_ar for r in compared) if compared else None
    spec = [r for r in ok if r.num_rounds]
    if spec:
        rounds = sum(r.num_rounds for r in spec)
        out["mean_accepted_length"] = (sum(r.num_accepted_tokens for r in spec) + rounds) / rounds
        drafted = sum(r.num_draft_tokens for r in spec)
        out["mean_skipped_layers"] = (sum((r.mean_skipped_layers or 0.0) * r.num_draft_tokens for r in spec) / drafted
                                      if drafted else 0.0)
    planned = [r for r in ok if r.plan_versions is not None]
    if planned:
        out["plan_versions"] = sum(len(r.plan_versions) for r in planned)
    timed = [r for r in ok if r.decode_seconds]
    if timed:
        out["plan_io_share"] = sum(r.plan_io_seconds or 0.0 for r in timed) / sum(r.decode_seconds for r in timed)
    errors = [r.error for r in rows if r.error]
    if errors:
        out["error"] = errors[0]
    return out


def summarize_rows(rows: list[ServiceRow], methods: list[str]) -> dict:
    """{category or "overall": {method: aggregate, ..., "ratios": {name: tokens/s ratio}}}."""
    tables = {}
    for name, group in group_by_category(rows).items():
        table = {m: aggregate([r for r in group if r.method == m]) for m in methods}
        table["ratios"] = {}
        for ratio, (num, den) in RATIOS.items():
            a, b = table.get(num, {}).get("tokens_per_s"), table.get(den, {}).get("tokens_per_s")
            table["ratios"][ratio] = a / b if a and b else None
        tables[name] = table
    return tables


# ---------------------------------------------------------------------- output
def render_markdown(summary: dict) -> str:
    """The results table (one row per category plus overall) as markdown, from a summary dict."""
    meta, tables = summary["meta"], summary["tables"]
    m, threads = meta["machine"], meta["threads"]
    lines = [f"Service benchmark (gRPC decoder + planner over Redis, vs the in-process engine): {m['processor']} "
             f"({m['cpu_count']} CPUs; torch threads: decoder {threads['decoder']}, planner {threads['planner']}, "
             f"in-process engine {threads['engine']}; {m['device']}), model {meta['model']}, {meta['dtype']}, "
             f"commit {meta['git_commit'] or 'unknown'}, max new tokens {meta['max_new_tokens']}, questions per "
             f"category: {meta['questions_per_category']}, greedy, {meta['timestamp']}.", ""]
    header = ["Category", "grpc clasp tok/s", "grpc ar tok/s", "engine clasp tok/s", "engine ar tok/s",
              "clasp/ar (grpc)", "grpc/engine (clasp)", "grpc/engine (ar)", "mean accepted length (clasp / dp)",
              "layers skipped per draft token (clasp / dp)",
              "TTFT clasp ms", f"plan versions (dp variant, M={DP_SKIP_LAYERS})"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for name, table in tables.items():
        clasp, dp, ratios = table.get("grpc_clasp", {}), table.get("grpc_clasp_dp", {}), table["ratios"]
        cells = [name] + [tokens_per_s_cell(table.get(k)) for k in
                          ("grpc_clasp", "grpc_ar", "engine_clasp", "engine_ar")] + [
            fmt(ratios["clasp_vs_ar_grpc"], ".2f", "x"), fmt(ratios["grpc_vs_engine_clasp"], ".2f", "x"),
            fmt(ratios["grpc_vs_engine_ar"], ".2f", "x"),
            f"{fmt(clasp.get('mean_accepted_length'), '.2f')} / {fmt(dp.get('mean_accepted_length'), '.2f')}",
            f"{fmt(clasp.get('mean_skipped_layers'), '.1f')} / {fmt(dp.get('mean_skipped_layers'), '.1f')}",
            fmt(clasp.get("ttft_ms"), ".0f"), fmt(dp.get("plan_versions"), "d")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", _notes(summary)]
    return "\n".join(lines) + "\n"


def _notes(summary: dict) -> str:
    meta, overall = summary["meta"], summary["tables"]["overall"]
    methods = [m for m in meta["methods"] if m in overall]
    notes = []
    same = [f"{m} {overall[m]['num_questions'] - overall[m]['mismatches_vs_grpc_ar']}/{overall[m]['num_questions']}"
            for m in methods if overall[m].get("mismatches_vs_grpc_ar") is not None]
    if same:
        notes.append("questions whose token ids equal grpc_ar's: " + ", ".join(same))
    dp = overall.get("grpc_clasp_dp")
    if dp and dp.get("tokens_per_s"):
        notes.append(f"grpc_clasp_dp (M={DP_SKIP_LAYERS} with adaptive M, DP via the planner): {dp['tokens_per_s']:.1f} tok/s, "
                     f"{fmt(overall['ratios']['clasp_dp_vs_ar_grpc'], '.2f', 'x')} vs grpc_ar, mean accepted length "
                     f"{fmt(dp.get('mean_accepted_length'), '.2f')}, {fmt(dp.get('plan_versions'), 'd')} plan "
                     f"versions adopted over {dp['num_questions']} questions; the decoder's time on plan "
                     f"requests and adoption: {fmt(dp.get('plan_io_share'), '.3%')} of its decode time")
    ttft = [f"{m} {overall[m]['ttft_ms']:.0f}" for m in methods if overall[m].get("ttft_ms") is not None]
    if ttft:
        notes.append("mean time to first token, ms (client-side, prefill included): " + ", ".join(ttft))
    engine = overall["ratios"].get("clasp_vs_ar_engine")
    if engine is not None:
        notes.append(f"in-process engine clasp/ar: {engine:.2f}x")
    cfg, num_skip = meta["server_config"], meta["default_num_skip_layers"]
    notes.append(f"server defaults: M={fmt(num_skip, 'd')} of {fmt(meta['num_layers'], 'd')} layers, "
                 f"K={cfg['max_draft_length']}, exit threshold {cfg['draft_exit_threshold']}, replan every "
                 f"{cfg['replan_interval']} rounds, draft dtype {cfg['draft_dtype'] or 'shared weights'}; "
                 "a fresh session per gRPC request")
    for m in methods:
        if overall[m].get("error"):
            notes.append(f"error {m} ({overall[m]['num_errors']} questions): {overall[m]['error']}")
    services = meta.get("services")
    if services:
        problems = services["log_problems"]
        notes.append("service log warnings/errors: " + ", ".join(f"{n} {p['count']}" for n, p in problems.items()))
        rss = ", ".join(f"{n} {fmt(v, '.0f')}" for n, v in services["peak_rss_mib"].items())
        notes.append(f"peak RSS MiB: driver {meta['peak_rss_mib']:.0f}, {rss}; wall time {meta['wall_seconds']:.0f} s")
    else:
        notes.append(f"peak RSS MiB: driver {meta['peak_rss_mib']:.0f}; wall time {meta['wall_seconds']:.0f} s")
    return "\n".join(f"- {n}" for n in notes)


# ---------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark CLaSp through the gRPC decoder and planner (real redis-server, both services on "
                    "loopback) against the in-process engine, on bench_engine's Spec-Bench sample (first turn only, "
                    "greedy, per category).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Quick default: --per-category {QUICK_PER_CATEGORY} --max-new-tokens {QUICK_MAX_NEW_TOKENS}, all five "
               "methods (6 questions x 5 methods). From measured per-token costs on a 2-core CPU (~65 ms/token for "
               "ar, ~35 ms for clasp) that is ~25 s per question plus ~30 s for starting the stack, loading the "
               "model and warming up: about 3-4 minutes, less when answers end at EOS, more when the CPU is shared. "
               "--full runs all 480 questions (hours on a CPU). Results: benchmarks/results/service-<tag>.{json,md} "
               "and service-latest.md.")
    add_question_args(parser, METHODS, METHODS, "all", "grpc_ar")
    g = parser.add_argument_group("services")
    g.add_argument("--threads-decoder", type=int, default=2,
                   help="torch threads of the decoder, and of the in-process engine in this driver (default: 2)")
    g.add_argument("--threads-planner", type=int, default=1, help="torch threads of the planner (default: 1)")
    g = parser.add_argument_group("output")
    g.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="results directory (default: benchmarks/results); service-latest.md there is overwritten")
    g.add_argument("--tag", default=None, help="results file name: service-<tag>.json/.md (default: a timestamp)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    methods = parse_methods(args.methods, METHODS)
    questions = load_questions(args.questions, None if args.full else args.per_category)
    transformers.utils.logging.set_verbosity_error()  # keep stderr to the progress lines
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads_decoder)  # the engine gets what the decoder gets
    started = time.perf_counter()
    timestamp = datetime.datetime.now()
    device = resolve_device("auto")  # what the services and Engine.load(None) pick
    print(f"{len(questions)} questions x {len(methods)} methods ({','.join(methods)}), max {args.max_new_tokens} new "
          f"tokens; threads: decoder {args.threads_decoder}, planner {args.threads_planner}, engine "
          f"{torch.get_num_threads()}", file=sys.stderr, flush=True)

    with contextlib.ExitStack() as resources:
        stack, client, engine = None, None, None
        if any(m in GRPC_OPTIONS for m in methods):
            log_dir = Path(resources.enter_context(tempfile.TemporaryDirectory(prefix="clasp-bench-service-")))
            stack = resources.enter_context(service_stack(log_dir, args.threads_decoder, args.threads_planner))
            client = resources.enter_context(ClaspClient(stack.target))
            print(f"services ready after {time.perf_counter() - started:.1f} s: decoder {stack.target}",
                  file=sys.stderr, flush=True)
        if any(m in ENGINE_MODES for m in methods):
            engine = Engine.load(None)  # after the services: loading here does not slow their start
        runners = build_runners(methods, client, engine)
        settle = stack.wait_idle if stack else (lambda: None)
        broken = warm_up(runners, settle)
        rows = []
        for q in questions:
            rows += run_question(q, runners, broken, args.max_new_tokens, settle)
        services = stack.report() if stack else None

    config = engine.config if engine else ClaspConfig()
    num_layers = engine.runner.spec.num_layers if engine else None
    meta = {"timestamp": timestamp.isoformat(timespec="seconds"), "machine": machine_info(device),
            "model": model_identity(None), "dtype": str(resolve_dtype("auto", device)).removeprefix("torch."),
            "git_commit": git_commit(), "methods": methods, "max_new_tokens": args.max_new_tokens,
            "questions_per_category": "all" if args.full else args.per_category, "num_questions": len(questions),
            "questions_file": str(args.questions),
            "threads": {"decoder": args.threads_decoder, "planner": args.threads_planner,
                        "engine": torch.get_num_threads()},
            "server_config": dataclasses.asdict(config), "num_layers": num_layers,
            "default_num_skip_layers": (config.skip_count(num_layers, engine.runner.draft_has_copy)
                                        if engine else None),
            "dp_num_skip_layers": DP_SKIP_LAYERS, "grpc_options": {m: GRPC_OPTIONS[m] for m in methods
                                                                   if m in GRPC_OPTIONS},
            "session_policy": "a fresh session_id per gRPC request", "warmup_errors": broken,
            "peak_rss_mib": peak_rss_mib(), "services": services, "wall_seconds": time.perf_counter() - started}
    row_dicts = [{k: v for k, v in dataclasses.asdict(r).items() if k != "token_ids"} for r in rows]
    summary = {"meta": meta, "tables": summarize_rows(rows, methods), "rows": row_dicts}
    path = write_results(summary, args.out, args.tag or timestamp.strftime("%Y%m%d-%H%M%S"), prefix="service", baseline="grpc_ar",
                         render=render_markdown)
    print(render_markdown(summary), file=sys.stderr)
    print(f"wrote {path} and the .md and .png beside it", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
