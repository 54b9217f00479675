"""Run the built image the way a pod does and check it from the host.   (deploy/image_test.sh)

    python deploy/image_test.py --image clasp-serve:image-test [--engine podman]

The container gets a read-only root filesystem with a tmpfs at /tmp (the pods' emptyDir), the
image's non-root user, no capabilities and no privilege escalation, and CLASP_HOST=0.0.0.0 as
the manifests set it; its gRPC and metrics ports are published on 127.0.0.1 only.

1. SIGTERM while the model is still loading (health NOT_SERVING): the decoder is PID 1, and it
   must exit 0 within seconds rather than wait for SIGKILL.
2. A fresh container: SERVING within the startup allowance, one generation through the
   published gRPC port, a metrics scrape that counts its tokens, then SIGTERM: exit 0.
3. The planner's entry point starts in the image (`--help`).
Prints what it measured, exits 1 on the first failure, and always removes its containers.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clients.sdk import ClaspClient  # noqa: E402

PROMPT = "Explain in two sentences why the sky is blue."
STARTUP_TIMEOUT_S = 300  # the startup probe's allowance (60 x 5 s)


class Failure(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        threading.Event().wait(0.1)
    raise Failure(f"timed out after {timeout_s} s waiting for {what}")


def health_status(target: str):
    with grpc.insecure_channel(target) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status
        except grpc.RpcError:
            return None


class Container:
    """One decoder container, hardened as in deploy/base/decoder.yaml."""

    def __init__(self, engine: str, image: str, name: str) -> None:
        self.engine, self.image, self.name = engine, image, name
        self.grpc_port, self.metrics_port = free_port(), free_port()
        self.target = f"127.0.0.1:{self.grpc_port}"

    def run(self) -> None:
        self._engine("run", "--detach", "--name", self.name,
                     "--read-only", "--tmpfs", "/tmp:rw,nosuid,nodev,size=1g,mode=1777",
                     "--cap-drop=ALL", "--security-opt=no-new-privileges",
                     "--publish", f"127.0.0.1:{self.grpc_port}:50051",
                     "--publish", f"127.0.0.1:{self.metrics_port}:9091",
                     "--env", "CLASP_HOST=0.0.0.0", "--env", "CLASP_THREADS=2", "--env", "OMP_NUM_THREADS=2",
                     "--env", "CLASP_GRACE_PERIOD_S=20", self.image)

    def sigterm_and_wait(self, timeout_s: float) -> tuple[int, float]:
        """(exit code, seconds from SIGTERM to exit)."""
        sent = time.monotonic()
        self._engine("kill", "--signal", "TERM", self.name)
        code = subprocess.run([self.engine, "wait", self.name], capture_output=True, text=True,
                              timeout=timeout_s).stdout.strip()
        return int(code), time.monotonic() - sent

    def exec(self, *command: str) -> subprocess.CompletedProcess:
        return subprocess.run([self.engine, "exec", self.name, *command], capture_output=True, text=True, timeout=60)

    def logs(self) -> str:
        # The services log to stderr, which `logs` replays on its own stderr.
        return subprocess.run([self.engine, "logs", self.name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=60).stdout

    def remove(self) -> None:
        subprocess.run([self.engine, "rm", "--force", "--time", "0", self.name], capture_output=True, timeout=120)

    def _engine(self, *args: str) -> str:
        proc = subprocess.run([self.engine, *args], capture_output=True, text=True, timeout=120)
        if proc.returncode:
            raise Failure(f"{self.engine} {args[0]} failed: {proc.stderr.strip()}")
        return proc.stdout.strip()


def check_sigterm_while_loading(container: Container) -> None:
    container.run()
    started = time.monotonic()
    wait_for(lambda: health_status(container.target) == health_pb2.HealthCheckResponse.NOT_SERVING, 120,
             "NOT_SERVING through the published port")
    print(f"ok    loading: NOT_SERVING through 127.0.0.1:{container.grpc_port} "
          f"{time.monotonic() - started:.1f} s after start")
    code, seconds = container.sigterm_and_wait(30)
    if code != 0 or seconds > 5:
        raise Failure(f"SIGTERM while loading: exit {code} after {seconds:.1f} s\n{container.logs()}")
    if "stopped before serving" not in container.logs():
        raise Failure(f"the model loaded before SIGTERM came: nothing tested\n{container.logs()}")
    print(f"ok    SIGTERM while loading: exit 0 after {seconds:.1f} s (PID 1)")


def check_serving(container: Container) -> None:
    container.run()
    started = time.monotonic()
    uid = container.exec("python", "-c", "import os; print(os.getuid())").stdout.strip()
    if uid in ("", "0"):
        raise Failure(f"the service runs as uid {uid!r}")
    if container.exec("touch", "/app/written").returncode == 0:
        raise Failure("the root filesystem is writable")
    print(f"ok    uid {uid}, read-only root filesystem")
    with ClaspClient(container.target) as client:
        try:
            client.wait_ready(STARTUP_TIMEOUT_S)
        except TimeoutError as e:
            raise Failure(f"{e}\n{container.logs()}") from None
        print(f"ok    SERVING {time.monotonic() - started:.1f} s after start")
        t0 = time.monotonic()
        result = client.generate(PROMPT, max_new_tokens=32, mode="clasp", timeout_s=120)
        seconds = time.monotonic() - t0
    if not result.token_ids or not result.text.strip():
        raise Failure(f"empty generation: {result}")
    print(f"ok    generated {len(result.token_ids)} tokens in {seconds:.2f} s ({result.finish_reason}): "
          f"{result.text.strip()[:100]!r}")
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{container.metrics_port}/metrics", timeout=10).read().decode()
    counted = sum(float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("clasp_tokens_generated_total"))
    if counted < len(result.token_ids):
        raise Failure(f"clasp_tokens_generated_total is {counted}, fewer than the {len(result.token_ids)} generated")
    print(f"ok    metrics through 127.0.0.1:{container.metrics_port}: clasp_tokens_generated_total {counted:.0f}")
    code, seconds = container.sigterm_and_wait(40)
    if code != 0:
        raise Failure(f"SIGTERM while serving: exit {code}\n{container.logs()}")
    print(f"ok    SIGTERM while serving: drained, exit 0 after {seconds:.1f} s")


def check_planner_entry_point(engine: str, image: str) -> None:
    proc = subprocess.run([engine, "run", "--rm", "--read-only", "--cap-drop=ALL", image,
                           "python", "-m", "planner_service", "--help"], capture_output=True, text=True, timeout=120)
    if proc.returncode or "--grace-period-s" not in proc.stdout:
        raise Failure(f"planner --help: exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
    print("ok    planner entry point (python -m planner_service --help)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", default=os.environ.get("CONTAINER_ENGINE", "podman"))
    parser.add_argument("--image", required=True)
    args = parser.parse_args()
    containers = [Container(args.engine, args.image, f"clasp-image-test-{os.getpid()}-{i}") for i in range(2)]
    t0 = time.monotonic()
    try:
        check_sigterm_while_loading(containers[0])
        check_serving(containers[1])
        check_planner_entry_point(args.engine, args.image)
    except Failure as e:
        print(f"FAIL  {e}")
        return 1
    finally:
        for c in containers:
            c.remove()
    print(f"image test: all passed in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
