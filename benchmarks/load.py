"""Load test (`make load`): bounded, loopback, stops by itself.

Starts its own redis-server, planner and decoder (bench_service's stack, server defaults), then
N concurrent streaming clients share a fixed number of greedy requests over a few prompts, half
with the DP active (the planner at work). Every output is checked token for token against the
in-process engine's plain greedy decoding. Reported: requests completed, errors by gRPC code,
p50/p95/p99 time to first token and time per output token (client side), exactness, RSS of
every process before and after, Redis keys and the plan-request stream's length. A soak of
short sessions then samples the decoder's and planner's RSS every --soak-every sessions: flat
after warm-up means no per-session leak.

Usage: PYTHONPATH=. python benchmarks/load.py [--clients 4] [--requests 24] [--soak 200]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import psutil

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.bench_service import service_stack  # noqa: E402
from clasp.config import ClaspConfig, SamplingParams  # noqa: E402
from clasp.engine import Engine  # noqa: E402
from clients.sdk import ClaspClient, build_request  # noqa: E402
from serving.plan_wire import PLAN_REQUEST_STREAM  # noqa: E402

PROMPTS = ["Explain in detail how a steam engine works.", "Name three rivers in Europe.",
           "Write a short poem about the sea.", "What is the capital of France? Answer briefly.",
           "List five prime numbers and explain why they are prime.", "Describe a sunrise."]
DP = dict(mode="clasp", num_skip_layers=6, replan_interval=2)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def rss_mib(processes: dict) -> dict[str, float]:
    out = {}
    for name, proc in processes.items():
        try:
            out[name] = round(psutil.Process(proc.pid).memory_info().rss / 2**20, 1)
        except psutil.Error:
            out[name] = None
    return out


def one_request(target: str, prompt: str, options: dict, max_new_tokens: int, session: str) -> dict:
    started = time.perf_counter()
    first = None
    tokens: list[int] = []
    try:
        with ClaspClient(target, retries=0) as client:
            for message in client.stream(build_request(prompt, session_id=session, max_new_tokens=max_new_tokens,
                                                       **options), timeout_s=600):
                if message.token_ids and first is None:
                    first = time.perf_counter() - started
                tokens.extend(message.token_ids)
        code = "OK"
    except grpc.RpcError as e:
        code = e.code().name
    total = time.perf_counter() - started
    return dict(prompt=prompt, code=code, tokens=tokens, ttft_s=first, seconds=total,
                tpot_s=(total - first) / (len(tokens) - 1) if first is not None and len(tokens) > 1 else None)


def run_phase(target: str, jobs: list[tuple], clients: int, deadline: float) -> list[dict]:
    results = []
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(one_request, target, *job) for job in jobs]
        for future in concurrent.futures.as_completed(futures, timeout=max(deadline - time.monotonic(), 1)):
            results.append(future.result())
    return results


def summarize(results: list[dict], references: dict[str, list[int]]) -> dict:
    codes: dict[str, int] = {}
    for r in results:
        codes[r["code"]] = codes.get(r["code"], 0) + 1
    ok = [r for r in results if r["code"] == "OK"]
    exact = sum(r["tokens"] == references[r["prompt"]][:len(r["tokens"])] and len(r["tokens"]) > 0 for r in ok)
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    tpot = [r["tpot_s"] for r in ok if r["tpot_s"] is not None]
    return {"requests": len(results), "completed": len(ok), "codes": codes, "exact": exact,
            "ttft_s": {f"p{q}": percentile(ttft, q) for q in (50, 95, 99)},
            "tpot_s": {f"p{q}": percentile(tpot, q) for q in (50, 95, 99)},
            "tokens": sum(len(r["tokens"]) for r in ok)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=4, help="concurrent streaming clients")
    p.add_argument("--requests", type=int, default=24, help="requests in the load phase")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--soak", type=int, default=200, help="short sessions in the soak phase (0: none)")
    p.add_argument("--soak-every", type=int, default=50, help="RSS sample every this many soak sessions")
    p.add_argument("--timeout-s", type=float, default=1800, help="the whole run stops by then")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args()
    deadline = time.monotonic() + args.timeout_s
    engine = Engine.load(None, ClaspConfig(mode="ar"), device="cpu", dtype="float32")
    references = {q: engine.generate(engine.encode(q), SamplingParams(max_new_tokens=args.max_new_tokens),
                                     ClaspConfig(mode="ar")).token_ids for q in PROMPTS}
    del engine
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()},
                    "date": datetime.datetime.now().isoformat(timespec="seconds")}
    with tempfile.TemporaryDirectory() as logs, service_stack(Path(logs), 1, 1) as stack:
        procs = stack.processes
        report["rss_mib_before"] = rss_mib(procs)
        jobs = [(PROMPTS[i % len(PROMPTS)], DP if i % 2 else {}, args.max_new_tokens, f"load-{i}")
                for i in range(args.requests)]
        started = time.perf_counter()
        results = run_phase(stack.target, jobs, args.clients, deadline)
        report["load"] = {**summarize(results, references), "seconds": round(time.perf_counter() - started, 2),
                          "clients": args.clients}
        report["rss_mib_after_load"] = rss_mib(procs)
        soak = []
        for start in range(0, args.soak, args.soak_every):
            n = min(args.soak_every, args.soak - start)
            jobs = [(PROMPTS[(start + i) % len(PROMPTS)], DP if i % 2 else {}, 8, f"soak-{uuid.uuid4().hex[:8]}")
                    for i in range(n)]
            phase = run_phase(stack.target, jobs, args.clients, deadline)
            soak.append({"sessions": start + n, "rss_mib": rss_mib(procs),
                         "errors": sum(r["code"] != "OK" for r in phase),
                         "exact": sum(r["tokens"] == references[r["prompt"]][:len(r["tokens"])] for r in phase)})
            print(f"soak {start + n}: {soak[-1]}", flush=True)
        report["soak"] = soak
        stack.wait_idle()
        report["rss_mib_after"] = rss_mib(procs)
        report["redis"] = {"keys": stack.redis.dbsize(), "plan_request_stream_length": stack.redis.xlen(PLAN_REQUEST_STREAM),
                           "used_memory_mib": round(stack.redis.info("memory")["used_memory"] / 2**20, 2)}
        report.update(stack.report())
    tag = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"load-{tag}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    load = report["load"]
    return 0 if load["completed"] == load["requests"] == load["exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
