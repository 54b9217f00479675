"""Protobuf <-> engine conversions for the decoder. Every ValueError names the request field."""

from __future__ import annotations

import dataclasses
import uuid

from clasp.chat import chat_prompt_ids
from clasp.config import REQUEST_FIELDS, ClaspConfig, SamplingParams
from clasp.decoding import GenerationResult
from clasp.engine import Engine
from clasp_serve.v1 import clasp_pb2 as pb
from serving.plan_wire import check_id

# proto enum value -> clasp.config mode name (tests/test_deploy.py checks they are the same set).
MODES = {v.number: v.name.removeprefix("SPECULATION_MODE_").lower() for v in pb.SpeculationMode.DESCRIPTOR.values
         if v.number}
FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
          "stop_string": pb.FINISH_REASON_STOP_STRING, "cancelled": pb.FINISH_REASON_CANCELLED,
          "aborted": pb.FINISH_REASON_ABORTED}
ROLES = ("system", "user", "assistant")  # anything else would put template text in the role
MAX_CHAT_MESSAGES = 1024
# Text is bounded before it is tokenized (on the event loop): at most this many characters per
# token the prompt may have; real text runs 3-5 characters per token.
MAX_CHARS_PER_TOKEN = 32
MAX_SECRET_LENGTH = 128


@dataclasses.dataclass
class DecodeRequest:
    request_id: str
    session_id: str
    prompt_ids: list[int]
    params: SamplingParams
    config: ClaspConfig
    abort_secret: str = ""


def _field(name: str, fn):
    try:
        return fn()
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _check_id(name: str, value: str) -> str:
    """An optional id: empty, or a valid serving.plan_wire id (it names Redis keys)."""
    return check_id(name, value) if value else value


def request_from_pb(req: pb.GenerateRequest, engine: Engine, defaults: ClaspConfig,
                    default_max_new_tokens: int, max_prompt_tokens: int | None = None) -> DecodeRequest:
    window = engine.runner.spec.max_context
    max_prompt = min(max_prompt_tokens or window - 1, window - 1)
    request_id = _check_id("request_id", req.request_id) or uuid.uuid4().hex
    session_id = _check_id("session_id", req.session_id)
    if len(req.abort_secret) > MAX_SECRET_LENGTH or not req.abort_secret.isprintable():
        raise ValueError(f"abort_secret must be at most {MAX_SECRET_LENGTH} printable characters")
    which = req.WhichOneof("input")
    if which is None:
        raise ValueError("prompt: give a prompt or chat messages")
    max_chars = MAX_CHARS_PER_TOKEN * max_prompt
    if which == "prompt":
        if len(req.prompt) > max_chars:
            raise ValueError(f"prompt: {len(req.prompt)} characters, at most {max_chars}")
        # Through the chat template, the prompt is the user's content: template markup in it is
        # text (clasp.chat). raw_prompt text is the client's own, special tokens included.
        chat = not req.raw_prompt and bool(engine.tokenizer.chat_template) and bool(req.prompt.strip())
        prompt_ids = _field("prompt", lambda: chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": req.prompt}])
                            if chat else engine.encode(req.prompt, chat=not req.raw_prompt))
    else:
        if len(req.chat.messages) > MAX_CHAT_MESSAGES:
            raise ValueError(f"chat.messages: {len(req.chat.messages)} messages, at most {MAX_CHAT_MESSAGES}")
        messages = [{"role": m.role, "content": m.content} for m in req.chat.messages]
        for i, m in enumerate(messages):
            if m["role"] not in ROLES:
                raise ValueError(f"chat.messages[{i}].role: must be one of {', '.join(ROLES)}")
        if sum(len(m["content"]) for m in messages) > max_chars:
            raise ValueError(f"chat.messages: more than {max_chars} characters of content")
        prompt_ids = _field("chat.messages", lambda: chat_prompt_ids(engine.tokenizer, messages))
    s = req.sampling
    params = _field("sampling", lambda: SamplingParams(
        max_new_tokens=req.max_new_tokens or default_max_new_tokens,
        temperature=s.temperature if s.HasField("temperature") else 0.0,
        top_k=s.top_k if s.HasField("top_k") else 0,
        top_p=s.top_p if s.HasField("top_p") else 1.0,
        seed=s.seed if s.HasField("seed") else None,
        stop=list(req.stop)))
    spec = req.speculation
    overrides = {}
    if spec.mode != pb.SPECULATION_MODE_UNSPECIFIED:
        if spec.mode not in MODES:
            raise ValueError(f"speculation.mode: unknown value {spec.mode}")
        overrides["mode"] = MODES[spec.mode]
    for name in REQUEST_FIELDS[1:]:  # mode is an enum, above
        if spec.HasField(name):
            overrides[name] = getattr(spec, name)
    config = _field("speculation", lambda: dataclasses.replace(defaults, **overrides))
    num_layers = engine.runner.spec.num_layers
    _field("speculation.num_skip_layers", lambda: config.skip_count(num_layers, engine.runner.draft_has_copy))
    if len(prompt_ids) > max_prompt:
        raise ValueError(f"prompt: {len(prompt_ids)} tokens, at most {max_prompt} (the context window is {window})")
    return DecodeRequest(request_id, session_id, prompt_ids, params, config, req.abort_secret)


def chunk_to_pb(request_id: str, token_ids: list[int], text: str) -> pb.GenerateResponse:
    return pb.GenerateResponse(request_id=request_id, text=text, token_ids=token_ids)


def final_to_pb(request_id: str, result: GenerationResult | None, finish_reason: str, num_prompt_tokens: int,
                num_generated: int, plan_versions: list[int], skip_set: list[int]) -> pb.GenerateResponse:
    stats = pb.SpeculationStats(plan_versions=plan_versions, skip_set=skip_set)
    if result is not None:
        s = result.stats
        stats.num_rounds = s.num_rounds
        stats.num_draft_tokens = s.num_draft_tokens
        stats.num_accepted_tokens = s.num_accepted_tokens
        stats.mean_accepted_length = s.mean_accepted_length
        stats.accepted_per_position.extend(s.accepted_per_position)
        stats.num_plan_switches = max(len(result.plans) - 1, 0)
        stats.num_plain_rounds = s.num_plain_rounds
        stats.num_ngram_draft_tokens = s.num_ngram_draft_tokens
        stats.num_ngram_accepted_tokens = s.num_ngram_accepted_tokens
        stats.plan_io_seconds = s.plan_io_seconds
        stats.decode_seconds = result.seconds
        stats.mean_skipped_layers = s.mean_skipped_layers
    return pb.GenerateResponse(request_id=request_id, finish_reason=FINISH[finish_reason],
                               num_prompt_tokens=num_prompt_tokens, num_generated_tokens=num_generated, stats=stats)
