"""clasp-serve client SDK: streams tokens from the decoder and returns the final statistics.

Retries are made only where they are safe: a stream that fails with UNAVAILABLE or
RESOURCE_EXHAUSTED before the server sent anything is started again (nothing was generated).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import time
from typing import AsyncIterator, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clasp_serve.v1 import clasp_pb2 as pb
from clasp_serve.v1 import clasp_pb2_grpc as pb_grpc

MODES = {v.name.removeprefix("SPECULATION_MODE_").lower(): v.number  # mode names as the proto spells them
         for v in pb.SpeculationMode.DESCRIPTOR.values if v.number}
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # stop, length, stop_string, cancelled, aborted
    request_id: str
    num_prompt_tokens: int
    stats: dict


def build_request(prompt: str | None = None, messages: Sequence[dict] | None = None, *, session_id: str = "",
                  request_id: str = "", max_new_tokens: int = 0, temperature: float | None = None,
                  top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                  stop: Sequence[str] = (), mode: str | None = None, replan_interval: int | None = None,
                  num_skip_layers: int | None = None, max_draft_length: int | None = None,
                  adaptive: bool | None = None, adaptive_skip: bool | None = None, ngram_size: int | None = None,
                  raw_prompt: bool = False) -> pb.GenerateRequest:
    """A GenerateRequest from keyword arguments; None leaves the server's default."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt or messages")
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    req = pb.GenerateRequest(session_id=session_id, request_id=request_id, max_new_tokens=max_new_tokens,
                             stop=list(stop), raw_prompt=raw_prompt)
    if prompt is not None:
        req.prompt = prompt
    else:
        req.chat.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    for name, value in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k), ("seed", seed)):
        if value is not None:
            setattr(req.sampling, name, value)
    if mode is not None:
        req.speculation.mode = MODES[mode]
    for name, value in (("replan_interval", replan_interval), ("num_skip_layers", num_skip_layers),
                        ("max_draft_length", max_draft_length), ("adaptive", adaptive),
                        ("adaptive_skip", adaptive_skip), ("ngram_size", ngram_size)):
        if value is not None:
            setattr(req.speculation, name, value)
    return req


def _metadata(token: str | None) -> tuple | None:
    return (("authorization", f"Bearer {token}"),) if token else None


@dataclasses.dataclass
class TLS:
    """Client TLS: the CA that signed the server's certificate, and for mutual TLS a client pair."""

    ca_file: str | None = None  # None: the system's roots
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None  # the name the certificate must carry, if not the target's host

    @classmethod
    def from_env(cls) -> "TLS | None":
        """CLASP_TLS_CA_FILE (and CLASP_TLS_CLIENT_CERT_FILE / CLASP_TLS_CLIENT_KEY_FILE), or None."""
        ca = os.environ.get("CLASP_TLS_CA_FILE")
        return cls(ca, os.environ.get("CLASP_TLS_CLIENT_CERT_FILE"), os.environ.get("CLASP_TLS_CLIENT_KEY_FILE")) \
            if ca else None

    def credentials(self) -> grpc.ChannelCredentials:
        read = lambda path: open(path, "rb").read() if path else None  # noqa: E731
        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file), read(self.cert_file))

    def options(self) -> list:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def _channel(target: str, tls: TLS | None, aio: bool):
    module = grpc.aio if aio else grpc
    if tls is None:
        return module.insecure_channel(target)
    return module.secure_channel(target, tls.credentials(), options=tls.options())


def token_from_env() -> str | None:
    """The bearer token from CLASP_AUTH_TOKEN_FILE (first token in it) or CLASP_AUTH_TOKEN."""
    path = os.environ.get("CLASP_AUTH_TOKEN_FILE")
    if path:
        for line in open(path).read().splitlines():
            if line.strip() and not line.startswith("#"):
                return line.strip().rpartition(":")[2].strip()
    return os.environ.get("CLASP_AUTH_TOKEN") or None


class _Secrets:
    """Each stream gets a random abort_secret; Abort of one of this client's requests sends it back."""

    def __init__(self) -> None:
        self.by_id: dict[str, str] = {}

    def arm(self, request: pb.GenerateRequest) -> pb.GenerateRequest:
        if request.abort_secret:
            return request
        armed = pb.GenerateRequest()
        armed.CopyFrom(request)
        armed.abort_secret = secrets.token_urlsafe(24)
        if armed.request_id:  # abortable while still queued, before any message arrives
            self.by_id[armed.request_id] = armed.abort_secret
        return armed

    def seen(self, request: pb.GenerateRequest, message: pb.GenerateResponse) -> None:
        if message.request_id and message.request_id not in self.by_id:
            self.by_id[message.request_id] = request.abort_secret

    def drop(self, request: pb.GenerateRequest) -> None:
        for request_id in [k for k, v in self.by_id.items() if v == request.abort_secret]:
            del self.by_id[request_id]


def _finish_name(value: int) -> str:
    return pb.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


class Collector:
    """Accumulates a Generate stream's messages into one Completion (what generate() returns):
    add() each message as it arrives, completion() once the final one came."""

    def __init__(self) -> None:
        self.text, self.token_ids, self.final = [], [], None

    def add(self, message: pb.GenerateResponse) -> None:
        self.text.append(message.text)
        self.token_ids.extend(message.token_ids)
        if message.finish_reason:
            self.final = message

    def completion(self) -> Completion:
        from google.protobuf.json_format import MessageToDict

        f = self.final
        stats = MessageToDict(f.stats, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        stats["plan_versions"] = [int(v) for v in stats["plan_versions"]]  # uint64 arrives as strings
        return Completion("".join(self.text), self.token_ids, _finish_name(f.finish_reason), f.request_id,
                          f.num_prompt_tokens, stats)


def _info_dict(response: pb.ModelInfoResponse) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(response, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


class ClaspClient:
    """Blocking client. Use as a context manager, or call close()."""

    def __init__(self, target: str = "127.0.0.1:50051", retries: int = 2, retry_backoff_s: float = 0.2,
                 token: str | None = None, tls: TLS | None = None) -> None:
        """token: the decoder's bearer token, if it requires one; tls: for a decoder serving TLS."""
        self.channel = _channel(target, tls, aio=False)
        self.stub = pb_grpc.DecoderStub(self.channel)
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self.metadata = _metadata(token)
        self.secrets = _Secrets()

    def __enter__(self) -> "ClaspClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until the decoder reports SERVING; TimeoutError after timeout_s."""
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"decoder not serving after {timeout_s} s")
            time.sleep(0.1)

    def stream(self, request: pb.GenerateRequest, timeout_s: float | None = None) -> Iterator[pb.GenerateResponse]:
        """Stream the raw responses; the last one carries finish_reason and stats."""
        request = self.secrets.arm(request)
        try:
            for attempt in range(self.retries + 1):
                received = False
                try:
                    for message in self.stub.Generate(request, timeout=timeout_s, metadata=self.metadata):
                        if not received:
                            self.secrets.seen(request, message)
                        received = True
                        yield message
                    return
                except grpc.RpcError as e:
                    if received or e.code() not in RETRYABLE or attempt == self.retries:
                        raise
                    time.sleep(self.retry_backoff_s * 2 ** attempt)
        finally:
            self.secrets.drop(request)

    def generate(self, prompt: str | None = None, messages: Sequence[dict] | None = None, *,
                 timeout_s: float | None = None, on_text=None, **options) -> Completion:
        collector = Collector()
        for message in self.stream(build_request(prompt, messages, **options), timeout_s):
            collector.add(message)
            if on_text and message.text:
                on_text(message.text)
        return collector.completion()

    def abort(self, request_id: str, abort_secret: str | None = None) -> bool:
        """Stop one of this client's requests (or any request whose abort_secret is given)."""
        secret = abort_secret if abort_secret is not None else self.secrets.by_id.get(request_id, "")
        return self.stub.Abort(pb.AbortRequest(request_id=request_id, abort_secret=secret), timeout=5.0,
                               metadata=self.metadata).found

    def model_info(self, timeout_s: float = 10.0) -> dict:
        """The served model: model_id, context_window, num_layers, dtype, device, draft_kernel, ..."""
        return _info_dict(self.stub.ModelInfo(pb.ModelInfoRequest(), timeout=timeout_s, metadata=self.metadata))


class AsyncClaspClient:
    """asyncio client. Use as an async context manager, or await close()."""

    def __init__(self, target: str = "127.0.0.1:50051", retries: int = 2, retry_backoff_s: float = 0.2,
                 token: str | None = None, tls: TLS | None = None) -> None:
        self.channel = _channel(target, tls, aio=True)
        self.stub = pb_grpc.DecoderStub(self.channel)
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self.metadata = _metadata(token)
        self.secrets = _Secrets()

    async def __aenter__(self) -> "AsyncClaspClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self.channel.close()

    async def stream(self, request: pb.GenerateRequest,
                     timeout_s: float | None = None) -> AsyncIterator[pb.GenerateResponse]:
        request = self.secrets.arm(request)
        try:
            for attempt in range(self.retries + 1):
                received = False
                try:
                    async for message in self.stub.Generate(request, timeout=timeout_s, metadata=self.metadata):
                        if not received:
                            self.secrets.seen(request, message)
                        received = True
                        yield message
                    return
                except grpc.aio.AioRpcError as e:
                    if received or e.code() not in RETRYABLE or attempt == self.retries:
                        raise
                    await asyncio.sleep(self.retry_backoff_s * 2 ** attempt)
        finally:
            self.secrets.drop(request)

    async def generate(self, prompt: str | None = None, messages: Sequence[dict] | None = None, *,
                       timeout_s: float | None = None, **options) -> Completion:
        collector = Collector()
        async for message in self.stream(build_request(prompt, messages, **options), timeout_s):
            collector.add(message)
        return collector.completion()

    async def abort(self, request_id: str, abort_secret: str | None = None) -> bool:
        secret = abort_secret if abort_secret is not None else self.secrets.by_id.get(request_id, "")
        return (await self.stub.Abort(pb.AbortRequest(request_id=request_id, abort_secret=secret), timeout=5.0,
                                      metadata=self.metadata)).found

    async def model_info(self, timeout_s: float = 10.0) -> dict:
        return _info_dict(await self.stub.ModelInfo(pb.ModelInfoRequest(), timeout=timeout_s, metadata=self.metadata))
