"""Speculative rejection sampling keeps the target distribution exactly."""

from __future__ import annotations

import pytest
import torch

from clasp.config import ClaspConfig, SamplingParams
from clasp.verify import logits_to_probs, rejection_sample, verify_greedy

VOCAB = 6
TRIALS = 20000
# Chi-square critical value for 5 degrees of freedom at p = 0.001.
CHI2_CRITICAL = 20.52


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.fixture
def distributions():
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(3, VOCAB, generator=gen) * 1.5, dim=-1)  # target p_1..p_3 (K=2)
    q = torch.softmax(torch.randn(2, VOCAB, generator=gen) * 1.5, dim=-1)  # draft q_1..q_2, far from p
    return p, q


def first_tokens(p, q, sampler) -> torch.Tensor:
    """Empirical distribution of the first emitted token over TRIALS rounds."""
    gen = torch.Generator().manual_seed(2)
    counts = torch.zeros(VOCAB)
    for _ in range(TRIALS):
        drafts = torch.stack([torch.multinomial(q[i], 1, generator=gen)[0] for i in range(2)])
        tau, nxt = sampler(drafts, q, p, gen)
        counts[int(drafts[0]) if tau > 0 else nxt] += 1
    return counts


def test_rejection_sampling_matches_target(distributions):
    p, q = distributions
    counts = first_tokens(p, q, rejection_sample)
    assert chi_square(counts, p[0]) < CHI2_CRITICAL


def test_biased_sampler_fails_the_same_check(distributions):
    """The bound is tight enough to catch a sampler that accepts every draft."""
    p, q = distributions
    counts = first_tokens(p, q, lambda d, q_, p_, g: (2, int(torch.multinomial(p_[2], 1, generator=g))))
    assert chi_square(counts, p[0]) > CHI2_CRITICAL


def test_identical_distributions_accept_everything(distributions):
    p, _ = distributions
    gen = torch.Generator().manual_seed(3)
    for _ in range(200):
        drafts = torch.stack([torch.multinomial(p[i], 1, generator=gen)[0] for i in range(2)])
        tau, _ = rejection_sample(drafts, p[:2], p, gen)
        assert tau == 2


def test_greedy_verification():
    logits = torch.full((4, 10), -5.0)
    for row, tok in enumerate([3, 7, 1, 9]):
        logits[row, tok] = 5.0
    assert verify_greedy([3, 7, 1], logits) == (3, 9)  # all accepted, bonus token 9
    assert verify_greedy([3, 2, 1], logits) == (1, 7)  # second rejected, replaced by 7
    assert verify_greedy([0, 7, 1], logits) == (0, 3)


def test_top_k_and_top_p_warping():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (probs[0, 2:] == 0).all() and torch.isclose(probs.sum(), torch.tensor(1.0))
    full = torch.softmax(logits, dim=-1)[0]
    probs = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=float(full[0]) + 1e-3))
    assert (probs[0, :2] > 0).all() and (probs[0, 2:] == 0).all()


def test_seeded_sampling_is_reproducible_and_valid(engine):
    ids = engine.encode("Tell me a fact about cats.")
    params = SamplingParams(max_new_tokens=32, temperature=0.8, top_p=0.95, seed=7)
    a = engine.generate(ids, params, ClaspConfig(mode="clasp"))
    b = engine.generate(ids, params, ClaspConfig(mode="clasp"))
    assert a.token_ids == b.token_ids
    assert a.stats.num_draft_tokens > 0 and 0 < a.stats.acceptance_rate <= 1
