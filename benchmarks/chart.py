"""Render a benchmark result JSON as a PNG: speedup over `ar` and mean accepted length per category.

Usage: PYTHONPATH=. python benchmarks/chart.py benchmarks/results/engine-<tag>.json [--out file.png]
The benchmarks call render_chart() themselves and also write <prefix>-latest.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def render_chart(summary: dict, path: Path, baseline: str, title: str) -> Path:
    """Two panels from summary["tables"]: speedup vs `baseline` per method, and mean accepted length."""
    tables = summary["tables"]
    categories = list(tables)
    methods = [m for m in summary["meta"]["methods"] if m != baseline]
    speculative = [m for m in methods if any(tables[c].get(m, {}).get("mean_accepted_length") for c in categories)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(len(methods), 1)
    def speedup(category: str, method: str) -> float:
        base = tables[category].get(baseline, {}).get("tokens_per_s")
        value = tables[category].get(method, {}).get("tokens_per_s")
        return value / base if base and value else 0.0

    for i, method in enumerate(methods):
        values = [speedup(c, method) for c in categories]
        left.bar([x + i * width for x in range(len(categories))], values, width, label=method)
    left.axhline(1.0, color="black", linewidth=0.8)
    left.set_ylabel(f"tokens/s relative to {baseline}")
    left.set_title("speedup (1.0 = " + baseline + ")")
    left.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(categories))], categories, rotation=20)
    left.legend(fontsize=8, ncol=2)
    width = 0.8 / max(len(speculative), 1)
    for i, method in enumerate(speculative):
        values = [tables[c].get(method, {}).get("mean_accepted_length") or 0.0 for c in categories]
        right.bar([x + i * width for x in range(len(categories))], values, width, label=method)
    right.set_title("mean accepted length (tokens per verification)")
    right.set_xticks([x + width * (len(speculative) - 1) / 2 for x in range(len(categories))], categories,
                     rotation=20)
    right.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def chart_title(summary: dict, what: str) -> str:
    meta = summary["meta"]
    machine = meta["machine"]
    device = machine.get("cuda_device") or f"{machine['processor']} ({machine['cpu_count']} CPUs)"
    return (f"{what}: {meta['model']}, {meta['dtype']}, {device}, commit {meta.get('git_commit') or 'unknown'}, "
            f"{meta.get('max_new_tokens')} new tokens, {meta.get('questions_per_category')} question(s)/category")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path, help="a benchmarks/results/*.json file")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: the JSON's path with .png)")
    args = parser.parse_args(argv)
    summary = json.loads(args.result.read_text())
    baseline = "grpc_ar" if args.result.name.startswith("service") else "ar"
    what = "service benchmark" if baseline == "grpc_ar" else "engine benchmark"
    out = render_chart(summary, args.out or args.result.with_suffix(".png"), baseline, chart_title(summary, what))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
