"""Checks on rendered manifests that schema validation cannot make: the project's deployment contract.

    python deploy/policy_check.py RENDERED.yaml [...]    (run by deploy/check.sh, one file per overlay)

Hardening (non-root, read-only root, no privilege escalation, no capabilities, RuntimeDefault
seccomp), resources, tagged images, the gRPC probes and metrics annotations of the clasp
containers, CLASP_HOST binding every interface (the services default to 127.0.0.1, which no probe,
Service or Prometheus can reach), threads matching the CPU request, a grace period longer than the drain, references
to generated ConfigMaps/Secrets that resolve, Services that select pods and name real ports, the
decoder's PodDisruptionBudget, a GPU per clasp container when CLASP_DEVICE=cuda, and the Redis ACL
user: Redis started from the config `python -m serving.security redis-conf` writes (no
--requirepass, which leaves the default user with every command), the services logging in as it.
Prints one line per problem and exits 1 if there is any.
"""

from __future__ import annotations

import math
import sys

import yaml

CLASP_IMAGE = "clasp-serve"
REQUIRED_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/part-of")
GRPC_PORTS = {"decoder": 50051, "planner": 50052}
METRICS_PORTS = {"decoder": 9091, "planner": 9092}
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]")
HTTP_GATEWAY_PORT = 8000  # python -m http_gateway, the OpenAI-compatible API beside the decoder
REDIS_USER = "clasp"  # serving.security.REDIS_USER (this script imports nothing of the project)
ACL_WRITER = ["python", "-m", "serving.security", "redis-conf"]


def cpu_cores(q: str) -> float:
    q = str(q)
    return int(q[:-1]) / 1000 if q.endswith("m") else float(q)


def effective_env(container: dict, configmaps: dict[str, dict]) -> dict[str, str | None]:
    """The container's environment as the kubelet builds it: envFrom first, then env on top
    (None for a value taken from elsewhere, e.g. a Secret)."""
    merged: dict[str, str | None] = {}
    for src in container.get("envFrom", []):
        ref = src.get("configMapRef")
        if ref:
            data = configmaps.get(ref["name"], {}).get("data", {})
            merged.update({src.get("prefix", "") + k: v for k, v in data.items()})
    for e in container.get("env", []):
        merged[e["name"]] = e.get("value") if "valueFrom" not in e else None
    return merged


def http_gateway_problems(cw: str, c: dict, labels: dict) -> list[str]:
    """The HTTP gateway: beside the decoder, on its port, ready only while the decoder serves."""
    problems = []
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    if labels.get("app.kubernetes.io/component") != "decoder":
        problems.append(f"{cw}: the HTTP gateway is not in the decoder's pod")
    if ports.get("http") != HTTP_GATEWAY_PORT:
        problems.append(f"{cw}: http port {ports.get('http')} is not {HTTP_GATEWAY_PORT}")
    ready = c.get("readinessProbe", {}).get("httpGet", {})
    if ready.get("path") != "/health" or ready.get("port") not in ("http", HTTP_GATEWAY_PORT):
        problems.append(f"{cw}: readinessProbe is not GET /health on the http port")
    for probe in ("startupProbe", "livenessProbe"):
        if not c.get(probe):
            problems.append(f"{cw}: no {probe}")
    env = {e["name"]: e for e in c.get("env", [])}
    host = env.get("CLASP_HTTP_HOST", env.get("CLASP_HOST", {})).get("value")
    if host not in WILDCARD_HOSTS:
        problems.append(f"{cw}: CLASP_HTTP_HOST is {host!r}, not one of {', '.join(WILDCARD_HOSTS)}: "
                        "the Service and the readiness probe could not reach the gateway")
    if "CLASP_API_KEY" not in env:
        problems.append(f"{cw}: CLASP_API_KEY not set (the HTTP API would be open to the cluster)")
    return problems


def redis_acl_problems(where: str, pod: dict) -> list[str]:
    """Redis runs with the services' ACL user from `serving.security redis-conf`, nothing else."""
    problems = []
    redis = next((c for c in pod["containers"] if "redis-server" in c.get("command", [])[:1]), None)
    if redis is None:
        return [f"{where}: no container runs redis-server"]
    argv = redis.get("command", [])[1:] + redis.get("args", [])
    if any(a.startswith("--requirepass") or a == "requirepass" for a in argv):
        problems.append(f"{where}: redis uses --requirepass (the default user with every command), "
                        f"not the ACL user {REDIS_USER}")
    writers = [c for c in pod.get("initContainers", []) if c.get("command", [])[:4] == ACL_WRITER]
    if not writers:
        problems.append(f"{where}: no init container writes the ACL with `{' '.join(ACL_WRITER)}`")
    elif len(writers[0]["command"]) != 6 or argv[:1] != writers[0]["command"][5:]:
        problems.append(f"{where}: redis-server's first argument is not the config file "
                        f"`{' '.join(ACL_WRITER)} PASSWORD_FILE OUT_FILE` writes")
    return problems


def check(docs: list[dict]) -> list[str]:
    problems: list[str] = []
    by_kind: dict[str, dict[str, dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    configmaps, secrets = by_kind.get("ConfigMap", {}), by_kind.get("Secret", {})
    deployments = by_kind.get("Deployment", {})
    shared_env = next((cm.get("data", {}) for n, cm in configmaps.items() if n.startswith("clasp-env")), {})

    for name, dep in deployments.items():
        where = f"Deployment/{name}"
        tmpl = dep["spec"]["template"]
        labels = tmpl["metadata"].get("labels", {})
        problems += [f"{where}: pod label {k} missing" for k in REQUIRED_LABELS if k not in labels]
        sel = dep["spec"]["selector"].get("matchLabels", {})
        if any(labels.get(k) != v for k, v in sel.items()):
            problems.append(f"{where}: selector {sel} does not match the pod labels")
        pod = tmpl["spec"]
        psc = pod.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True:
            problems.append(f"{where}: pod securityContext.runAsNonRoot is not true")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: pod seccompProfile is not RuntimeDefault")
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: automountServiceAccountToken is not false")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        if labels.get("app.kubernetes.io/component") == "redis":
            problems += redis_acl_problems(where, pod)
        init_names = {c["name"] for c in pod.get("initContainers", [])}
        for c in pod.get("initContainers", []) + pod["containers"]:
            cw = f"{where}/{c['name']}"
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{cw}: allowPrivilegeEscalation is not false")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{cw}: readOnlyRootFilesystem is not true")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                problems.append(f"{cw}: capabilities do not drop ALL")
            res = c.get("resources", {})
            for path in (("requests", "cpu"), ("requests", "memory"), ("limits", "memory")):
                if path[1] not in res.get(path[0], {}):
                    problems.append(f"{cw}: resources.{'.'.join(path)} not set")
            image = c.get("image", "")
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            if not tag or tag == "latest":
                problems.append(f"{cw}: image {image!r} has no pinned tag")
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            if "emptyDir" not in volumes.get(mounts.get("/tmp", ""), {}):
                problems.append(f"{cw}: no emptyDir mounted at /tmp (the root filesystem is read-only)")
            env = {e["name"]: e for e in c.get("env", [])}
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref.get("key") not in secrets.get(ref["name"], {}).get("data", {}):
                    problems.append(f"{cw}: env {e['name']} refers to missing Secret key {ref['name']}/{ref['key']}")
            for src in c.get("envFrom", []):
                ref = src.get("configMapRef")
                if ref and ref["name"] not in configmaps:
                    problems.append(f"{cw}: envFrom refers to missing ConfigMap {ref['name']}")

            if image.rsplit("/", 1)[-1].partition(":")[0] != CLASP_IMAGE or c["name"] in init_names:
                continue
            if "http_gateway" in c.get("command", []):
                problems += http_gateway_problems(cw, c, labels)
                continue
            component = labels.get("app.kubernetes.io/component", "")
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            if ports.get("grpc") != GRPC_PORTS.get(component):
                problems.append(f"{cw}: grpc port {ports.get('grpc')} is not {GRPC_PORTS.get(component)}")
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if c.get(probe, {}).get("grpc", {}).get("port") != ports.get("grpc"):
                    problems.append(f"{cw}: {probe} is not a gRPC probe on the grpc port")
            ann = tmpl["metadata"].get("annotations", {})
            if ann.get("prometheus.io/scrape") != "true" or ann.get("prometheus.io/port") != str(ports.get("metrics")):
                problems.append(f"{cw}: prometheus.io annotations do not point at the metrics port")
            if ports.get("metrics") != METRICS_PORTS.get(component):
                problems.append(f"{cw}: metrics port {ports.get('metrics')} is not {METRICS_PORTS.get(component)}")
            if "CLASP_REDIS_PASSWORD" not in env:
                problems.append(f"{cw}: CLASP_REDIS_PASSWORD not set")
            if effective_env(c, configmaps).get("CLASP_REDIS_USERNAME") != REDIS_USER:
                problems.append(f"{cw}: CLASP_REDIS_USERNAME is not {REDIS_USER!r} (the Redis ACL user)")
            host = effective_env(c, configmaps).get("CLASP_HOST")
            if host not in WILDCARD_HOSTS:
                problems.append(f"{cw}: CLASP_HOST is {host!r}, not one of {', '.join(WILDCARD_HOSTS)}: "
                                "the services listen on 127.0.0.1 by default, out of the probes' reach")
            threads = {env.get(k, {}).get("value") for k in ("CLASP_THREADS", "OMP_NUM_THREADS")}
            want = str(math.ceil(cpu_cores(res.get("requests", {}).get("cpu", "0"))))
            if threads != {want}:
                problems.append(f"{cw}: CLASP_THREADS/OMP_NUM_THREADS {sorted(map(str, threads))} != CPU request {want}")
            grace = int(env.get("CLASP_GRACE_PERIOD_S", {}).get("value", "20"))
            pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
            if pod.get("terminationGracePeriodSeconds", 30) <= grace + pre_stop:
                problems.append(f"{cw}: terminationGracePeriodSeconds <= preStop {pre_stop} s + drain {grace} s")
            if shared_env.get("CLASP_DEVICE") == "cuda" and "nvidia.com/gpu" not in res.get("limits", {}):
                problems.append(f"{cw}: CLASP_DEVICE=cuda but no nvidia.com/gpu limit")

    pods = [(d["spec"]["template"]["metadata"].get("labels", {}), d) for d in deployments.values()]
    for name, svc in by_kind.get("Service", {}).items():
        sel = svc["spec"].get("selector", {})
        matched = [d for labels, d in pods if all(labels.get(k) == v for k, v in sel.items())]
        if not matched:
            problems.append(f"Service/{name}: selector {sel} matches no Deployment")
        for p in svc["spec"].get("ports", []):
            target = p.get("targetPort", p["port"])
            names = {cp.get("name") for d in matched for c in d["spec"]["template"]["spec"]["containers"]
                     for cp in c.get("ports", [])}
            if isinstance(target, str) and target not in names:
                problems.append(f"Service/{name}: targetPort {target!r} is no container port name")

    decoder_pdbs = [p for p in by_kind.get("PodDisruptionBudget", {}).values()
                    if p["spec"]["selector"].get("matchLabels", {}).get("app.kubernetes.io/component") == "decoder"]
    if not decoder_pdbs:
        problems.append("no PodDisruptionBudget selects the decoder")
    return problems


def main(paths: list[str]) -> int:
    failed = False
    for path in paths:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        problems = check(docs)
        for p in problems:
            print(f"{path}: {p}")
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
