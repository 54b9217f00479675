"""The planner's per-session attention contexts: each session's KV cache rebuilt from its token ids."""

from __future__ import annotations

import collections
import dataclasses

import torch

from clasp.kv_cache import KVCache
from clasp.model_runner import ModelRunner
from clasp.plan_exchange import PlanInput
from clasp.planner import LayerPlan, plan_layers


@dataclasses.dataclass
class _Context:
    cache: KVCache
    token_ids: list[int]  # tokens whose full-model KV the cache holds, positions 0..len-1


class SessionContexts:
    """The planner's per-session attention contexts, least recently used evicted first.

    A request carries the session's token ids; only the part that differs from what the
    session's cache already holds is prefilled (a conversation's next re-plan typically adds
    LOI rounds' worth of tokens).

    Memory is bounded twice: at most max_sessions contexts, and their KV caches together at
    most max_bytes (the context being planned is always kept, and one context is at most the
    model's context window).
    """

    def __init__(self, runner: ModelRunner, max_sessions: int, max_bytes: int = 1 << 30) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.runner = runner
        self.max_sessions = max_sessions
        self.max_bytes = max_bytes
        self._contexts: collections.OrderedDict[str, _Context] = collections.OrderedDict()
        self._bytes = 0  # KV cache bytes of all contexts held

    def __len__(self) -> int:
        return len(self._contexts)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def plan(self, session_id: str, request: PlanInput) -> LayerPlan:
        spec = self.runner.spec
        if request.hidden.shape != (spec.num_layers + 1, spec.hidden_size):
            raise ValueError(f"hidden states have shape {tuple(request.hidden.shape)}, "
                             f"expected {(spec.num_layers + 1, spec.hidden_size)}")
        if len(request.token_ids) != request.position + 1:
            raise ValueError(f"token_ids has {len(request.token_ids)} tokens, expected position + 1 = "
                             f"{request.position + 1}")
        if not 0 <= request.max_skip < spec.num_layers:
            raise ValueError(f"max_skip must be in [0, {spec.num_layers}), got {request.max_skip}")
        if not request.hidden.is_floating_point() or not bool(torch.isfinite(request.hidden).all()):
            raise ValueError("hidden states must be finite floating-point values")
        if request.token_ids and not 0 <= min(request.token_ids) <= max(request.token_ids) < spec.vocab_size:
            raise ValueError(f"token_ids must be in [0, {spec.vocab_size})")
        context = self._context_for(session_id, request.position + 1)
        self._extend(context, request.token_ids[:request.position])
        hidden = request.hidden.to(device=self.runner.device, dtype=self.runner.dtype)
        plan, _ = plan_layers(self.runner, context.cache, hidden, request.position, request.max_skip,
                              step=request.step)
        return plan

    def _context_for(self, session_id: str, length: int) -> _Context:
        context = self._contexts.pop(session_id, None)
        if context is not None:
            self._bytes -= context.cache.nbytes()
        if context is None or context.cache.max_length < length:
            capacity = min(self.runner.spec.max_context, max(256, 1 << (length - 1).bit_length()))
            if length > capacity:
                raise ValueError(f"context of {length} tokens exceeds the context window {capacity}")
            grown = _Context(self.runner.new_cache(capacity), [])
            if context is not None:  # keep what the old cache holds
                n = len(context.token_ids)
                for layer in range(self.runner.spec.num_layers):
                    grown.cache.keys[layer][:, :, :n] = context.cache.keys[layer][:, :, :n]
                    grown.cache.values[layer][:, :, :n] = context.cache.values[layer][:, :, :n]
                grown.token_ids = context.token_ids
            context = grown
        self._contexts[session_id] = context
        self._bytes += context.cache.nbytes()
        while len(self._contexts) > 1 and (len(self._contexts) > self.max_sessions or self._bytes > self.max_bytes):
            _, evicted = self._contexts.popitem(last=False)
            self._bytes -= evicted.cache.nbytes()
        return context

    def _extend(self, context: _Context, token_ids: list[int]) -> None:
        """Make the cache hold exactly token_ids, prefilling from the first difference."""
        held = context.token_ids
        common = 0
        limit = min(len(held), len(token_ids))
        while common < limit and held[common] == token_ids[common]:
            common += 1
        if common < len(token_ids):
            self.runner.forward(torch.tensor(token_ids[common:], device=self.runner.device), context.cache, common,
                                last_only=True)
        context.cache.truncate(len(token_ids))
        context.token_ids = list(token_ids)
