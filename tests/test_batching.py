"""Continuous batching in the core: requests share each forward pass through the slot KV cache,
join and leave at round boundaries, and each one's greedy output equals what it gives alone."""

from __future__ import annotations

import random

import pytest
import torch

from clasp.config import ClaspConfig, SamplingParams
from clasp.model_runner import Segment
from clasp.scheduler import Scheduler

PROMPTS = ["Write a short poem about the sea.", "Name three primary colors.", "What is 12 times 7?",
           "Explain why the sky is blue in two sentences.", "List the days of the week."]


def test_batched_forward_equals_each_segment_alone(engine):
    """Ragged rows of several slots in one pass: each segment's logits equal its own pass."""
    runner = engine.runner
    ids = [torch.tensor(engine.encode(p)) for p in PROMPTS[:3]]
    batched = runner.new_cache(128, num_slots=3)
    for slot, t in enumerate(ids):
        runner.forward(t[:-3], batched, 0, slot=slot)
    segments = [Segment(slot, len(t) - 3, t[-3:]) for slot, t in enumerate(ids)]
    segments[1] = Segment(1, len(ids[1]) - 3, ids[1][-3:-2])  # one single-token row among multi-token ones
    got = runner.forward_batch(segments, batched)
    row = 0
    for slot, (t, seg) in enumerate(zip(ids, segments)):
        alone = runner.new_cache(128)
        runner.forward(t[:-3], alone, 0)
        expected = runner.forward(seg.token_ids, alone, seg.start)
        torch.testing.assert_close(got[row:row + seg.num_tokens], expected, rtol=1e-4, atol=1e-4)
        assert batched.lengths[slot] == seg.start + seg.num_tokens
        row += seg.num_tokens


def test_batched_draft_with_different_skip_sets(engine):
    """One draft call for requests with different skip sets equals each request's own draft."""
    runner = engine.runner
    ids = [torch.tensor(engine.encode(p)) for p in PROMPTS[:3]]
    skips = [frozenset({3, 7, 11}), frozenset(), frozenset({5, 6})]
    batched = runner.new_cache(128, num_slots=3)
    for slot, t in enumerate(ids):
        runner.forward(t[:-1], batched, 0, slot=slot)
    segments = [Segment(s, len(t) - 1, t[-1:], k) for s, (t, k) in enumerate(zip(ids, skips))]
    got = runner.forward_batch(segments, batched, draft=False)
    for i, (t, k) in enumerate(zip(ids, skips)):
        alone = runner.new_cache(128)
        runner.forward(t[:-1], alone, 0)
        torch.testing.assert_close(got[i:i + 1], runner.forward(t[-1:], alone, len(t) - 1, k), rtol=1e-4, atol=1e-4)


def test_batched_draft_step_equals_each_request_alone(engine):
    """Several requests' draft tokens in one multi-row fused call (weights read once for all rows)
    equal each request's own draft through the same kernel, skip sets and all, and propose what one
    fused call per request proposes (that path normalizes in double precision before quantizing
    activations, so its logits may differ by an activation rounded the other way)."""
    runner = engine.runner
    if runner.fused_draft is None:
        pytest.skip("no fused CPU draft on this machine")
    ids = [torch.tensor(engine.encode(p)) for p in PROMPTS[:4]]
    skips = [frozenset(), frozenset({4, 9}), frozenset(), frozenset({2})]
    saved = runner.fused_draft_max_rows
    outputs = {}
    try:
        for max_rows in (1, 64):  # 1: one multi-row call from two requests on; 64: one fused call each
            runner.fused_draft_max_rows = max_rows
            cache = runner.new_cache(128, num_slots=4)
            for slot, t in enumerate(ids):
                runner.forward(t[:-1], cache, 0, slot=slot)
            outputs[max_rows] = runner.draft_step([int(t[-1]) for t in ids], [0, 1, 2, 3], [len(t) - 1 for t in ids],
                                                  skips, cache)
            assert cache.lengths == [len(t) for t in ids]
    finally:
        runner.fused_draft_max_rows = saved
    for i, (t, k) in enumerate(zip(ids, skips)):
        alone = runner.new_cache(128)
        runner.forward(t[:-1], alone, 0)
        expected = runner.forward_batch([Segment(0, len(t) - 1, t[-1:], k)], alone, draft=True)
        torch.testing.assert_close(outputs[1][i:i + 1], expected, rtol=1e-5, atol=1e-5)
    agree = (outputs[1].argmax(-1) == outputs[64].argmax(-1)).sum()
    assert agree >= 3, f"batched and fused drafts proposed different tokens for {4 - int(agree)} of 4 requests"


@pytest.mark.parametrize("mode", ["ar", "clasp"])
def test_streams_joining_and_leaving_equal_their_solo_output(engine, mode):
    """Five greedy requests of different lengths; two join after the others have started and the
    short ones leave early. Every output equals the same request decoded alone."""
    lengths = [40, 12, 28, 20, 8]
    config = ClaspConfig(mode=mode)
    prompts = [engine.encode(p) for p in PROMPTS]
    solo = [engine.generate(p, SamplingParams(max_new_tokens=n), ClaspConfig(mode="ar")).token_ids
            for p, n in zip(prompts, lengths)]
    scheduler = Scheduler(engine, num_slots=3, slot_tokens=256)
    pending = list(range(len(prompts)))
    requests, results = {}, {}
    rounds = 0
    while pending or scheduler.active:
        while pending and scheduler.has_free_slot() and (rounds > 2 or len(requests) < 2):
            i = pending.pop(0)
            requests[i] = scheduler.admit(prompts[i], SamplingParams(max_new_tokens=lengths[i]), config)
        for req, chunk in scheduler.step():
            if chunk.result is not None:
                results[next(i for i, r in requests.items() if r is req)] = chunk.result
        rounds += 1
        assert rounds < 500
    assert len(results) == len(prompts)
    for i, expected in enumerate(solo):
        assert results[i].token_ids == expected, f"request {i} differs in the batch"
    assert sorted(scheduler.free) == [0, 1, 2]


def test_scheduler_bounds_and_release(engine):
    scheduler = Scheduler(engine, num_slots=1, slot_tokens=64)
    prompt = engine.encode("Hello there")
    with pytest.raises(ValueError, match="prompt"):
        scheduler.admit(list(range(1, 70)), SamplingParams(), ClaspConfig())
    req = scheduler.admit(prompt, SamplingParams(max_new_tokens=1000), ClaspConfig())
    assert req.max_new_tokens == 64 - len(prompt)  # clipped to the slot
    with pytest.raises(RuntimeError, match="slot"):
        scheduler.admit(prompt, SamplingParams(), ClaspConfig())
    scheduler.step()
    scheduler.release(req)
    assert scheduler.has_free_slot() and not scheduler.active
    assert scheduler.kv_nbytes == engine.runner.new_cache(64).nbytes()


def _planned(acceptance: float, draft_call_s: float, draft_row_s: float, verify_row_s: float, n: int = 8,
             length: int = 6, seeded: int | None = None) -> list[int]:
    """The lengths a BatchPlanner gives n requests that each chose a `length`-token model draft,
    with acceptance `acceptance` per position, after it measured the given costs (request `seeded`
    samples with a seed)."""
    import types

    from clasp.controller import MODEL, DraftController, RoundChoice
    from clasp.scheduler import BatchPlanner

    planner = BatchPlanner()
    for calls, rows in ((1, 1), (4, 10), (6, 30), (2, 16)):  # a few rounds of measured costs
        planner.draft.observe(calls, rows, calls * draft_call_s + rows * draft_row_s)
    for rows in (n, 2 * n, 4 * n):
        planner.verify.observe(rows, 0.020 + rows * verify_row_s)
    reqs, choices = [], []
    for i in range(n):
        controller = DraftController(8)
        rng = random.Random(i)
        for _ in range(200):  # what it has seen accepted: each position with the same rate
            accepted = 0
            while accepted < 8 and rng.random() < acceptance:
                accepted += 1
            controller.models[0].observe(8, accepted)
        choice = RoundChoice(MODEL, length, num_skip=0)
        params = SamplingParams(temperature=0.8, seed=1) if i == seeded else SamplingParams()
        choices.append(choice)
        reqs.append(types.SimpleNamespace(controller=controller, params=params))
    planner.plan(reqs, choices)
    return [c.num_draft for c in choices]


def test_batch_planner_cuts_drafts_where_they_stop_paying():
    """Cheap drafts and good acceptance keep the requests' own lengths; drafts that cost as much as
    the rows they save are cut to plain steps; in between, lengths fall."""
    keep = _planned(0.95, draft_call_s=0.001, draft_row_s=0.0001, verify_row_s=0.0002)
    assert keep == [6] * 8
    plain = _planned(0.3, draft_call_s=0.006, draft_row_s=0.003, verify_row_s=0.0015)
    assert plain == [0] * 8
    some = _planned(0.7, draft_call_s=0.002, draft_row_s=0.0005, verify_row_s=0.0008)
    assert all(0 < k < 6 for k in some), some


def test_batch_planner_leaves_seeded_sampling_and_single_requests_alone():
    """A request that samples with a seed keeps its own (fixed-cost) choice, so its tokens do not
    depend on the batch; a batch of one is its controller's alone."""
    got = _planned(0.3, draft_call_s=0.006, draft_row_s=0.003, verify_row_s=0.0015, seeded=2)
    assert got[2] == 6 and sum(got[:2] + got[3:]) <= 7  # the others are cut (its draft calls run anyway)
    assert _planned(0.3, draft_call_s=0.006, draft_row_s=0.003, verify_row_s=0.0015, n=1) == [6]


def test_batch_planner_learns_from_clasp_batches(engine):
    """ar batches only measure verification (they draft nothing, so nothing is planned); clasp
    batches measure the draft too, and then the planner plans their rounds."""
    scheduler = Scheduler(engine, num_slots=2, slot_tokens=256)
    prompts = [engine.encode(p) for p in PROMPTS[:2]]
    for mode, planned in (("ar", False), ("clasp", True)):
        for p in prompts:
            scheduler.admit(p, SamplingParams(max_new_tokens=24), ClaspConfig(mode=mode))
        while scheduler.active:
            scheduler.step()
        assert scheduler.planner.verify.known
        assert scheduler.planner.draft.known == planned and bool(scheduler.planner.rounds) == planned, mode


def test_a_prompt_is_read_in_small_pieces_only_while_others_decode(engine):
    """Alone, a prompt is read in the request's own pieces (one pass here); while another request
    decodes, in the scheduler's smaller pieces, so each step holds the other for one piece. The
    output is the same either way."""
    prompt = engine.encode(" ".join(["Tell me about the history of the city of Rome."] * 8))
    assert 100 < len(prompt) < 512
    config, params = ClaspConfig(mode="ar"), SamplingParams(max_new_tokens=6)
    solo = engine.generate(prompt, params, config).token_ids

    def prefill_steps(scheduler, req) -> int:
        steps = 0
        while req.prefilling:
            scheduler.step()
            steps += 1
        while scheduler.active:
            scheduler.step()
        return steps

    scheduler = Scheduler(engine, num_slots=2, slot_tokens=1024, prefill_chunk_tokens=32)
    alone = scheduler.admit(prompt, params, config)
    assert prefill_steps(scheduler, alone) == 1 and alone.result.token_ids == solo
    other = scheduler.admit(engine.encode("Count from one to ten."), SamplingParams(max_new_tokens=200), config)
    while other.prefilling:
        scheduler.step()
    beside = scheduler.admit(prompt, params, config)
    steps = 0
    while beside.prefilling:
        scheduler.step()
        steps += 1
    assert steps == -(-len(prompt) // 32)  # pieces of 32 tokens while `other` decodes
    while not beside.finished:
        scheduler.step()
    assert beside.result.token_ids == solo
    scheduler.release(other)


def test_a_draft_the_planner_cuts_asks_for_no_plan(engine):
    """Where the batch planner cuts a request's model draft to a plain step, the request has not
    drafted: its first plan request stays held (no DP runs for it) and no re-plan round is counted."""
    scheduler = Scheduler(engine, num_slots=2, slot_tokens=256)
    planner = scheduler.planner
    planner.draft.observe(1, 1, 1.0)  # measured: a draft call costs a second, so no draft pays
    planner.verify.observe(2, 0.02)
    config = ClaspConfig(mode="clasp", num_skip_layers=6)
    first = scheduler.admit(engine.encode(PROMPTS[0]), SamplingParams(max_new_tokens=40), config)
    while first.prefilling:
        scheduler.step()
    second = scheduler.admit(engine.encode(PROMPTS[1]), SamplingParams(max_new_tokens=40), config)
    while second.prefilling:
        scheduler.step()
    assert second.schedule.dynamic and second.first_plan_input is not None
    for _ in range(4):  # both decoding: every draft is cut
        scheduler.step()
    assert second.stats.num_model_draft_tokens == 0
    assert second.first_plan_input is not None and second.schedule.model_rounds_since_plan == 0
    for req in list(scheduler.active):
        scheduler.release(req)
