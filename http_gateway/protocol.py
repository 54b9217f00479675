"""The OpenAI request and response shapes (pydantic v2) and their translation to clasp.v1.

Only what the decoder can honour is accepted. A field OpenAI defines but this server does not
support is accepted only at its no-op value (n = 1, presence_penalty = 0, logprobs false, ...);
any other value, and any unknown field, is a 400 naming it. Extensions (sent by the OpenAI client
as `extra_body`) are top-level fields: `top_k`, `session_id` and a `speculation` object.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from clasp_serve.v1 import clasp_pb2 as pb

MODES = {v.name.removeprefix("SPECULATION_MODE_").lower(): v.number  # mode names as the proto spells them
         for v in pb.SpeculationMode.DESCRIPTOR.values if v.number}
MAX_STOP = 16  # OpenAI allows 4; the decoder has no limit of its own, this bounds the hold-back
# OpenAI's finish reasons: an end-of-sequence token and a stop string are both "stop".
FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_STOP_STRING: "stop", pb.FINISH_REASON_LENGTH: "length"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _only(value, allowed: tuple, what: str):
    if value not in allowed:
        raise ValueError(f"not supported by this server: {what}")
    return value


class Speculation(_Strict):
    """Extension: the decoder's speculation settings for this request (unset: the server's)."""

    mode: Literal[tuple(MODES)] | None = None  # type: ignore[valid-type]
    replan_interval: int | None = Field(None, ge=1, lt=2**32)
    num_skip_layers: int | None = Field(None, ge=0, lt=2**32)
    max_draft_length: int | None = Field(None, ge=1, lt=2**32)
    adaptive: bool | None = None
    adaptive_skip: bool | None = None
    ngram_size: int | None = Field(None, ge=0, lt=2**32)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1, lt=2**32)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = Field(None, max_length=256)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    top_logprobs: int | None = None
    # Extensions
    top_k: int | None = Field(None, ge=0, lt=2**32)
    session_id: str | None = None
    speculation: Speculation | None = None

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        return _only(v, (1,), "only n = 1 is supported")

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalties(cls, v):
        return _only(v, (None, 0), "only 0 (no penalty) is supported")

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v):
        return _only(v, (None, 0), "log probabilities are not returned")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def max_new_tokens(self) -> int:
        return self.max_tokens or 0

    def to_pb(self, request_id: str, session_id: str) -> pb.GenerateRequest:
        req = pb.GenerateRequest(request_id=request_id, session_id=self.session_id or session_id,
                                 max_new_tokens=self.max_new_tokens(), stop=self.stop)
        for name in ("temperature", "top_p", "top_k", "seed"):
            value = getattr(self, name)
            if value is not None:
                setattr(req.sampling, name, value)
        if self.speculation is not None:
            spec = self.speculation
            if spec.mode is not None:
                req.speculation.mode = MODES[spec.mode]
            for name in type(spec).model_fields:
                if name == "mode":
                    continue
                value = getattr(spec, name)
                if value is not None:
                    setattr(req.speculation, name, value)
        return req


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, lt=2**32)
    logprobs: bool | None = None

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v):
        return _only(v, (None, False), "log probabilities are not returned")

    def max_new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 0

    def to_pb(self, request_id: str, session_id: str) -> pb.GenerateRequest:
        req = super().to_pb(request_id, session_id)
        # The chat template knows system, user and assistant; OpenAI's developer role is a system message.
        req.chat.messages.extend(pb.ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text())
                                 for m in self.messages)
        return req


class CompletionRequest(_Generation):
    prompt: str | list[str]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("exactly one prompt per request")
            v = v[0]
        return v

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v):
        return _only(v, (None, 0), "log probabilities are not returned")

    @field_validator("echo")
    @classmethod
    def _echo(cls, v):
        return _only(v, (False,), "echo")

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v):
        return _only(v, (None, ""), "suffix (insertion)")

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v):
        return _only(v, (None, 1), "only best_of = 1 is supported")

    def to_pb(self, request_id: str, session_id: str) -> pb.GenerateRequest:
        req = super().to_pb(request_id, session_id)
        req.prompt, req.raw_prompt = self.prompt, True  # completions take raw text: no chat template
        return req


def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def speculation_stats(final: pb.GenerateResponse) -> dict[str, Any]:
    """The decoder's SpeculationStats as JSON (the `usage.speculation` extension)."""
    from google.protobuf.json_format import MessageToDict

    stats = MessageToDict(final.stats, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    stats["plan_versions"] = [int(v) for v in stats["plan_versions"]]  # uint64 arrives as strings
    return stats


def usage(final: pb.GenerateResponse) -> dict[str, Any]:
    return {"prompt_tokens": final.num_prompt_tokens, "completion_tokens": final.num_generated_tokens,
            "total_tokens": final.num_prompt_tokens + final.num_generated_tokens,
            "speculation": speculation_stats(final)}


def response(kind: str, id_: str, model: str, text: str, final: pb.GenerateResponse) -> dict[str, Any]:
    """A whole (non-streamed) chat.completion or text_completion."""
    finish = FINISH[final.finish_reason]
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
              if kind == "chat" else {"index": 0, "text": text, "logprobs": None, "finish_reason": finish})
    return {"id": id_, "object": "chat.completion" if kind == "chat" else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(final), "system_fingerprint": None}


def chunk(kind: str, id_: str, model: str, created: int, text: str = "", finish_reason: str | None = None,
          first: bool = False, with_usage: bool = False, usage_: dict | None = None) -> dict[str, Any]:
    """One streamed chunk. Chat: the first carries the role, the last an empty delta and the finish
    reason. with_usage (stream_options.include_usage): every chunk has "usage": null, and a last one
    with no choices carries it (usage_)."""
    if usage_ is not None:
        choices = []
    elif kind == "chat":
        delta = {"role": "assistant", "content": text} if first else {} if finish_reason else {"content": text}
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    else:
        choices = [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]
    out = {"id": id_, "object": "chat.completion.chunk" if kind == "chat" else "text_completion", "created": created,
           "model": model, "choices": choices, "system_fingerprint": None}
    if with_usage:
        out["usage"] = usage_
    return out
