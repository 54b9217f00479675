"""Bad input gets a clear error that names the problem."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clasp.config import ClaspConfig, SamplingParams
from clasp.engine import Engine


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clasp", "generate", *args], input=stdin, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})


def test_empty_prompt(engine):
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.encode("   ")
    with pytest.raises(ValueError, match="prompt is empty"):
        next(engine.stream([], SamplingParams()))


def test_prompt_longer_than_context_window(engine):
    window = engine.runner.spec.max_context
    with pytest.raises(ValueError, match=f"context window is {window}"):
        next(engine.stream([1] * (window + 5), SamplingParams()))


def test_out_of_range_token_ids(engine):
    with pytest.raises(ValueError, match="prompt token ids must be in"):
        next(engine.stream([1, engine.runner.spec.vocab_size], SamplingParams()))


@pytest.mark.parametrize("limit", [0, -3])
def test_max_new_tokens_must_be_positive(limit):
    with pytest.raises(ValueError, match="max_new_tokens must be > 0"):
        SamplingParams(max_new_tokens=limit)


def test_unknown_mode_and_bad_settings():
    with pytest.raises(ValueError, match="mode must be one of ar, clasp, static"):
        ClaspConfig(mode="fast")
    with pytest.raises(ValueError, match="max_draft_length"):
        ClaspConfig(max_draft_length=0)
    with pytest.raises(ValueError, match="num_skip_layers must be < the model's 30 layers"):
        ClaspConfig(num_skip_layers=30).skip_count(30)
    with pytest.raises(ValueError, match="static_skip_set has layers outside"):
        ClaspConfig(mode="static", static_skip_set=(3, 40)).static_skips(30)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_bad_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        Engine.load(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        Engine.load(tmp_path)


def test_cli_errors_exit_2_with_message(tmp_path):
    cases = [
        (["--prompt", ""], "prompt is empty"),
        (["--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens must be > 0"),
        (["--prompt", "hi", "--model", str(tmp_path / "nope")], "is not a directory"),
    ]
    for args, message in cases:
        proc = run_cli(*args)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr
        assert "Traceback" not in proc.stderr
    proc = run_cli("--prompt", "hi", "--mode", "fast")
    assert proc.returncode == 2 and "invalid choice: 'fast'" in proc.stderr


def test_cli_json_output():
    proc = run_cli("--json", "--max-new-tokens", "24", "--mode", "clasp", stdin="What is the boiling point of water?")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in ("text", "token_ids", "accepted_lengths", "plans", "seconds", "finish_reason"):
        assert key in out
    assert 0 < len(out["token_ids"]) <= 24 and out["text"]
    assert out["plans"][0]["step"] == 0 and out["seconds"] > 0
    assert len(out["accepted_lengths"]) == out["stats"]["num_rounds"]
