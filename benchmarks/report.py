"""Cells of the benchmarks' markdown tables, shared by every benchmark script."""

from __future__ import annotations


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
