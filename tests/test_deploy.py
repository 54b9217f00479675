"""The Kubernetes manifests render and validate offline (kustomize, kubernetes-validate, policy, yamllint)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
def test_deploy_check_passes():
    proc = subprocess.run(["bash", "deploy/check.sh"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "deploy check: all passed" in proc.stdout + proc.stderr


def _policy_check():
    spec = importlib.util.spec_from_file_location("policy_check", REPO / "deploy" / "policy_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
def test_policy_requires_clasp_host_on_every_interface():
    """Pods must listen beyond 127.0.0.1 (the services' default), or no probe reaches them."""
    policy = _policy_check()
    rendered = subprocess.run(["kubectl", "kustomize", "deploy/overlays/cpu"], cwd=REPO, capture_output=True,
                              text=True, timeout=120, check=True).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    assert policy.check(docs) == []
    shared = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("clasp-env"))
    assert shared["data"]["CLASP_HOST"] == "0.0.0.0"

    del shared["data"]["CLASP_HOST"]
    problems = policy.check(docs)
    assert [p.split(":")[0] for p in problems if "CLASP_HOST" in p] == ["Deployment/decoder/decoder",
                                                                      "Deployment/planner/planner"], problems

    shared["data"]["CLASP_HOST"] = "::"
    assert policy.check(docs) == []
    decoder = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "decoder")
    decoder["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "CLASP_HOST", "value": "127.0.0.1"})
    problems = policy.check(docs)  # env overrides envFrom, as in the kubelet
    assert len(problems) == 1 and "Deployment/decoder/decoder: CLASP_HOST is '127.0.0.1'" in problems[0], problems
