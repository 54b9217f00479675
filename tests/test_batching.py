"""Continuous batching in the core: requests share each forward pass through the slot KV cache,
join and leave at round boundaries, and each one's greedy output equals what it gives alone."""

from __future__ import annotations

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


def test_batch_policy_runs_the_fastest_cap_and_keeps_trying_the_others():
    from clasp.scheduler import BatchPolicy

    policy = BatchPolicy(warm_steps=1, interval=4, max_interval=16)
    assert policy.cap(1) is None  # a single stream: its own controller decides
    rates = {0: 60, 1: 65, 2: 70, 4: 45, None: 40}  # tokens per second of each cap at 8 streams
    warm = []
    for _ in range(4):  # plain first, then longer and longer drafts, until one clearly loses
        cap = policy.cap(8)
        warm.append(cap)
        policy.observe(8, cap, rates[cap], 1.0)
    assert warm == [0, 1, 2, 4] and policy.best(8) == 2
    assert policy.best(7) == 2 and policy.best(4) is None  # 5-8 streams share figures; 3-4 have none yet
    choices = []
    for _ in range(64):
        cap = policy.cap(8)
        choices.append(cap)
        policy.observe(8, cap, rates[cap], 1.0)
    assert choices.count(2) >= 56  # the fastest cap runs; the others are re-tried, less and less often
    assert set(choices) == set(BatchPolicy.CAPS)  # every other cap was tried again, the unwarmed one too
    assert policy.interval[8] == 16  # no try won: the interval grew to its limit
    rates[0] = 200  # plain steps got faster (say, acceptance fell): the next try of 0 wins and stays
    for _ in range(80):
        cap = policy.cap(8)
        policy.observe(8, cap, rates[cap], 1.0)
    assert policy.best(8) == 0
    assert policy.rates[(8, 0)] > policy.rates[(8, 2)]


def test_plain_decoding_batches_do_not_teach_the_policy(engine):
    """The draft cap only matters where a request may draft: steps of ar-only batches are not
    measured (they would make every cap look as cheap as a plain step); clasp batches are."""
    scheduler = Scheduler(engine, num_slots=2, slot_tokens=256)
    prompts = [engine.encode(p) for p in PROMPTS[:2]]
    for mode, measured in (("ar", False), ("clasp", True)):
        for p in prompts:
            scheduler.admit(p, SamplingParams(max_new_tokens=12), ClaspConfig(mode=mode))
        while scheduler.active:
            scheduler.step()
        assert bool(scheduler.policy.rates) == measured, mode
