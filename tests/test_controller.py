"""The draft controller and context (n-gram) drafts: choices follow the measurements, output stays exact."""

from __future__ import annotations

import torch

from clasp.config import ClaspConfig, SamplingParams
from clasp.controller import MODEL, NGRAM, PLAIN, DraftController, NgramIndex, VerifyCost
from clasp.verify import rejection_sample
from tests.test_sampling import CHI2_CRITICAL, VOCAB, chi_square


def test_ngram_lookup_returns_the_most_recent_continuation():
    index = NgramIndex(max_n=3)
    index.extend([1, 2, 3, 4, 9, 2, 3, 5, 7, 2, 3])
    assert index.lookup(4) == [5, 7, 2, 3]  # "2 3" last continued with 5 (the later match wins)
    index.extend([4])
    assert index.lookup(2) == [9, 2]  # "2 3 4" matched at length 3 before "3 4" at length 2
    assert NgramIndex(max_n=3).lookup(4) == []
    index.extend([42])
    assert index.lookup(4) == []  # 42 never occurred before


def test_verify_cost_fits_a_line():
    cost = VerifyCost(decay=1.0)
    for rows in (1, 3, 5, 2, 8):
        cost.observe(rows, 0.060 + 0.002 * (rows - 1))
    v1, slope = cost.line()
    assert abs(v1 - 0.060) < 1e-9 and abs(slope - 0.002) < 1e-9


def play(controller: DraftController, rounds: int, rate_of, token_cost_of, verify_cost: float):
    """Play rounds where each model-drafted token of a round's choice is accepted with a fixed
    pattern of rate rate_of(choice) and costs token_cost_of(choice) seconds. Returns the choices."""
    choices = []
    for r in range(rounds):
        choice = controller.choose(budget=8)
        choices.append(choice)
        drafted = choice.num_draft if choice.source == MODEL else 0
        tau = 0
        while tau < drafted and ((r * 7 + tau * 3) % 100) < rate_of(choice) * 100:
            tau += 1
        controller.observe(choice, drafted, tau, drafted * token_cost_of(choice), verify_cost + 0.001 * drafted)
    return choices


def feed(controller: DraftController, rounds: int, accept_rate: float, draft_cost: float, verify_cost: float):
    """Rounds where every model-drafted token is accepted at accept_rate and costs draft_cost."""
    return play(controller, rounds, lambda c: accept_rate, lambda c: draft_cost, verify_cost)


def test_controller_stops_a_draft_that_does_not_pay_and_probes_it_again():
    controller = DraftController(max_draft_length=8, min_backoff=8, max_backoff=32)
    # A draft step costs 60% of a full step, and 20% of drafts are accepted: speculation loses.
    choices = feed(controller, 200, accept_rate=0.2, draft_cost=0.036, verify_cost=0.060)
    sources = [c.source for c in choices]
    assert sources[0] == MODEL  # nothing measured yet
    assert sources.count(PLAIN) > 150
    probes = [i for i, s in enumerate(sources) if s == MODEL and i > 10]
    assert probes, "the model draft is never probed again"
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps and max(gaps) >= 32  # the back-off grew to its cap


def test_controller_keeps_drafting_when_it_pays():
    controller = DraftController(max_draft_length=8)
    choices = feed(controller, 100, accept_rate=0.95, draft_cost=0.015, verify_cost=0.060)
    assert all(c.source == MODEL for c in choices)
    assert sum(c.num_draft for c in choices[10:]) / 90 > 5  # long drafts


def play_skip_counts(controller: DraftController, rounds: int, accept: dict[int, float], step: float = 0.060):
    """Rounds where a draft skipping j layers costs (30 - j) / 30 of a step per token and each of its
    tokens is accepted with probability accept[j] (deterministic pattern). Returns the choices."""
    return play(controller, rounds, lambda c: accept[c.num_skip], lambda c: step * (30 - (c.num_skip or 0)) / 30, step)


def test_adaptive_m_settles_on_the_skip_count_with_most_tokens_per_second():
    ladder = (16, 12, 8, 4)
    units = lambda j: (30 - j) / 30  # noqa: E731: a draft token's cost, relative
    # Deep skipping is rarely accepted, light skipping costs nearly a full step: 12 wins.
    accept = {16: 0.15, 12: 0.85, 8: 0.9, 4: 0.95}
    choices = play_skip_counts(DraftController(8, skip_counts=ladder, draft_units=units), 200, accept)
    used = [c.num_skip for c in choices if c.source == MODEL]
    assert set(used[:6]) == set(ladder)  # every rung tried early
    late = used[len(used) // 2:]
    assert late.count(12) > 0.8 * len(late)
    # When the deepest skip is accepted as often as the rest, it is the cheapest: it wins.
    choices = play_skip_counts(DraftController(8, skip_counts=ladder, draft_units=units), 200,
                               dict.fromkeys(ladder, 0.9))
    late = [c.num_skip for c in choices[100:] if c.source == MODEL]
    assert late.count(16) > 0.8 * len(late)


def test_controller_prefers_a_context_draft_with_high_acceptance():
    controller = DraftController(max_draft_length=8)
    feed(controller, 20, accept_rate=0.5, draft_cost=0.030, verify_cost=0.060)
    for _ in range(10):  # the context's continuations are always right
        controller.observe(controller.choose(8, [5, 6, 7, 8, 9, 10]), 6, 6, 0.0, 0.070)
    choice = controller.choose(8, [5, 6, 7, 8, 9, 10])
    assert choice.source == NGRAM and choice.ngram == [5, 6, 7, 8, 9, 10]


def test_one_hot_context_draft_keeps_the_target_distribution():
    """A context draft proposes a fixed token (q one-hot); rejection sampling must still emit p."""
    gen = torch.Generator().manual_seed(5)
    p = torch.softmax(torch.randn(2, VOCAB, generator=gen) * 1.5, dim=-1)
    q = torch.zeros(1, VOCAB)
    q[0, 2] = 1.0
    counts = torch.zeros(VOCAB)
    for _ in range(20000):
        tau, nxt = rejection_sample(torch.tensor([2]), q, p, gen)
        counts[2 if tau else nxt] += 1
    assert chi_square(counts, p[0]) < CHI2_CRITICAL


def test_adaptive_decoding_falls_back_to_plain_steps_and_stays_exact(engine):
    """A draft skipping 20 of 30 layers on the shared fp32 weights costs ~40% of a step and is rarely
    right: not adaptive, it drafts every round; adaptive, it mostly decodes plainly. Same output."""
    ids = engine.encode("Write a short poem about the sea.")
    params = SamplingParams(max_new_tokens=48, ignore_eos=True)
    ar = engine.generate(ids, params, ClaspConfig(mode="ar"))
    bad = dict(mode="static", num_skip_layers=20, draft_dtype=None, ngram_size=0)
    fixed = engine.generate(ids, params, ClaspConfig(adaptive=False, **bad))
    adaptive = engine.generate(ids, params, ClaspConfig(**bad))
    assert fixed.token_ids == ar.token_ids == adaptive.token_ids
    assert fixed.stats.num_plain_rounds <= 1  # only when no draft budget is left
    assert adaptive.stats.num_plain_rounds > adaptive.stats.num_rounds / 2
    assert adaptive.stats.num_draft_tokens < fixed.stats.num_draft_tokens / 3


def test_context_drafts_are_used_on_repeated_text_and_stay_exact(engine):
    """With a weak model draft, the controller takes the prompt's continuation where the output copies it."""
    weak = ClaspConfig(mode="static", num_skip_layers=20, draft_dtype=None)
    text = ("The quick brown fox jumps over the lazy dog while the farmer watches from the porch "
            "and the cat sleeps in the warm afternoon sun.")
    ids = engine.encode(f"Repeat this sentence exactly, three times:\n{text}")
    params = SamplingParams(max_new_tokens=64)
    ar = engine.generate(ids, params, ClaspConfig(mode="ar"))
    result = engine.generate(ids, params, weak)
    assert result.token_ids == ar.token_ids
    assert result.stats.num_ngram_accepted_tokens > 10
    sampled = engine.generate(ids, SamplingParams(max_new_tokens=32, temperature=0.7, seed=3), weak)
    assert len(sampled.token_ids) == 32 or sampled.finish_reason == "stop"
    assert sampled.stats.num_ngram_draft_tokens > 0  # the one-hot path of rejection sampling ran
