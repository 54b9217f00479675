"""Cells of the benchmarks' markdown tables, and where results are written: shared by every
benchmark script."""

from __future__ import annotations

import json
from pathlib import Path


def fmt(value, spec: str = ".1f", suffix: str = "") -> str:
    """value formatted with spec and suffix, or "n/a" when it was not measured (None)."""
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def tokens_per_s_cell(aggregate_row: dict | None) -> str:
    """A method's tokens/s cell: "-" when the method did not run, "error" when every question failed."""
    if aggregate_row is None:
        return "-"  # method not run
    if aggregate_row["tokens_per_s"] is None and aggregate_row.get("error"):
        return "error"  # every question failed; the error is in the notes
    return fmt(aggregate_row["tokens_per_s"])


def write_report(summary: dict, out_dir: Path, prefix: str, tag: str, markdown: str, latest: bool = True) -> Path:
    """<prefix>-<tag>.json and .md in out_dir, and <prefix>-latest.md overwritten (unless latest is
    False: a run with forced settings must not replace the default run's page). Returns the JSON path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{prefix}-{tag}"  # not Path.with_suffix: a prefix like "sampling-t0.7" has a dot
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(summary, indent=1) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown)
    if latest:
        (out_dir / f"{prefix}-latest.md").write_text(markdown)
    return json_path
