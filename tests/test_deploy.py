"""The Kubernetes manifests render and validate offline (kustomize, kubernetes-validate, policy, yamllint)."""

from __future__ import annotations

import base64
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import yaml

from serving.security import REDIS_USER
from test_services import REDIS_SERVER, free_port, wait_for

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


def _rendered_cpu() -> list[dict]:
    rendered = subprocess.run(["kubectl", "kustomize", "deploy/overlays/cpu"], cwd=REPO, capture_output=True,
                              text=True, timeout=120, check=True).stdout
    return [d for d in yaml.safe_load_all(rendered) if d]


def _redis_pod(docs: list[dict]) -> dict:
    return next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "redis")["spec"]["template"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
def test_policy_requires_the_redis_acl_user():
    """The Kubernetes Redis used --requirepass: one password for every command, the default user."""
    policy = _policy_check()
    assert policy.REDIS_USER == REDIS_USER
    docs = _rendered_cpu()
    assert policy.check(docs) == []
    shared = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("clasp-env"))
    assert shared["data"]["CLASP_REDIS_USERNAME"] == REDIS_USER
    del shared["data"]["CLASP_REDIS_USERNAME"]
    problems = policy.check(docs)
    assert [p.split(":")[0] for p in problems] == ["Deployment/decoder/decoder", "Deployment/planner/planner"], problems
    assert all("CLASP_REDIS_USERNAME" in p for p in problems)
    shared["data"]["CLASP_REDIS_USERNAME"] = REDIS_USER

    pod = _redis_pod(docs)["spec"]
    redis = pod["containers"][0]
    redis["args"] = ["--requirepass", "$(REDIS_PASSWORD)", *redis["args"][1:]]  # the manifest as it was
    init = pod.pop("initContainers")
    problems = policy.check(docs)
    assert len(problems) == 2 and all(p.startswith("Deployment/redis: ") for p in problems), problems
    assert "--requirepass" in problems[0] and "no init container writes the ACL" in problems[1]
    redis["args"] = ["/etc/redis/other.conf", *redis["args"][2:]]
    pod["initContainers"] = init
    problems = policy.check(docs)
    assert len(problems) == 1 and "first argument is not the config file" in problems[0], problems


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")
def test_the_manifests_redis_runs_with_the_acl_user(tmp_path):
    """The rendered Redis pod, run here: its init container's command writes the config, redis-server
    starts from it with the manifest's arguments, the services' user gets in and only as far as its
    rules, the default user not at all, and the readiness probe's command passes."""
    docs = _rendered_cpu()
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].startswith("redis-auth"))
    password = base64.b64decode(secret["data"]["password"]).decode()
    pod = _redis_pod(docs)["spec"]
    mounts = {"/run/secrets/redis": tmp_path / "secret", "/etc/redis": tmp_path / "etc", "/data": tmp_path / "data"}
    for path in mounts.values():
        path.mkdir()
    (tmp_path / "secret" / "password").write_text(password)

    def local(arg: str) -> str:
        for mount, path in mounts.items():
            if arg == mount or arg.startswith(mount + "/"):
                return str(path) + arg[len(mount):]
        return arg

    init = pod["initContainers"][0]
    assert init["command"][:2] == ["python", "-m"]
    subprocess.run([sys.executable, *map(local, init["command"][1:])], cwd=REPO, check=True, timeout=60,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    container = pod["containers"][0]
    port = free_port()
    proc = subprocess.Popen([str(REDIS_SERVER), *map(local, container["args"]), "--port", str(port),
                             "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL)
    try:
        services = redis.Redis(port=port, username=REDIS_USER, password=password)

        def pings() -> bool:
            try:
                return services.ping()
            except redis.ConnectionError:
                return False

        wait_for(pings, 20, "the manifest's redis")
        services.set("clasp:{acl}:plan", b"x", ex=5)
        assert services.get("clasp:{acl}:plan") == b"x"
        for forbidden in (services.flushall, lambda: services.set("other", 1), lambda: services.config_get("*")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                forbidden()
        with pytest.raises((redis.exceptions.AuthenticationError, redis.exceptions.ResponseError)):
            redis.Redis(port=port, password=password).ping()  # the default user is off
        probe = container["readinessProbe"]["exec"]["command"]
        script = probe[2].replace("redis-cli", f"{REDIS_SERVER.parent / 'redis-cli'} -p {port}", 1)
        env = {**os.environ, "REDISCLI_AUTH": password}
        assert subprocess.run([*probe[:2], script], env=env, capture_output=True, timeout=30).returncode == 0
        assert subprocess.run([*probe[:2], script], env={**env, "REDISCLI_AUTH": "wrong"}, capture_output=True,
                              timeout=30).returncode != 0
    finally:
        proc.terminate()
        proc.wait(10)
