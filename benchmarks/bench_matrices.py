"""fp32 few-row products on the embedded model's matrix shapes: MKL, the padded 2-row trick,
oneDNN prepacked weights and clasp.cpu_draft's Fp32Matrix in each instruction set.

Every product is x[T, in] @ W[out, in].T in fp32, timed as decoding meets it: the weights stream
from memory, not from cache. For each shape there are enough copies of W (in each kernel's
layout) to exceed --stream-mib (default: more than twice the last-level cache), and one timing
is a pass over all copies; the median pass over --repeats, with the kernels interleaved pass by
pass so that a drift in machine load hits all alike. Reported per shape and T: ms per product,
GB/s of weights streamed, and % of the bandwidth bound (a read of a buffer much larger than the
caches, measured in the same run); then the whole model (each layer's four matrices and the
lm_head, as one plain decode step reads them) per kernel.

Kernels:
  mkl           (w @ x.T).T.contiguous(): clasp.model_runner.linear's few-row path
  mkl-padded    T = 1 only: the row duplicated into two, (w @ cat([x, x]).T).T[:1] (linear's
                single-row trick where calibrate_single_row chose it)
  onednn-packed torch.ops.mkldnn._linear_pointwise on a weight reordered once
                (model_runner.PackedWeight: verification's path from 3 rows)
  fp32-<isa>    cpu_draft.fp32_matrix in each instruction set this CPU runs (FP32_ISAS)

Results: benchmarks/results/matrices-<tag>.{json,md} and matrices-latest.md.
Usage: PYTHONPATH=. python benchmarks/bench_matrices.py [--rows 1,2,5,9] [--repeats 7]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.report import write_report  # noqa: E402
from benchmarks.bench_engine import git_commit, machine_info, measure_bandwidth  # noqa: E402
from clasp import cpu_draft  # noqa: E402
from clasp.loading import EMBEDDED_MODEL_NAME, embedded_model_dir  # noqa: E402
from clasp.matrices import PackedWeight  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results"


def last_level_cache_bytes() -> int:
    """The largest cache's size from sysfs (0 where the OS does not say)."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=0)


def model_shapes(model_dir: Path) -> tuple[dict[str, tuple[int, int]], int]:
    """{matrix: (out, in)} of one decoder layer and the lm_head, and the number of layers."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    shapes = {"qkv": ((heads + 2 * kv_heads) * head_dim, hidden), "o": (hidden, heads * head_dim),
              "gate_up": (2 * inter, hidden), "down": (hidden, inter), "lm_head": (config["vocab_size"], hidden)}
    return shapes, config["num_hidden_layers"]


def kernels_for(shape: tuple[int, int], copies: int, rows: list[int], isas: list[str]) -> dict:
    """{kernel: (prepared weights list, product(weight, x))}: `copies` weights of `shape` per kernel."""
    plain = [torch.randn(shape) for _ in range(copies)]
    kernels = {"mkl": (plain, lambda w, x: (w @ x.T).T.contiguous())}
    if 1 in rows:
        kernels["mkl-padded"] = (plain, lambda w, x: (w @ torch.cat([x, x]).T).T[:1] if x.shape[0] == 1 else None)
    if torch.backends.mkldnn.is_available():
        kernels["onednn-packed"] = ([PackedWeight.pack(w) for w in plain], lambda w, x: w.matmul(x))
    blocked = [cpu_draft.fp32_matrix(w, isas[0]) for w in plain] if isas else []
    for isa in isas:
        code = cpu_draft.FP32_ISAS[isa]

        def product(m, x, code=code):
            m.isa = code  # the matrices are shared by every isa: switched per call (a field write)
            return m(x)

        kernels[f"fp32-{isa}"] = (blocked, product)
    return kernels


def check(kernels: dict, rows: list[int]) -> None:
    """Every kernel's product equals MKL's to fp32 rounding, on the first copy."""
    for t in rows:
        x = torch.randn(t, kernels["mkl"][0][0].shape[1])
        expected = kernels["mkl"][0][0] @ x.T
        for name, (weights, product) in kernels.items():
            got = product(weights[0], x)
            if got is None:
                continue
            err = float((got - expected.T).abs().max() / expected.abs().max())
            if not err < 1e-5:
                raise AssertionError(f"{name} with {t} rows differs from MKL by {err:.2e} (relative)")


def time_shape(shape: tuple[int, int], rows: list[int], isas: list[str], stream_bytes: int, repeats: int) -> dict:
    """{kernel: {T: seconds per product (median pass)}} for one shape."""
    copies = max(2, -(-stream_bytes // (shape[0] * shape[1] * 4)))
    kernels = kernels_for(shape, copies, rows, isas)
    check(kernels, rows)
    results = {name: {} for name in kernels}
    with torch.inference_mode():
        for t in rows:
            x = torch.randn(t, shape[1])
            active = {n: k for n, k in kernels.items() if n != "mkl-padded" or t == 1}
            passes = {n: [] for n in active}
            for repeat in range(repeats + 1):  # the first pass of each is a warm-up
                for name, (weights, product) in active.items():
                    t0 = time.perf_counter()
                    for w in weights:
                        product(w, x)
                    if repeat:
                        passes[name].append((time.perf_counter() - t0) / len(weights))
            for name, p in passes.items():
                results[name][t] = statistics.median(p)
    return {"copies": copies, "seconds": results}


def summarize(shapes: dict, num_layers: int, timings: dict, rows: list[int], bandwidth: float) -> dict:
    """Per shape, kernel and T: ms, GB/s, % of bound; and the whole model per kernel and T."""
    per_shape, model = {}, {}
    kernels = list(next(iter(timings.values()))["seconds"])
    for name, shape in shapes.items():
        weight_bytes = shape[0] * shape[1] * 4
        per_shape[name] = {"shape": list(shape), "copies": timings[name]["copies"], "kernels": {
            k: {str(t): {"ms": 1000 * s, "gb_per_s": weight_bytes / s / 1e9, "of_bound": weight_bytes / s / bandwidth}
                for t, s in timings[name]["seconds"][k].items()} for k in kernels}}
    counts = {name: (1 if name == "lm_head" else num_layers) for name in shapes}
    model_bytes = sum(shapes[n][0] * shapes[n][1] * 4 * c for n, c in counts.items())
    for k in kernels:
        model[k] = {}
        for t in rows:
            if all(t in timings[n]["seconds"][k] for n in shapes):
                s = sum(timings[n]["seconds"][k][t] * c for n, c in counts.items())
                model[k][str(t)] = {"ms": 1000 * s, "gb_per_s": model_bytes / s / 1e9, "of_bound": model_bytes / s / bandwidth}
    return {"per_shape": per_shape, "model": model, "model_bytes": model_bytes,
            "bound_ms": 1000 * model_bytes / bandwidth}


def render_markdown(summary: dict) -> str:
    meta, rows = summary["meta"], summary["meta"]["rows"]
    m = meta["machine"]
    kernels = list(summary["model"])
    lines = [f"fp32 few-row products: {m['processor']} ({m['cpu_count']} CPUs, {m['torch_threads']} torch threads, "
             f"flags {' '.join(f for f in m['cpu_flags'] if f.startswith(('avx2', 'avx512', 'fma', 'avx_vnni')))}), "
             f"model {meta['model']} shapes, commit {meta['git_commit'] or 'unknown'}, {meta['timestamp']}, load "
             f"average {meta['load_average'][0]:.2f} before the run.", "",
             f"Bandwidth bound: {meta['bandwidth_gb_per_s']:.1f} GB/s (read of a {meta['bandwidth_buffer_mib']} MiB "
             f"buffer, {m['torch_threads']} threads); weights streamed from {meta['stream_mib']} MiB of copies per shape "
             f"(last-level cache {meta['llc_mib']:.0f} MiB). Cells: ms per product (% of the bound).", "",
             "Whole model per plain step (each layer's qkv, o, gate_up, down and the lm_head; "
             f"{summary['model_bytes'] / 2**20:.0f} MiB, bound {summary['bound_ms']:.1f} ms):", ""]
    header = ["kernel"] + [f"T={t}" for t in rows]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * len(rows)]
    for k in kernels:
        cells = [k] + [(f"{v['ms']:.1f} ({v['of_bound']:.0%})" if (v := summary["model"][k].get(str(t))) else "-")
                       for t in rows]
        lines.append("| " + " | ".join(cells) + " |")
    for name, entry in summary["per_shape"].items():
        shape = entry["shape"]
        lines += ["", f"{name} [{shape[0]}, {shape[1]}] ({shape[0] * shape[1] * 4 / 2**20:.2f} MiB, "
                      f"{entry['copies']} copies):", "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * len(rows)]
        for k in kernels:
            cells = [k] + [(f"{v['ms']:.3f} ({v['of_bound']:.0%})" if (v := entry["kernels"][k].get(str(t))) else "-")
                           for t in rows]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,2,5,9", help="comma-separated T values (default: 1,2,5,9)")
    parser.add_argument("--repeats", type=int, default=7, help="timed passes per kernel and T (default: 7)")
    parser.add_argument("--stream-mib", type=int, default=None,
                        help="weight copies per shape, in MiB (default: 2x the last-level cache, at least 512)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all CPUs)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (default: benchmarks/results)")
    parser.add_argument("--tag", default=None, help="results file name: matrices-<tag>.{json,md} (default: a timestamp)")
    args = parser.parse_args(argv)
    rows = sorted({int(r) for r in args.rows.split(",") if r.strip()})
    if not rows or min(rows) < 1:
        raise SystemExit("--rows: positive integers")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    timestamp = datetime.datetime.now()
    load = os.getloadavg()
    llc = last_level_cache_bytes()
    stream_mib = args.stream_mib or max(512, 2 * llc // 2**20)
    try:
        isas = cpu_draft.supported_fp32_isas()
    except RuntimeError as e:
        print(f"the fp32 kernel cannot be built here ({e}); timing torch's kernels only", file=sys.stderr)
        isas = []
    shapes, num_layers = model_shapes(embedded_model_dir())
    bandwidth = measure_bandwidth(torch.device("cpu"))
    timings = {}
    for name, shape in shapes.items():
        print(f"{name} {shape}...", file=sys.stderr)
        timings[name] = time_shape(shape, rows, isas, stream_mib * 2**20, args.repeats)
    bandwidth = max(bandwidth, measure_bandwidth(torch.device("cpu")))  # the better of before and after
    summary = summarize(shapes, num_layers, timings, rows, bandwidth)
    summary["meta"] = {"timestamp": timestamp.isoformat(timespec="seconds"), "machine": machine_info(torch.device("cpu")),
                       "model": EMBEDDED_MODEL_NAME, "dtype": "float32", "git_commit": git_commit(), "rows": rows,
                       "repeats": args.repeats, "stream_mib": stream_mib, "llc_mib": llc / 2**20,
                       "bandwidth_gb_per_s": bandwidth / 1e9, "bandwidth_buffer_mib": 1024, "fp32_isas": isas,
                       "num_layers": num_layers, "load_average": list(load), "load_average_after": list(os.getloadavg())}
    markdown = render_markdown(summary)
    path = write_report(summary, args.out, "matrices", args.tag or timestamp.strftime("%Y%m%d-%H%M%S"), markdown)
    print(markdown)
    print(f"wrote {path} and the .md beside it", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
