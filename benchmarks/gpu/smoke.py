"""GPU smoke figures, section by section, each written to <out>/<report> as soon as it finishes
(so a run stopped at its time limit keeps what it measured).

Sections:
  env       torch, CUDA, the device, its free memory
  backend   the embedded model in bf16 through the CUDA backend: load time, what it chose and
            measured (graph check, fused norm, draft copy candidates, costs of 1, 2, K+1 rows)
  decode    ms per token on a few prompts: ar eager (no graphs), ar with graphs, clasp (defaults)
            and clasp on shared weights with M = L/2, with graphs; bf16 token equality with ar and,
            where they differ, the full model's logit gap at the first divergence
  fp32      the same model in fp32: clasp == ar token for token (the exactness check on a GPU)
  dp        the DP's ms per plan on the embedded model (bf16) at two context lengths
  llama8b   a random-weight Llama-3-8B-shaped model (LlamaConfig with 8B shapes, bf16, on the
            GPU): load memory, step ms eager and with graphs, verify ms for 2/5/9 rows, draft ms
            per candidate copy and skip count, DP ms per plan, peak memory

--rehearse-cpu runs every section on the CPU with a tiny 8B stand-in and short outputs (static
steps eager, not captured), to check the script end to end before device time is spent.

Usage: PYTHONPATH=. python benchmarks/gpu/smoke.py --out DIR [--rehearse-cpu] [--questions FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from clasp.backends.base import LoadOptions  # noqa: E402
from clasp.backends.cuda import CudaBackend, time_forward  # noqa: E402
from clasp.config import ClaspConfig, SamplingParams  # noqa: E402
from clasp.decoding import prefill  # noqa: E402
from clasp.engine import Engine  # noqa: E402
from clasp.model_runner import ModelRunner  # noqa: E402
from clasp.planner import plan_layers  # noqa: E402
from clasp.static_step import StaticSteps  # noqa: E402

PROMPTS = ["Why is the sky blue? Answer in two sentences.", "Write a short poem about the sea.",
           "Translate to French: The weather is nice today and I want to go for a walk.",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]
LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                rms_norm_eps=1e-5)
TINY_8B = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=2, max_position_embeddings=1024, rope_theta=500000.0, rms_norm_eps=1e-5)


class Report:
    """smoke.json, rewritten after every section."""

    def __init__(self, path: Path) -> None:
        self.path, self.data = path, {"sections_done": [], "sections_failed": {}}

    def section(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        print(f"== {name}", file=sys.stderr, flush=True)
        try:
            self.data[name] = fn()
            self.data["sections_done"].append(name)
        except Exception as e:  # a failed section is a finding: record it and go on
            traceback.print_exc()
            self.data["sections_failed"][name] = f"{type(e).__name__}: {e}"
        self.data.setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0, 2)
        self.path.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        print(json.dumps({name: self.data.get(name, self.data["sections_failed"].get(name))}, default=str)[:2000],
              file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    return {"allocated_gib": round(torch.cuda.memory_allocated(device) / 2**30, 3),
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
            "free_gib": round(free / 2**30, 2), "total_gib": round(total / 2**30, 2)}


def env(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device)}
    if device.type == "cuda":
        info.update(name=torch.cuda.get_device_name(device), capability=torch.cuda.get_device_capability(device),
                    **memory(device))
    return info


def timed_generate(engine: Engine, ids: list[int], config: ClaspConfig, max_new: int) -> tuple[list[int], float, dict]:
    sync(engine.runner.device)
    t0 = time.perf_counter()
    result = engine.generate(ids, SamplingParams(max_new_tokens=max_new), config)
    sync(engine.runner.device)
    seconds = time.perf_counter() - t0
    return result.token_ids, seconds, result.stats.to_dict()


def logit_gap(engine: Engine, ids: list[int], expected: list[int], got: list[int]) -> dict | None:
    """Where `got` first differs from `expected`: the full model's logit of each token there."""
    i = next((k for k, (a, b) in enumerate(zip(expected, got)) if a != b), None)
    if i is None:
        return None
    runner = engine.runner
    context = torch.tensor(ids + expected[:i], device=runner.device)
    logits = runner.forward(context, runner.new_cache(len(context)), 0, last_only=True)[0]
    return {"index": i, "expected_logit": float(logits[expected[i]]), "got_logit": float(logits[got[i]]),
            "gap": float(logits[expected[i]] - logits[got[i]])}


@contextlib.contextmanager
def without_static_steps(runner: ModelRunner):
    """Every pass eager (no CUDA graphs) inside the block."""
    steps, runner.static_steps = runner.static_steps, None
    try:
        yield
    finally:
        runner.static_steps = steps


def decode_section(engine: Engine, prompts: list[str], max_new: int, rehearse: bool) -> dict:
    runner = engine.runner
    if rehearse and runner.static_steps is None:  # CPU: exercise the static path eagerly
        runner.static_steps = StaticSteps(runner, capture=False)
    num_layers = runner.spec.num_layers
    methods = {"clasp": ClaspConfig(),
               "clasp_shared": ClaspConfig(draft_dtype=None, num_skip_layers=num_layers // 2)}
    rows = []
    warm = engine.encode(prompts[0])  # first calls (cuBLAS heuristics, graph captures) out of the timings
    with without_static_steps(runner):
        engine.generate(warm, SamplingParams(max_new_tokens=8), ClaspConfig(mode="ar"))
    for config in [ClaspConfig(mode="ar"), *methods.values()]:
        engine.generate(warm, SamplingParams(max_new_tokens=8), config)
    for prompt in prompts:
        ids = engine.encode(prompt)
        row = {"prompt": prompt[:40], "prompt_tokens": len(ids)}
        with without_static_steps(runner):
            eager_ids, eager_s, _ = timed_generate(engine, ids, ClaspConfig(mode="ar"), max_new)
        ar_ids, ar_s, _ = timed_generate(engine, ids, ClaspConfig(mode="ar"), max_new)
        row["ar_eager_ms_per_token"] = 1e3 * eager_s / len(eager_ids)
        row["ar_graphs_ms_per_token"] = 1e3 * ar_s / len(ar_ids)
        row["ar_graphs_equals_eager"] = ar_ids == eager_ids
        for name, config in methods.items():
            got, seconds, stats = timed_generate(engine, ids, config, max_new)
            row[f"{name}_ms_per_token"] = 1e3 * seconds / len(got)
            row[f"{name}_speedup_vs_ar_graphs"] = (len(got) / seconds) / (len(ar_ids) / ar_s)
            row[f"{name}_equals_ar"] = got == ar_ids
            row[f"{name}_mean_accepted_length"] = stats.get("mean_accepted_length")
            if got != ar_ids:
                row[f"{name}_first_divergence"] = logit_gap(engine, ids, ar_ids, got)
        rows.append(row)

    def mean(key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return statistics.mean(values) if values else None

    summary = {k: mean(k) for k in rows[0] if k.endswith(("ms_per_token", "speedup_vs_ar_graphs"))}
    summary["ar_graphs_speedup_vs_eager"] = mean("ar_eager_ms_per_token") / mean("ar_graphs_ms_per_token")
    summary.update({f"{name}_share_equal": sum(r[f"{name}_equals_ar"] for r in rows) / len(rows) for name in methods})
    return {"max_new_tokens": max_new, "summary": summary, "rows": rows,
            "static_steps": runner.static_steps.describe() if runner.static_steps else None,
            "memory": memory(runner.device)}


def fp32_section(device: str, prompts: list[str], max_new: int, rehearse: bool) -> dict:
    engine = Engine.load(None, ClaspConfig(), device=device, dtype="float32")
    runner = engine.runner
    if rehearse and runner.static_steps is None:
        runner.static_steps = StaticSteps(runner, capture=False)
    rows = []
    for prompt in prompts:
        ids = engine.encode(prompt)
        ar_ids, ar_s, _ = timed_generate(engine, ids, ClaspConfig(mode="ar"), max_new)
        row = {"prompt": prompt[:40], "ar_ms_per_token": 1e3 * ar_s / len(ar_ids)}
        for name, config in {"clasp": ClaspConfig(), "clasp_shared": ClaspConfig(
                draft_dtype=None, num_skip_layers=runner.spec.num_layers // 2)}.items():
            got, seconds, _ = timed_generate(engine, ids, config, max_new)
            row[f"{name}_equals_ar"], row[f"{name}_ms_per_token"] = got == ar_ids, 1e3 * seconds / len(got)
        rows.append(row)
    backend = runner.backend.describe() if runner.backend else None
    del engine, runner
    gc.collect()
    return {"all_equal": all(r["clasp_equals_ar"] and r["clasp_shared_equals_ar"] for r in rows), "rows": rows,
            "backend": backend}


def context_ids(engine: Engine, questions: Path | None, length: int) -> list[int]:
    ids: list[int] = []
    if questions is not None and questions.exists():
        for line in questions.read_text(encoding="utf-8").splitlines():
            ids += engine.encode(json.loads(line)["turns"][0], chat=False)
            if len(ids) >= length:
                return ids[:length]
    while len(ids) < length:
        ids += engine.encode(PROMPTS[len(ids) % len(PROMPTS)], chat=False)
    return ids[:length]


def time_plans(runner: ModelRunner, ids: list[int], max_skip: int, repeats: int = 3) -> float:
    """Median ms of plan_layers for the last of ids (a real context)."""
    cache = runner.new_cache(len(ids) + 1)
    with torch.inference_mode():
        _, hidden = prefill(runner, cache, torch.tensor(ids, device=runner.device), collect_hidden=True)
        cache.truncate(len(ids) - 1)
        times = [plan_layers(runner, cache, hidden, len(ids) - 1, max_skip)[0].seconds for _ in range(repeats + 1)]
    return 1e3 * statistics.median(times[1:])


def dp_section(engine: Engine, questions: Path | None, contexts: list[int]) -> dict:
    runner = engine.runner
    m = runner.spec.num_layers // 2
    return {"max_skip": m, "ms_per_plan": {str(n): time_plans(runner, context_ids(engine, questions, n), m)
                                           for n in contexts}}


def random_llama(shape: dict, device: torch.device, dtype: torch.dtype) -> tuple[ModelRunner, float]:
    """A LlamaForCausalLM with `shape`'s sizes and random weights, made on the device (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.perf_counter()
    torch.manual_seed(0)
    config = LlamaConfig(**shape)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    runner = ModelRunner.from_hf(model, release=True)
    del model
    gc.collect()
    sync(device)
    return runner, time.perf_counter() - t0


def llama8b_section(report: Report, device: torch.device, rehearse: bool) -> dict:
    """Cost figures on the 8B-shaped model; partial figures are written as they come."""
    shape = TINY_8B if rehearse else LLAMA_8B
    dtype = torch.float32 if rehearse else torch.bfloat16
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out: dict = {"shape": shape, "dtype": str(dtype)}
    report.data["llama8b_partial"] = out
    runner, seconds = random_llama(shape, device, dtype)
    out.update(build_seconds=round(seconds, 1), weights_gib=round(runner.weights.nbytes() / 2**30, 3),
               memory_after_build=memory(device))
    report.path.write_text(json.dumps(report.data, indent=1, default=str) + "\n")
    backend = CudaBackend()
    t0 = time.perf_counter()
    backend.prepare(runner, LoadOptions(torch.float16, "auto"))
    runner.backend = backend
    out.update(prepare_seconds=round(time.perf_counter() - t0, 1), backend=backend.describe(),
               draft_copy_gib=round(runner.draft_weights.nbytes() / 2**30, 3) if runner.draft_has_copy else 0.0,
               memory_after_prepare=memory(device))
    report.path.write_text(json.dumps(report.data, indent=1, default=str) + "\n")
    contexts = (64,) if rehearse else (512, 2048)
    timings: dict = {}
    out["ms"] = timings
    for context in contexts:
        t = timings[str(context)] = {}
        with without_static_steps(runner):
            t["step_eager"] = time_forward(runner, 1, draft=False, context=context, repeats=10)
        for rows in (1, 2, 5, 9):
            t[f"rows_{rows}"] = time_forward(runner, rows, draft=False, context=context)
        half = frozenset(range(runner.spec.num_layers // 4, runner.spec.num_layers // 4 + runner.spec.num_layers // 2))
        t["draft_m0"] = time_forward(runner, 1, draft=True, context=context)
        t[f"draft_m{len(half)}"] = time_forward(runner, 1, draft=True, skip_set=half, context=context)
        t[f"shared_m{len(half)}"] = time_forward(runner, 1, draft=False, skip_set=half, context=context)
        report.path.write_text(json.dumps(report.data, indent=1, default=str) + "\n")
    # The DP on random tokens (its cost depends on shapes, not values).
    for context in contexts:
        ids = torch.randint(0, runner.spec.vocab_size, (context,), generator=torch.Generator().manual_seed(4)).tolist()
        timings[str(context)]["dp_ms_per_plan_m16"] = time_plans(runner, ids, min(16, runner.spec.num_layers - 1), 2)
        report.path.write_text(json.dumps(report.data, indent=1, default=str) + "\n")
    kv = runner.new_cache(1024)
    out["kv_cache_gib_per_1k_positions"] = round(kv.nbytes() / 2**30, 4)
    out["memory_end"] = memory(device)
    del kv, runner, backend
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    report.data.pop("llama8b_partial", None)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--report", default="smoke.json", help="file name of the report in --out")
    parser.add_argument("--rehearse-cpu", action="store_true", help="every section on the CPU, tiny and short")
    parser.add_argument("--questions", type=Path, default=None, help="Spec-Bench question.jsonl (DP contexts)")
    parser.add_argument("--sections", default="env,backend,decode,fp32,dp,llama8b")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    args = parser.parse_args(argv)
    rehearse = args.rehearse_cpu
    if not rehearse and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --rehearse-cpu to rehearse on the CPU")
    device = torch.device("cpu" if rehearse else "cuda")
    max_new = args.max_new_tokens or (12 if rehearse else 96)
    prompts = PROMPTS[:1] if rehearse else PROMPTS
    sections = args.sections.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    report = Report(args.out / args.report)
    report.data["rehearsal"] = rehearse
    engine = None

    def backend():
        nonlocal engine
        t0 = time.perf_counter()
        engine = Engine.load(None, ClaspConfig(), device=str(device), dtype="float32" if rehearse else "bfloat16")
        runner = engine.runner
        return {"load_seconds": round(time.perf_counter() - t0, 1),
                "backend": runner.backend.describe() if runner.backend else None,
                "draft_has_copy": runner.draft_has_copy, "memory": memory(device)}

    if "env" in sections:
        report.section("env", lambda: env(device))
    if "backend" in sections or "decode" in sections or "dp" in sections:
        report.section("backend", backend)
    if "decode" in sections and engine is not None:
        report.section("decode", lambda: decode_section(engine, prompts, max_new, rehearse))
    if "dp" in sections and engine is not None:
        report.section("dp", lambda: dp_section(engine, args.questions, [64] if rehearse else [512, 2048]))
    engine = None
    gc.collect()
    if "fp32" in sections:
        report.section("fp32", lambda: fp32_section(str(device), prompts[:2] if not rehearse else prompts,
                                                    max_new, rehearse))
    if "llama8b" in sections:
        report.section("llama8b", lambda: llama8b_section(report, device, rehearse))
    print(json.dumps({k: report.data.get(k) for k in ("sections_done", "sections_failed", "section_seconds")}),
          flush=True)
    return 0 if not report.data["sections_failed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
