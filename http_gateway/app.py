"""The OpenAI-compatible HTTP API as an ASGI app (FastAPI) over the decoder's gRPC API.

Every request becomes one Decoder.Generate stream: the decoder stays the one place that
decodes, and this process only translates. Errors keep OpenAI's shape
({"error": {"message", "type", "param", "code"}}): a bad field is 400 naming it, a busy decoder
429, a draining or loading one 503. A stream's first message is awaited before the response
starts, so an invalid request is a 400 and not an error event; a client that disconnects
mid-stream cancels the gRPC call, and the decoder stops within one round.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import time
from typing import Any

import grpc
import structlog
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sse_starlette import EventSourceResponse

from clasp_serve.v1 import clasp_pb2 as pb
from clasp_serve.v1 import clasp_pb2_grpc as pb_grpc
from clients.sdk import token_from_env
from http_gateway import protocol
from http_gateway.protocol import ChatCompletionRequest, CompletionRequest

log = structlog.get_logger("http")
SESSION_HEADER = "x-session-id"
# gRPC status -> HTTP status and OpenAI error type
GRPC_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
# The decoder names GenerateRequest fields; the client sent OpenAI's.
PARAM_NAMES = {"prompt": "prompt", "chat.messages": "messages", "sampling": None, "max_new_tokens": "max_tokens",
               "session_id": "session_id", "stop": "stop", "speculation": "speculation"}


@dataclasses.dataclass
class Settings:
    decoder_target: str = "127.0.0.1:50051"
    api_key: str | None = None  # None or empty: no authentication
    request_timeout_s: float | None = None  # deadline of each Generate call; None: none
    sse_ping_s: float = 15.0  # keep-alive comments on idle streams (a long prefill)
    max_body_bytes: int = 4 << 20  # gRPC's default message limit: a larger request could not reach the decoder


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def grpc_error(e: grpc.aio.AioRpcError) -> APIError:
    status, type_ = GRPC_ERRORS.get(e.code(), (500, "internal_error"))
    message = e.details() or e.code().name
    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in message:
        return APIError(413, f"request too large for the decoder: {message}", "invalid_request_error", None,
                        "request_too_large")  # gRPC's message size limit, not a full queue
    param = None
    if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
        field = message.split(":", 1)[0]
        for prefix, name in PARAM_NAMES.items():
            if field == prefix or field.startswith(prefix + ".") or field.startswith(prefix + "["):
                param = None if name is None else name + field[len(prefix):]
                break
    return APIError(status, message, type_, param, e.code().name.lower())


def _field_path(error: dict) -> str:
    # pydantic puts the union member it tried in the location ("str", "list[str]"); keep the field path
    path = ""
    for p in error.get("loc", ())[1:] if error.get("loc", ("",))[0] == "body" else error.get("loc", ()):
        if isinstance(p, int):
            path += f"[{p}]"
        elif not (p[:1].isupper() or p.startswith(("str", "list[", "function-"))):
            path += f".{p}" if path else p
    return path


def _describe(error: dict) -> str:
    path, kind = _field_path(error), error.get("type")
    if kind == "extra_forbidden":
        return f"{path}: unknown or unsupported field"
    if kind == "missing":
        return f"{path}: required"
    message = error.get("msg", "invalid value").removeprefix("Value error, ")
    return f"{path}: {message}" if path else message


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    codes = {"extra_forbidden": "unsupported_parameter", "missing": "missing_required_parameter"}
    message = "; ".join(dict.fromkeys(_describe(e) for e in errors))  # every problem, in order, once
    return APIError(400, message, param=_field_path(first) or None, code=codes.get(first.get("type"), "invalid_value"))


class BodyLimit:
    """ASGI middleware: a 413 in OpenAI's shape for a declared body over max_bytes, before it is read
    (gRPC's own limit is 4 MiB a message; a chunked body over it gets the same 413 from grpc_error)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"0")
            if not length.isdigit() or int(length) > self.max_bytes:
                error = APIError(413, f"request body over {self.max_bytes} bytes", code="request_too_large")
                return await error.response()(scope, receive, send)
        return await self.app(scope, receive, send)


class Gateway:
    """The app's state: one gRPC channel to the decoder and what it serves (fetched once)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.channel = None
        self.stub: pb_grpc.DecoderStub | None = None
        self.health: health_pb2_grpc.HealthStub | None = None
        self.info: pb.ModelInfoResponse | None = None
        # The decoder's own bearer token (CLASP_AUTH_TOKEN_FILE / CLASP_AUTH_TOKEN), when it requires one:
        # HTTP clients authenticate to the gateway with the API key, the gateway to the decoder with this.
        token = token_from_env()
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None

    async def open(self) -> None:
        self.channel = grpc.aio.insecure_channel(self.settings.decoder_target)
        self.stub = pb_grpc.DecoderStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()

    async def model_info(self) -> pb.ModelInfoResponse:
        if self.info is None:
            try:
                self.info = await self.stub.ModelInfo(pb.ModelInfoRequest(), timeout=10, metadata=self.metadata)
            except grpc.aio.AioRpcError as e:
                raise grpc_error(e) from None
        return self.info

    async def check_model(self, model: str) -> pb.ModelInfoResponse:
        info = await self.model_info()
        if model not in (info.model_id, info.identity):
            raise APIError(404, f"model {model!r} is not served here; this server serves {info.model_id!r}",
                           param="model", code="model_not_found")
        return info

    async def authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if not key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not depend on how much of the key matched
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "missing or invalid API key (Authorization: Bearer <key>)", "authentication_error",
                           None, "invalid_api_key")

    async def generate(self, kind: str, body: ChatCompletionRequest | CompletionRequest, request: Request):
        info = await self.check_model(body.model)
        id_ = protocol.new_id(kind)
        session = request.headers.get(SESSION_HEADER, "")
        req = body.to_pb(id_, session)
        call = self.stub.Generate(req, timeout=self.settings.request_timeout_s, metadata=self.metadata)
        log.info("request", kind=kind, request_id=id_, session_id=req.session_id, stream=body.stream, user=body.user)
        # A client that goes away (a timeout, a retry) cancels the generation, also while it waits
        # for a decode slot or its prefill; once a stream has started, sse-starlette watches instead.
        watcher = asyncio.create_task(_cancel_on_disconnect(request, call))
        text, final = [], None
        try:
            first = await call.read()  # the decoder validates before its first message
            if body.stream:
                watcher.cancel()
                return EventSourceResponse(self._events(kind, id_, info.model_id, body, call, first),
                                           headers={"x-request-id": id_}, ping=self.settings.sse_ping_s, sep="\n")
            message = first
            while message is not grpc.aio.EOF:
                text.append(message.text)
                if message.finish_reason:
                    final = message
                message = await call.read()
        except grpc.aio.AioRpcError as e:
            raise grpc_error(e) from None
        except asyncio.CancelledError:
            if not watcher.done():
                call.cancel()
                raise  # this task was cancelled (shutdown), not the call by the watcher
            log.info("client disconnected; generation cancelled", request_id=id_)
            raise APIError(499, "client disconnected", "client_closed_request") from None
        except BaseException:
            call.cancel()
            raise
        finally:
            watcher.cancel()
        call.cancel()
        _check_finished(final)
        return JSONResponse(protocol.response(kind, id_, info.model_id, "".join(text), final),
                            headers={"x-request-id": id_})

    async def _events(self, kind: str, id_: str, model: str, body, call, first_message):
        created = int(time.time())
        with_usage = body.include_usage()

        def event(text: str = "", finish: str | None = None, first: bool = False) -> dict:
            return {"data": json.dumps(protocol.chunk(kind, id_, model, created, text, finish, first, with_usage))}

        try:
            if kind == "chat":
                yield event(first=True)
            message = first_message
            while message is not grpc.aio.EOF:
                if message.text:
                    yield event(message.text)
                if message.finish_reason:
                    _check_finished(message)
                    yield event(finish=protocol.FINISH[message.finish_reason])
                    if with_usage:
                        yield {"data": json.dumps(protocol.chunk(kind, id_, model, created, with_usage=True,
                                                                 usage_=protocol.usage(message)))}
                    break
                message = await call.read()
            yield {"data": "[DONE]"}
        except grpc.aio.AioRpcError as e:
            yield {"data": json.dumps(grpc_error(e).body())}
        except APIError as e:
            yield {"data": json.dumps(e.body())}
        finally:
            # Also on a client disconnect (the generator is cancelled): the decoder stops this stream.
            call.cancel()

    async def ready(self) -> bool:
        try:
            reply = await self.health.Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


async def _cancel_on_disconnect(request: Request, call) -> None:
    """Cancel the gRPC call once the client disconnects (the body is read: receive() waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    call.cancel()


def _check_finished(final: pb.GenerateResponse | None) -> None:
    if final is None or final.finish_reason not in protocol.FINISH:
        reason = pb.FinishReason.Name(final.finish_reason) if final is not None else "no final message"
        raise APIError(503, f"generation stopped early ({reason}): the decoder aborted it or is shutting down",
                       "service_unavailable", None, "aborted")


def create_app(settings: Settings) -> FastAPI:
    gateway = Gateway(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.open()  # inside the server's event loop, where grpc.aio must be used
        yield
        await gateway.close()

    app = FastAPI(title="clasp-serve OpenAI-compatible API", lifespan=lifespan)
    app.state.gateway = gateway

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.get("/health")
    async def health():
        """Readiness: 200 while the decoder reports SERVING (loaded, warm, not draining), else 503."""
        if await gateway.ready():
            return {"status": "ok"}
        return APIError(503, "the decoder is not serving (loading, draining or unreachable)", "service_unavailable",
                        None, "unavailable").response()

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(gateway.authorize)])

    def model_card(info: pb.ModelInfoResponse) -> dict:
        return {"id": info.model_id, "object": "model", "created": 0, "owned_by": "clasp-serve",
                "context_window": info.context_window, "num_layers": info.num_layers, "dtype": info.dtype,
                "device": info.device, "draft_kernel": info.draft_kernel, "draft_dtype": info.draft_dtype}

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [model_card(await gateway.model_info())]}

    @v1.get("/models/{model:path}")
    async def model(model: str):
        return model_card(await gateway.check_model(model))

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await gateway.generate("chat", body, request)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await gateway.generate("completion", body, request)

    app.include_router(v1)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    return app
