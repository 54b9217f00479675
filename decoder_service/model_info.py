"""What the decoder serves, for the ModelInfo RPC: read from the loaded engine, never stored twice.

Only attributes of the engine and its runner are read here (through getattr where the draft's
set-up may change), so the engine's draft-kernel selection can evolve without this module.
"""

from __future__ import annotations

from clasp.engine import Engine
from clasp_serve.v1 import clasp_pb2 as pb


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def draft_description(engine: Engine) -> tuple[str, bool, str]:
    """(kernel, has its own copy, the copy's dtype) of the engine's draft. The kernel is the one
    chosen at load (Engine.draft_kernel, e.g. fused-avx512-vnni), else "torch" for torch ops."""
    runner = engine.runner
    choice = getattr(engine, "draft_kernel", None)
    kernel = getattr(choice, "chosen", None) or ("fused" if getattr(runner, "fused_draft", None) is not None
                                                 else "torch")
    has_copy = bool(getattr(runner, "draft_has_copy", False))
    if not has_copy:
        return kernel, False, _dtype_name(runner.dtype)
    lm_head = getattr(getattr(runner, "draft_weights", None), "lm_head", None)
    dtype = getattr(lm_head, "dtype", None) or "unknown"
    return kernel, True, _dtype_name(dtype)


def model_info(engine: Engine) -> pb.ModelInfoResponse:
    runner, spec = engine.runner, engine.runner.spec
    kernel, has_copy, draft_dtype = draft_description(engine)
    return pb.ModelInfoResponse(
        model_id=engine.model_name, identity=engine.identity, context_window=spec.max_context,
        num_layers=spec.num_layers, dtype=_dtype_name(runner.dtype), device=str(runner.device),
        draft_kernel=kernel, draft_copy=has_copy, draft_dtype=draft_dtype, hidden_size=spec.hidden_size,
        vocab_size=spec.vocab_size, default_mode=engine.config.mode)
