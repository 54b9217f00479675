"""Every command's --help renders (argparse formats help lazily, so a bad help string only fails here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [
    ["-m", "clasp", "generate", "--help"], ["-m", "clasp", "--help"], ["-m", "decoder_service", "--help"],
    ["-m", "planner_service", "--help"], ["clients/cli.py", "--help"], ["benchmarks/bench_engine.py", "--help"],
    ["benchmarks/bench_service.py", "--help"], ["benchmarks/bench_planner.py", "--help"],
    ["-m", "http_gateway", "--help"], ["benchmarks/bench_http.py", "--help"],
])
def test_help_renders(command):
    done = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
