"""Planning away from the decoder: rebuilt contexts, late or missing plans, tensor codec."""

from __future__ import annotations

import pytest
import torch

from clasp.config import ClaspConfig, SamplingParams
from clasp.plan_exchange import LocalPlanner, PlanInput
from clasp.planner import plan_layers
from planner_service.contexts import SessionContexts
from serving.plan_wire import decode_tensor, encode_tensor

PROMPT = "Describe the water cycle in four sentences."


def decoder_side(engine, token_ids):
    runner = engine.runner
    cache = runner.new_cache(len(token_ids) + 4)
    hidden = []
    runner.forward(torch.tensor(token_ids), cache, 0, hidden_states=hidden)
    return cache, torch.stack([h[-1] for h in hidden])


def test_rebuilt_context_gives_the_decoders_plan(engine):
    ids = engine.encode(PROMPT)
    cache, hidden = decoder_side(engine, ids)
    expected, _ = plan_layers(engine.runner, cache, hidden, len(ids) - 1, 10)
    contexts = SessionContexts(engine.runner, max_sessions=2)
    got = contexts.plan("s1", PlanInput(0, encode_decode(hidden), len(ids) - 1, ids, 10))
    assert got.skip_sets == expected.skip_sets
    assert got.scores == pytest.approx(expected.scores, abs=1e-5)


def test_context_reuse_and_divergence(engine):
    """A longer history reuses the prefix; a different history is rebuilt, not mixed up."""
    contexts = SessionContexts(engine.runner, max_sessions=2)
    first = engine.encode(PROMPT)
    contexts.plan("s", PlanInput(0, decoder_side(engine, first)[1], len(first) - 1, first, 6))
    for ids in (first + engine.tokenizer(" Water evaporates from oceans")["input_ids"],
                engine.encode("A different question about volcanoes.")):
        cache, hidden = decoder_side(engine, ids)
        expected, _ = plan_layers(engine.runner, cache, hidden, len(ids) - 1, 6)
        got = contexts.plan("s", PlanInput(1, hidden, len(ids) - 1, ids, 6))
        assert got.skip_sets == expected.skip_sets


def test_sessions_are_bounded_lru(engine):
    contexts = SessionContexts(engine.runner, max_sessions=2)
    ids = engine.encode("Hi")
    hidden = decoder_side(engine, ids)[1]
    for session in ("a", "b", "a", "c"):
        contexts.plan(session, PlanInput(0, hidden, len(ids) - 1, ids, 2))
    assert len(contexts) == 2 and set(contexts._contexts) == {"a", "c"}


def test_sessions_are_bounded_by_bytes(engine):
    ids = engine.encode("Hi")
    hidden = decoder_side(engine, ids)[1]
    one = engine.runner.new_cache(256).nbytes()  # the smallest context capacity
    contexts = SessionContexts(engine.runner, max_sessions=10, max_bytes=one * 3 // 2)
    for session in ("a", "b"):
        contexts.plan(session, PlanInput(0, hidden, len(ids) - 1, ids, 2))
    assert set(contexts._contexts) == {"b"} and contexts.nbytes == one
    tiny = SessionContexts(engine.runner, max_sessions=10, max_bytes=1)  # the context being planned stays
    got = tiny.plan("c", PlanInput(0, hidden, len(ids) - 1, ids, 2))
    assert len(tiny) == 1 and got.skip_sets


def test_bad_plan_inputs_are_rejected(engine):
    contexts = SessionContexts(engine.runner, max_sessions=1)
    ids = engine.encode("Hi")
    hidden = decoder_side(engine, ids)[1]
    with pytest.raises(ValueError, match="hidden states have shape"):
        contexts.plan("s", PlanInput(0, hidden[:-1], len(ids) - 1, ids, 2))
    with pytest.raises(ValueError, match="token_ids has"):
        contexts.plan("s", PlanInput(0, hidden, len(ids) - 1, ids[:-1], 2))
    with pytest.raises(ValueError, match="max_skip"):
        contexts.plan("s", PlanInput(0, hidden, len(ids) - 1, ids, 30))


def encode_decode(t: torch.Tensor) -> torch.Tensor:
    return decode_tensor(encode_tensor(t))


def test_tensor_codec_roundtrip_and_errors():
    t = torch.randn(31, 576)
    assert torch.equal(encode_decode(t), t)
    assert encode_decode(t.to(torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="malformed safetensors"):
        decode_tensor(b"not safetensors")


class Exchange:
    """A stand-in planner process: answers with the local plan only after `delay` polls, or never."""

    def __init__(self, engine, delay: int | None) -> None:
        self.engine, self.delay = engine, delay
        self.contexts = SessionContexts(engine.runner, 1)
        self.pending, self.polls, self.submitted = None, 0, 0

    def submit(self, request):
        self.submitted += 1
        self.pending = self.contexts.plan("s", request)
        self.polls = 0

    def poll(self):
        self.polls += 1
        if self.delay is None or self.pending is None or self.polls <= self.delay:
            return None
        plan, self.pending = self.pending, None
        return plan


@pytest.mark.parametrize("delay", [None, 3], ids=["never", "late"])
def test_late_or_missing_plans_keep_output_exact(engine, delay):
    ids = engine.encode(PROMPT)
    params = SamplingParams(max_new_tokens=60)
    expected = engine.generate(ids, params, ClaspConfig(mode="ar")).token_ids
    config = ClaspConfig(mode="clasp", num_skip_layers=6, replan_interval=4)
    exchange = Exchange(engine, delay)
    result = None
    for chunk in engine.stream(ids, params, config, plan_exchange=exchange):
        result = chunk.result
    assert result.token_ids == expected
    assert exchange.submitted >= 2
    default = sorted(config.static_skips(30, True))
    assert result.plans[0].skip_set == default and result.plans[0].score is None
    if delay is None:
        assert len(result.plans) == 1
    else:
        assert any(p.score is not None and p.step > 0 for p in result.plans)


def test_local_planner_plans_on_the_decoder_cache(engine):
    ids = engine.encode(PROMPT)
    cache, hidden = decoder_side(engine, ids)
    local = LocalPlanner(engine.runner, cache)
    assert local.poll() is None
    local.submit(PlanInput(5, hidden, len(ids) - 1, ids, 4))
    plan = local.poll()
    assert plan.step == 5 and len(plan.skip_sets) == 5 and local.poll() is None
