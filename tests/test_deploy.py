"""The Kubernetes manifests render and validate offline (kustomize, kubernetes-validate, policy, yamllint)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
def test_deploy_check_passes():
    proc = subprocess.run(["bash", "deploy/check.sh"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "deploy check: all passed" in proc.stdout + proc.stderr
