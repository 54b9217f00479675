"""The plan wire format, both directions, written once: where plans travel in Redis, what a plan
request and a plan are as bytes, and the checks a decoded one passes before anything uses it.

    decoder --PlanRequest--> stream clasp:plan-requests (consumer group "planners") --> planner
    planner --Plan--> key clasp:{session}:plan (TTL), counter clasp:{session}:plan-version,
                      PUBLISH clasp:plans <session> (a wake-up only: its content is never read)

Both messages are protobuf (clasp.v1.PlanRequest, clasp.v1.Plan); hidden states inside a request
are safetensors bytes of one tensor. Nothing crossing Redis is pickled. Every decode raises only
ValueError, naming the field, for anything malformed or not meant for the reader.
"""

from __future__ import annotations

import dataclasses
import re
import time

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from clasp.plan_exchange import PlanInput
from clasp.planner import LayerPlan
from clasp_serve.v1 import clasp_pb2 as pb

# The hash tag {..} keeps a session's keys in one cluster slot.
PLAN_REQUEST_STREAM = "clasp:plan-requests"
PLAN_NOTIFY_CHANNEL = "clasp:plans"
PLANNER_GROUP = "planners"
REQUEST_FIELD = "request"  # a stream entry's one field: the PlanRequest bytes

# Session and request ids name Redis keys and log lines: letters, digits and . _ - only, so no
# id can shape a key ({, }, :, * and spaces did: clasp:{x}:plan}:plan).
MAX_ID_LENGTH = 128
_ID = re.compile(r"[A-Za-z0-9._-]+")


def check_id(name: str, value: str) -> str:
    """value, or ValueError naming the field if it is not a valid (non-empty) id."""
    if not value or len(value) > MAX_ID_LENGTH or not _ID.fullmatch(value):
        raise ValueError(f"{name} must be 1 to {MAX_ID_LENGTH} characters of A-Z a-z 0-9 . _ -")
    return value


def plan_key(session_id: str) -> str:
    return f"clasp:{{{check_id('session_id', session_id)}}}:plan"


def plan_version_key(session_id: str) -> str:
    return f"clasp:{{{check_id('session_id', session_id)}}}:plan-version"


# ------------------------------------------------------------------ the tensor codec
def encode_tensor(tensor: torch.Tensor) -> bytes:
    """safetensors bytes of one tensor (the format hidden states cross process boundaries in)."""
    return save_safetensors({"tensor": tensor.detach().contiguous().cpu()})


def decode_tensor(data: bytes) -> torch.Tensor:
    """The tensor from encode_tensor; raises ValueError on anything else."""
    try:
        tensors = load_safetensors(data)  # safetensors: no code execution, unlike pickle
    except Exception as e:  # safetensors raises its own error types for malformed input
        raise ValueError(f"malformed safetensors payload: {e}") from None
    if set(tensors) != {"tensor"}:
        raise ValueError(f"safetensors payload must hold one tensor named 'tensor', got {sorted(tensors)}")
    return tensors["tensor"]


def _parse(message_type, raw: bytes, what: str):
    try:
        return message_type.FromString(raw)
    except Exception:  # protobuf's DecodeError, or a type that is not bytes
        raise ValueError(f"{what}: not a valid {message_type.DESCRIPTOR.name}") from None


# ------------------------------------------------------------------ decoder -> planner
@dataclasses.dataclass(frozen=True)
class PlanRequestEntry:
    """A plan request as the planner reads it off the stream."""

    session_id: str
    model: str  # the identity of the decoder's model; the planner plans only for its own
    request: PlanInput


def encode_plan_request(session_id: str, model: str, request: PlanInput) -> dict[str, bytes]:
    """The stream entry's fields (XADD) for one re-plan request."""
    message = pb.PlanRequest(session_id=check_id("session_id", session_id), model=model, step=request.step,
                             position=request.position, token_ids=request.token_ids,
                             hidden_states=encode_tensor(request.hidden), max_skip=request.max_skip)
    return {REQUEST_FIELD: message.SerializeToString()}


def decode_plan_request(fields: dict) -> PlanRequestEntry:
    """A stream entry's fields (as redis-py returns them, bytes keys) as a request, or ValueError.

    Checked here: the entry's shape, the message, the session id and the tensor's format. What
    needs the model (the tensor's shape and values, token ids against the vocabulary, max_skip)
    is checked by the planner's SessionContexts.plan."""
    raw = fields.get(REQUEST_FIELD.encode(), fields.get(REQUEST_FIELD))
    if raw is None:
        raise ValueError(f"entry: no {REQUEST_FIELD!r} field")
    message = _parse(pb.PlanRequest, raw, "entry")
    check_id("session_id", message.session_id)
    try:
        hidden = decode_tensor(message.hidden_states)
    except ValueError as e:
        raise ValueError(f"hidden_states: {e}") from None
    return PlanRequestEntry(message.session_id, message.model,
                            PlanInput(step=message.step, hidden=hidden, position=message.position,
                                      token_ids=list(message.token_ids), max_skip=message.max_skip))


# ------------------------------------------------------------------ planner -> decoder
@dataclasses.dataclass(frozen=True)
class StoredPlan:
    """A plan as the decoder reads it from its key."""

    version: int  # the planner's counter: reported, never trusted for ordering (it resets with Redis)
    plan: LayerPlan
    created_at: float  # unix seconds when the planner wrote it (0: unknown)


def plan_message(plan: LayerPlan, session_id: str, version: int, model: str, num_layers: int,
                 seconds: float, created_at: float | None = None) -> pb.Plan:
    return pb.Plan(session_id=session_id, version=version, model=model, num_layers=num_layers,
                   skip_sets=[pb.SkipSet(layers=sorted(s)) for s in plan.skip_sets], scores=plan.scores,
                   step=plan.step, plan_seconds=seconds,
                   created_at=time.time() if created_at is None else created_at)


def encode_plan(plan: LayerPlan, session_id: str, version: int, model: str, num_layers: int,
                seconds: float, created_at: float | None = None) -> bytes:
    """The bytes the planner stores at plan_key(session_id)."""
    return plan_message(plan, session_id, version, model, num_layers, seconds, created_at).SerializeToString()


def parse_plan(raw: bytes) -> pb.Plan:
    """A stored plan's message, not yet checked against a model (GetPlan returns it as is)."""
    return _parse(pb.Plan, raw, "plan")


def decode_plan(raw: bytes, session_id: str, model: str, num_layers: int) -> StoredPlan:
    """A stored plan, or ValueError if it is malformed or not for this session and model: skip set
    j must be j distinct layers below num_layers, with one score per set."""
    plan = parse_plan(raw)
    if plan.session_id != session_id:
        raise ValueError(f"plan is for session {plan.session_id!r}")
    if plan.model != model:
        raise ValueError(f"plan is for model {plan.model!r}, this decoder serves {model!r}")
    if plan.num_layers != num_layers:
        raise ValueError(f"plan has {plan.num_layers} layers, the model has {num_layers}")
    if not plan.skip_sets or len(plan.scores) != len(plan.skip_sets):
        raise ValueError("plan has no skip sets or mismatched scores")
    sets = []
    for j, s in enumerate(plan.skip_sets):
        layers = frozenset(s.layers)
        if len(layers) != j or any(i >= num_layers for i in layers):
            raise ValueError(f"skip_sets[{j}] = {sorted(layers)} is not {j} distinct layers below {num_layers}")
        sets.append(layers)
    created_at = plan.created_at if plan.created_at == plan.created_at else 0.0  # NaN: unknown
    return StoredPlan(plan.version, LayerPlan(tuple(sets), tuple(plan.scores), plan.step, plan.plan_seconds),
                      created_at)
