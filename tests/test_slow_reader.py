"""A client that reads slowly, or stops reading: gRPC flow control holds back only its own stream.

The slow client announces a 1 KiB HTTP/2 window (no BDP probing), so the decoder's writes block
after about twenty messages. While it does not read: the decoder's memory stays flat (the
stream's chunks wait in its own queue, bounded by its max_new_tokens), and other streams decode
in the same batch on the same torch thread, exactly (each equals the same request read at once).
When the client reads again its stream finishes exactly; one that took nothing for
--max-write-stall-s is cancelled, its slot freed, and the client sees CANCELLED saying why.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import psutil
import pytest

from clasp_serve.v1 import clasp_pb2_grpc as pb_grpc
from clients.sdk import ClaspClient, build_request
from test_services import REPO, free_port, wait_for

MAX_WRITE_STALL_S = 10
SLOW_TOKENS = 48  # more than the ~20 one-token messages the 1 KiB window lets through
HOLD_S = 3  # how long the test keeps not reading after the other streams finished
SLOW_WINDOW = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
SLOW_PROMPT = "Write a long story about a dragon who learns to sail."


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slow-reader")
    port, metrics_port = free_port(), free_port()
    log = tmp / "decoder.log"
    env = {**os.environ, "CLASP_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("CLASP_AUTH_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "decoder_service", "--host", "127.0.0.1", "--port", str(port),
                             "--metrics-port", str(metrics_port), "--redis-url", "", "--max-concurrent", "2",
                             "--max-write-stall-s", str(MAX_WRITE_STALL_S)],
                            cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    with ClaspClient(target) as ready:
        ready.wait_ready(180)
    yield dict(proc=proc, target=target, log=log, metrics_port=metrics_port)
    if proc.poll() is None:
        proc.terminate()
        proc.wait(30)


def metric(decoder, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{decoder['metrics_port']}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


class RssSampler:
    """The decoder's resident memory, sampled every 0.1 s on a thread until stopped."""

    def __init__(self, pid: int) -> None:
        self.process, self.samples_mib, self._stop = psutil.Process(pid), [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples_mib.append(self.process.memory_info().rss / 2**20)
            self._stop.wait(0.1)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def slow_stream(decoder, max_new_tokens: int):
    channel = grpc.insecure_channel(decoder["target"], options=SLOW_WINDOW)
    request = build_request(SLOW_PROMPT, max_new_tokens=max_new_tokens, mode="ar")  # one token per message
    return channel, pb_grpc.DecoderStub(channel).Generate(request, timeout=120)


def unhindered(decoder, prompt: str, max_new_tokens: int) -> list[int]:
    """The same request read at once: what a stalled stream, and the streams beside it, must equal."""
    with ClaspClient(decoder["target"]) as client:
        return client.generate(prompt, max_new_tokens=max_new_tokens, mode="ar").token_ids


def test_a_client_that_does_not_read_holds_back_only_its_own_stream(decoder):
    others = {p: unhindered(decoder, p, 12) for p in ("Name three rivers in Europe.", "What is the capital of France?")}
    expected = unhindered(decoder, SLOW_PROMPT, SLOW_TOKENS)
    channel, call = slow_stream(decoder, SLOW_TOKENS)
    try:
        first = next(call)
        wait_for(lambda: metric(decoder, "clasp_streams_waiting_on_client") == 1, 30,
                 "the decoder's write to the slow client to block (flow control)")
        stalled_at = time.monotonic()
        with RssSampler(decoder["proc"].pid) as rss:
            with ClaspClient(decoder["target"]) as other:  # the other slot, the same torch thread
                for prompt, reference in others.items():
                    assert other.generate(prompt, max_new_tokens=12, mode="ar").token_ids == reference
            # The slow stream is held meanwhile, and for a while after: its message still waits
            # for its client, and it still holds its slot (its handler has not finished).
            hold_until = time.monotonic() + HOLD_S
            while time.monotonic() < hold_until:
                assert metric(decoder, "clasp_streams_waiting_on_client") == 1
                assert metric(decoder, "clasp_active_requests") == 1
                threading.Event().wait(0.2)
            assert time.monotonic() - stalled_at < MAX_WRITE_STALL_S  # (else the test itself was too slow)
        grown = max(rss.samples_mib) - rss.samples_mib[0]
        print(f"stalled {time.monotonic() - stalled_at:.1f} s, decoder RSS {rss.samples_mib[0]:.1f} MiB, "
              f"+{grown:.1f} MiB at most over {len(rss.samples_mib)} samples")
        assert len(rss.samples_mib) >= 10 * HOLD_S and grown < 64, (grown, rss.samples_mib[::10])
        token_ids = list(first.token_ids)
        for message in call:  # reading again: the rest arrives and the output is exact
            token_ids.extend(message.token_ids)
        assert token_ids == expected
    finally:
        channel.close()
    wait_for(lambda: metric(decoder, "clasp_active_requests") == 0, 10, "the slow stream's slot back")


def test_a_client_that_stops_reading_is_cancelled_after_the_stall_limit(decoder):
    prompt = "Name three rivers in Europe."
    expected = unhindered(decoder, prompt, 8)
    stalls = metric(decoder, 'clasp_cancelled_requests_total{reason="write_stall"}')
    log_start = len(decoder["log"].read_text())
    channel, call = slow_stream(decoder, 400)
    try:
        received = len(next(call).token_ids)
        wait_for(lambda: metric(decoder, "clasp_streams_waiting_on_client") == 1, 30, "the write to block")
        with RssSampler(decoder["proc"].pid) as rss:
            wait_for(lambda: metric(decoder, "clasp_active_requests") == 0, MAX_WRITE_STALL_S + 15,
                     "the stalled stream to be cancelled and its slot freed")
        assert max(rss.samples_mib) - rss.samples_mib[0] < 64
        assert metric(decoder, 'clasp_cancelled_requests_total{reason="write_stall"}') == stalls + 1
        with pytest.raises(grpc.RpcError) as e:
            for message in call:  # what was in flight, then the status
                received += len(message.token_ids)
        assert e.value.code() == grpc.StatusCode.CANCELLED
        assert f"took no message for {MAX_WRITE_STALL_S} s" in e.value.details()
        assert 0 < received < 400
    finally:
        channel.close()
    with ClaspClient(decoder["target"]) as client:  # the slot is free: the next request runs, exactly
        assert client.generate(prompt, max_new_tokens=8, mode="ar").token_ids == expected
    log = decoder["log"].read_text()[log_start:]
    assert "client stopped reading" in log and "Traceback" not in log
