"""Where a plain fp32 decode step's time goes: one token of the embedded model after a context
of --context tokens, split into the parts of the forward pass.

The step is re-run piece by piece with a timer between pieces: the same calls as
ModelRunner._token_layer and forward (clasp.model_runner's linear, rms_norm, rope, the same
attention call on the same KV cache), checked to give exactly the runner's logits. Parts: the
embedding row; per layer (summed over the layers) the input norm, the qkv product, rope, the KV
write, attention, the o product with its residual add, the post norm, the gate_up product, SiLU
times up, the down product with its residual add; then the final norm and the lm_head. Each
product is reported with the GB/s it streamed and its % of the bandwidth bound (a read of a
1 GiB buffer, measured in the same run); the whole step against the bound of reading every
weight once. Python and torch's per-call overhead is inside each part (the non-matrix parts
are almost nothing else); "unaccounted" is the runner's own step time minus the parts' sum.

Matrix variants, each a full step with the same other parts:
  engine       the weights the engine's ar uses for one row (runner.full_weights(1): oneDNN
               prepacked where calibrate_packed_rows chose it, else MKL, padded per shape)
  mkl          the plain matrices through linear() (MKL, the padded 2-row trick per shape)
  fp32-<isa>   clasp.cpu_draft.fp32_matrix in each instruction set this CPU runs (a copy of
               the weights in its blocked layout; not wired into the model: measured here only)
and, as a whole step only, cpu_draft.FusedFp32Step in each instruction set (the step in one C++
call over the same blocked copies: what is left once torch's per-op overhead is gone).
A torch.profiler table of the runner's step (ops by self time) is included for the op counts.

Results: benchmarks/results/profile-<tag>.{json,md} and profile-latest.md.
Usage: PYTHONPATH=. python benchmarks/profile_decode.py [--context 300] [--steps 30]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.report import write_report  # noqa: E402
from benchmarks.bench_engine import git_commit, machine_info, measure_bandwidth  # noqa: E402
from clasp import cpu_draft  # noqa: E402
from clasp.config import ClaspConfig  # noqa: E402
from clasp.engine import Engine  # noqa: E402
from clasp.matrices import linear, nbytes  # noqa: E402
from clasp.model_runner import MATRICES, Weights, rms_norm, rope  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results"
CONTEXT_TEXT = ("The history of astronomy is the story of people looking up and trying to explain what they saw: "
                "the motions of the sun, the moon, the planets and the stars, eclipses and comets. ")
PARTS = ("embedding", "input_norm", "qkv", "rope", "kv_write", "attention", "o", "post_norm", "gate_up",
         "silu_mul", "down", "final_norm", "lm_head")
MATRIX_PARTS = ("qkv", "o", "gate_up", "down", "lm_head")


class Timer:
    """Seconds per part, accumulated over one step's calls."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = defaultdict(float)
        self.last = time.perf_counter()

    def mark(self, part: str) -> None:
        now = time.perf_counter()
        self.parts[part] += now - self.last
        self.last = now


def timed_step(runner, weights: Weights, product, token_id: int, cache, position: int) -> tuple[torch.Tensor, dict]:
    """One token through the same calls as ModelRunner.forward's one-token path, timed per part,
    over `weights`' layers and norms; product(x, matrix_field, layer_weights) -> x @ W.T (+ bias),
    with layer_weights None for the lm_head."""
    s = runner.spec
    qk_width = (s.num_heads + s.num_kv_heads) * s.head_dim
    cos = runner._rope_cos[position:position + 1].view(1, -1)
    sin = runner._rope_sin[position:position + 1].view(1, -1)
    with torch.inference_mode():
        timer = Timer()
        x = F.embedding(torch.tensor([token_id]), runner.embed)
        timer.mark("embedding")
        for layer, lw in enumerate(weights.layers):
            h = rms_norm(x, lw.input_norm, s.rms_norm_eps)
            timer.mark("input_norm")
            qkv = product(h, "qkv", lw)[0]
            timer.mark("qkv")
            qk = rope(qkv[:qk_width].view(-1, s.head_dim), cos, sin)
            timer.mark("rope")
            keys, values = cache.keys[layer][0], cache.values[layer][0]
            keys[:, position] = qk[s.num_heads:]
            values[:, position] = qkv[qk_width:].view(-1, s.head_dim)
            timer.mark("kv_write")
            attn = F.scaled_dot_product_attention(qk[:s.num_heads].view(1, s.num_heads, 1, s.head_dim),
                                                  keys[None, :, :position + 1], values[None, :, :position + 1],
                                                  enable_gqa=True)
            timer.mark("attention")
            x = x + product(attn.view(1, -1), "o", lw)
            timer.mark("o")
            h = rms_norm(x, lw.post_norm, s.rms_norm_eps)
            timer.mark("post_norm")
            gate, up = product(h, "gate_up", lw).chunk(2, dim=-1)
            timer.mark("gate_up")
            act = F.silu(gate) * up
            timer.mark("silu_mul")
            x = x + product(act, "down", lw)
            timer.mark("down")
        h = rms_norm(x, weights.final_norm, s.rms_norm_eps)
        timer.mark("final_norm")
        logits = product(h, "lm_head", None).float()
        timer.mark("lm_head")
    cache.length = position + 1
    return logits, dict(timer.parts)


def torch_product(weights: Weights):
    """The runner's own products: linear() on `weights`' matrices (and head_logits for the lm_head)."""
    def product(x, name, lw):
        if lw is None:
            return _head_logits(x, weights.lm_head)
        return linear(x, getattr(lw, name), lw.qkv_bias if name == "qkv" else None)
    return product


def kernel_product(weights: Weights, isa: str):
    """The same products through cpu_draft.fp32_matrix copies of every matrix in `isa`."""
    mats = [{name: cpu_draft.fp32_matrix(getattr(lw, name), isa, lw.qkv_bias if name == "qkv" else None)
             for name in MATRICES} for lw in weights.layers]
    head = cpu_draft.fp32_matrix(weights.lm_head, isa)
    index = {id(lw): i for i, lw in enumerate(weights.layers)}

    def product(x, name, lw):
        if lw is None:
            return head(x)
        return mats[index[id(lw)]][name](x)
    return product


def profiler_table(runner, token_id: int, cache, position: int, steps: int = 5) -> list[dict]:
    """torch.profiler over `steps` runner steps: ops by self CPU time, per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            runner.forward(torch.tensor([token_id]), cache, position)
    rows = [{"op": e.key, "calls_per_step": e.count / steps, "self_ms_per_step": e.self_cpu_time_total / 1000 / steps}
            for e in prof.key_averages()]
    rows.sort(key=lambda r: -r["self_ms_per_step"])
    return rows[:20]


def _head_logits(x, head):
    return linear(x, head).float()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=300, help="tokens before the profiled one (default: 300)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant (default: 30)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all CPUs)")
    parser.add_argument("--variants", default=None, help="comma-separated subset of engine,mkl,fp32-<isa>")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (default: benchmarks/results)")
    parser.add_argument("--tag", default=None, help="results file name: profile-<tag>.{json,md} (default: a timestamp)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    timestamp, load = datetime.datetime.now(), os.getloadavg()
    engine = Engine.load(None, ClaspConfig(draft_dtype=None), device="cpu", dtype="float32")  # ar needs no draft
    runner = engine.runner
    ids = []
    while len(ids) < args.context:
        ids += engine.tokenizer(CONTEXT_TEXT)["input_ids"]
    ids = ids[:args.context]
    cache = runner.new_cache(args.context + 1)
    with torch.inference_mode():
        logits = runner.forward(torch.tensor(ids), cache, 0, last_only=True)
    token_id, position = int(logits[0].argmax()), args.context

    try:
        isas = cpu_draft.supported_fp32_isas()
    except RuntimeError as e:
        print(f"the fp32 kernel cannot be built here ({e})", file=sys.stderr)
        isas = []
    # {name: (weights whose layers and norms the step walks, product)}
    variants = {"engine": (runner.full_weights(1), torch_product(runner.full_weights(1))),
                "mkl": (runner.weights, torch_product(runner.weights))}
    if args.variants:
        wanted = set(args.variants.split(","))
        isas = [i for i in isas if f"fp32-{i}" in wanted]
        variants = {k: v for k, v in variants.items() if k in wanted}
    for isa in isas:
        variants[f"fp32-{isa}"] = (runner.weights, kernel_product(runner.weights, isa))
    fused = {f"fused-fp32-{isa}": cpu_draft.FusedFp32Step(runner.spec, runner.embed, runner.weights, isa)
             for isa in isas}

    def fused_step(step) -> torch.Tensor:
        logits = step.forward(token_id, cache, position, frozenset(), runner._rope_cos, runner._rope_sin)
        cache.length = position + 1
        return logits

    # The reference: the runner's own step, and the replica's logits against it.
    with torch.inference_mode():
        reference = runner.forward(torch.tensor([token_id]), cache, position)
    checks = {}
    for name, (weights, product) in variants.items():
        got, _ = timed_step(runner, weights, product, token_id, cache, position)
        err = float((got - reference).abs().max() / reference.abs().max())
        checks[name] = {"max_rel_error": err, "argmax_equal": int(got.argmax()) == int(reference.argmax()),
                        "exact": bool(torch.equal(got, reference))}
    for name, step in fused.items():
        got = fused_step(step)
        checks[name] = {"max_rel_error": float((got - reference).abs().max() / reference.abs().max()),
                        "argmax_equal": int(got.argmax()) == int(reference.argmax()),
                        "exact": bool(torch.equal(got, reference))}
    bandwidth_before = measure_bandwidth(torch.device("cpu"))

    runner_seconds, parts = [], {name: defaultdict(list) for name in variants}
    fused_seconds = {name: [] for name in fused}
    for _ in range(2):  # first-call costs
        for weights, product in variants.values():
            timed_step(runner, weights, product, token_id, cache, position)
        for step in fused.values():
            fused_step(step)
    for _ in range(args.steps):  # variants interleaved step by step: load drift hits all alike
        with torch.inference_mode():
            t0 = time.perf_counter()
            runner.forward(torch.tensor([token_id]), cache, position)
            runner_seconds.append(time.perf_counter() - t0)
        for name, (weights, product) in variants.items():
            _, step = timed_step(runner, weights, product, token_id, cache, position)
            for part, sec in step.items():
                parts[name][part].append(sec)
            parts[name]["total"].append(sum(step.values()))
        for name, step in fused.items():
            t0 = time.perf_counter()
            fused_step(step)
            fused_seconds[name].append(time.perf_counter() - t0)
    bandwidth = max(bandwidth_before, measure_bandwidth(torch.device("cpu")))
    table = profiler_table(runner, token_id, cache, position)

    w = runner.weights
    num_layers = len(w.layers)
    part_bytes = {name: nbytes(getattr(w.layers[0], name)) * num_layers for name in MATRICES}
    part_bytes["lm_head"] = nbytes(w.lm_head)
    norms = sum(nbytes(lw.input_norm) + nbytes(lw.post_norm) for lw in w.layers) + nbytes(w.final_norm)
    step_bytes = w.nbytes()
    results = {}
    for name, per_part in parts.items():
        entry = {}
        for part in PARTS + ("total",):
            ms = 1000 * statistics.median(per_part[part])
            e = {"ms": ms}
            if part in part_bytes:
                e["gb_per_s"] = part_bytes[part] / (ms / 1000) / 1e9
                e["of_bound"] = part_bytes[part] / (ms / 1000) / bandwidth
            entry[part] = e
        entry["total"]["of_bound"] = step_bytes / (entry["total"]["ms"] / 1000) / bandwidth
        matrices_ms = sum(entry[p]["ms"] for p in MATRIX_PARTS)
        entry["matrices"] = {"ms": matrices_ms, "gb_per_s": sum(part_bytes.values()) / (matrices_ms / 1000) / 1e9,
                             "of_bound": sum(part_bytes.values()) / (matrices_ms / 1000) / bandwidth}
        entry["other"] = {"ms": entry["total"]["ms"] - matrices_ms}
        results[name] = entry
    runner_ms = 1000 * statistics.median(runner_seconds)
    one_call = {}
    for name, secs in fused_seconds.items():
        ms = 1000 * statistics.median(secs)
        one_call[name] = {"ms": ms, "of_bound": step_bytes / (ms / 1000) / bandwidth}
    meta = {"timestamp": timestamp.isoformat(timespec="seconds"), "machine": machine_info(torch.device("cpu")),
            "model": engine.model_name, "dtype": "float32", "git_commit": git_commit(), "context": args.context,
            "steps": args.steps, "bandwidth_gb_per_s": bandwidth / 1e9, "bandwidth_before_gb_per_s": bandwidth_before / 1e9,
            "step_bytes": step_bytes, "matrix_bytes": part_bytes, "num_layers": num_layers, "norm_bytes": norms,
            "bound_ms": 1000 * step_bytes / bandwidth, "packed_min_rows": runner.packed_min_rows,
            "runner_step_ms": runner_ms, "runner_of_bound": step_bytes / (runner_ms / 1000) / bandwidth,
            "checks": checks, "load_average": list(load), "load_average_after": list(os.getloadavg())}
    summary = {"meta": meta, "variants": results, "one_call": one_call, "profiler": table}
    markdown = render_markdown(summary)
    path = write_report(summary, args.out, "profile", args.tag or timestamp.strftime("%Y%m%d-%H%M%S"), markdown)
    print(markdown)
    print(f"wrote {path} and the .md beside it", file=sys.stderr)
    return 0


def render_markdown(summary: dict) -> str:
    meta, variants = summary["meta"], summary["variants"]
    m = meta["machine"]
    names = list(variants)
    flags = " ".join(f for f in m["cpu_flags"] if f.startswith(("avx2", "avx512", "fma", "avx_vnni", "amx")))
    lines = [f"Plain fp32 decode step, profiled: {m['processor']} ({m['cpu_count']} CPUs, {m['torch_threads']} torch "
             f"threads; flags {flags}), model {meta['model']}, one token after {meta['context']} tokens, median of "
             f"{meta['steps']} steps, commit {meta['git_commit'] or 'unknown'}, {meta['timestamp']}, load average "
             f"{meta['load_average'][0]:.2f} before / {meta['load_average_after'][0]:.2f} after.", "",
             f"Bound: {meta['step_bytes'] / 2**20:.0f} MiB of weights per step at {meta['bandwidth_gb_per_s']:.1f} GB/s "
             f"(a 1 GiB read) = {meta['bound_ms']:.1f} ms. The runner's own step (ModelRunner.forward, no timers): "
             f"{meta['runner_step_ms']:.1f} ms, {meta['runner_of_bound']:.0%} of the bound (one-row products from the "
             f"{'prepacked' if meta['packed_min_rows'] <= 1 else 'plain'} weights).", "",
             "ms per step by part (products: and their % of the bandwidth bound):", "",
             "| part | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for part in PARTS + ("matrices", "other", "total"):
        cells = [part if part not in ("matrices", "other", "total") else f"**{part}**"]
        for n in names:
            e = variants[n][part]
            cells.append(f"{e['ms']:.2f}" + (f" ({e['of_bound']:.0%})" if "of_bound" in e else ""))
        lines.append("| " + " | ".join(cells) + " |")
    if summary["one_call"]:
        lines += ["", "The whole step in one C++ call (cpu_draft.FusedFp32Step): " + ", ".join(
            f"{n} {e['ms']:.1f} ms ({e['of_bound']:.0%} of the bound)" for n, e in summary["one_call"].items())]

    def check(c: dict) -> str:
        text = "exact" if c["exact"] else f"max rel. error {c['max_rel_error']:.1e}"
        return text + ("" if c["argmax_equal"] else " (argmax differs)")

    checks = ", ".join(f"{n}: {check(c)}" for n, c in meta["checks"].items())
    lines += ["", f"- logits of each variant against the runner's step: {checks}",
              "- other = every part but the five products (embedding, norms, rope, KV write, attention, SiLU; "
              "the residual adds after o and down are counted with them); per-layer parts are summed over the "
              f"{meta['num_layers']} layers",
              "", "torch.profiler, the runner's step (top ops by self CPU time; the profiler's own cost inflates "
              "small ops):", "", "| op | calls per step | self ms per step |", "|---|---:|---:|"]
    for r in summary["profiler"][:12]:
        lines.append(f"| {r['op']} | {r['calls_per_step']:.0f} | {r['self_ms_per_step']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
