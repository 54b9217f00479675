"""Stop signals from the first moment: real decoder and planner processes, SIGTERM during the model
load and after it (a pod deleted while it starts, and a rolling update)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving.service import listen_address, metrics_address
from test_services import REPO, free_port, wait_for


def start(module: str, args: list[str], log: Path, **env) -> subprocess.Popen:
    env = {**os.environ, "CLASP_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env}
    return subprocess.Popen([sys.executable, "-m", module, "--host", "127.0.0.1", "--metrics-port", "0", *args],
                            cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def health_status(target: str):
    """The server's overall grpc.health.v1 status, or None while it does not answer."""
    with grpc.insecure_channel(target) as channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status
        except grpc.RpcError:
            return None


def log_events(log: Path) -> dict[str, dict]:
    events = {}
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            events[record["event"]] = record
    return events


def stop_while_loading(module: str, args: list[str], log: Path) -> None:
    port = free_port()
    proc = start(module, ["--port", str(port), *args], log)
    try:
        target = f"127.0.0.1:{port}"
        # Listening and NOT_SERVING: the model is loading (a few seconds for the embedded one).
        wait_for(lambda: health_status(target) == health_pb2.HealthCheckResponse.NOT_SERVING, 120, "NOT_SERVING")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log.read_text()
        assert time.monotonic() - sent < 5, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    events = log_events(log)
    assert "stopped before serving" in events and "serving" not in events, log.read_text()


def test_decoder_sigterm_while_loading_exits_cleanly(tmp_path):
    stop_while_loading("decoder_service", ["--redis-url", ""], tmp_path / "decoder.log")


def test_planner_sigterm_while_loading_exits_cleanly(tmp_path):
    stop_while_loading("planner_service", ["--redis-url", f"redis://127.0.0.1:{free_port()}/0"],
                       tmp_path / "planner.log")


def test_planner_drains_for_clasp_grace_period_s(tmp_path):
    """CLASP_GRACE_PERIOD_S reaches the planner's drain (it used to stop with a fixed 5 s)."""
    port, log = free_port(), tmp_path / "planner.log"
    # No Redis on that port: the worker retries with backoff, the gRPC side still serves.
    proc = start("planner_service", ["--port", str(port), "--redis-url", f"redis://127.0.0.1:{free_port()}/0"], log,
                 CLASP_GRACE_PERIOD_S="7.5")
    try:
        wait_for(lambda: health_status(f"127.0.0.1:{port}") == health_pb2.HealthCheckResponse.SERVING, 180, "SERVING")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    events = log_events(log)
    assert events["draining"]["grace_period_s"] == 7.5 and "stopped" in events, log.read_text()


def test_listen_addresses():
    assert listen_address("127.0.0.1", 50051) == "127.0.0.1:50051"
    assert listen_address("0.0.0.0", 50051) == "0.0.0.0:50051"
    assert listen_address("::", 50051) == listen_address("[::]", 50051) == "[::]:50051"
    assert metrics_address("127.0.0.1") == "127.0.0.1"
    assert metrics_address("::1") == metrics_address("[::1]") == "::1"
    # A wildcard: dual-stack where the kernel has IPv6, else every IPv4 interface.
    kernel_has_ipv6 = Path("/proc/net/if_inet6").exists()
    assert metrics_address("0.0.0.0") == metrics_address("[::]") == ("::" if kernel_has_ipv6 else "0.0.0.0")


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent to reap it has exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_make_stop_returns_once_the_services_have_exited(tmp_path):
    """`make stop` waits for the drain instead of reporting "stopped" while they still run."""
    draining = ("import signal, sys, threading\n"
                "def term(*_):\n    threading.Event().wait(1.5)\n    sys.exit(0)\n"
                "signal.signal(signal.SIGTERM, term)\nprint('up', flush=True)\nthreading.Event().wait(60)\n")
    pids = {}
    for name in ("decoder", "planner"):
        # Detached, as `make start` leaves them: not this process's children, so nothing here reaps them.
        ready = tmp_path / f"{name}.ready"
        subprocess.run(["sh", "-c", f'"$0" -c "$1" > {ready} & echo $! > {tmp_path}/{name}.pid',
                        sys.executable, draining], check=True, timeout=10)
        wait_for(lambda: ready.exists() and ready.read_text() == "up\n", 20, f"{name} handler installed")
        pids[name] = int((tmp_path / f"{name}.pid").read_text())
    try:
        out = subprocess.run(["make", "--no-print-directory", "stop", f"RUN={tmp_path}"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert not any(alive(pid) for pid in pids.values()), out.stdout  # make has returned: both exited
        assert out.stdout.splitlines() == ["stopping decoder (draining)", "stopping planner (draining)",
                                           "stopped decoder", "stopped planner"]
        assert not list(tmp_path.glob("*.pid"))
    finally:
        for pid in pids.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
