"""The sequence-parallel DP equals the naive per-(layer, skip count) loop, and the recurrence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clasp.planner import plan_layers, plan_layers_naive


def full_states(runner, token_ids: list[int]):
    """Prefill; return (cache, h_0..h_L of the last token [L+1, hidden], its position)."""
    cache = runner.new_cache(len(token_ids) + 8)
    hidden = []
    runner.forward(torch.tensor(token_ids), cache, 0, hidden_states=hidden)
    return cache, torch.stack([h[-1] for h in hidden]), len(token_ids) - 1


@pytest.mark.parametrize("max_skip", [0, 3, 12])
def test_batched_dp_equals_naive_loop(engine, max_skip):
    ids = engine.encode("Explain how a rainbow forms, step by step.")
    cache, hidden, position = full_states(engine.runner, ids)
    plan, g = plan_layers(engine.runner, cache, hidden, position, max_skip)
    naive, g_naive = plan_layers_naive(engine.runner, cache, hidden, position, max_skip)
    assert plan.skip_sets == naive.skip_sets
    assert len(g) == len(g_naive) == engine.runner.spec.num_layers + 1
    for a, b in zip(g, g_naive):
        # fp32 on different BLAS kernels (1-row vs M+1-row products) rounds differently: ~1e-4 here.
        # A wrong layer or context would differ by orders of magnitude more.
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert [len(s) for s in plan.skip_sets] == list(range(max_skip + 1))
    assert plan.skip_sets[0] == frozenset() and abs(plan.scores[0] - 1.0) < 1e-4


def test_dp_uses_the_context(engine):
    """Candidates attend over the real context: a different context gives different states."""
    runner = engine.runner
    ids = engine.encode("Explain how a rainbow forms, step by step.")
    cache, hidden, position = full_states(runner, ids)
    _, g = plan_layers(runner, cache, hidden, position, 4)
    other = cache.clone()
    for layer in range(runner.spec.num_layers):
        other.keys[layer][:, :, :position] = torch.flip(other.keys[layer][:, :, :position], dims=[2])
    _, g_other = plan_layers(runner, other, hidden, position, 4)
    assert not torch.allclose(g[-1][4], g_other[-1][4], atol=1e-3)


def test_dp_follows_the_recurrence_by_hand(tiny_runner):
    """L=4, M=2, written out: g[i][j] = argmax cos over {layer_i(g[i-1][j]), g[i-1][j-1]}."""
    runner = tiny_runner
    cache, h, pos = full_states(runner, [5, 9, 17, 33, 2, 40])
    plan, g = plan_layers(runner, cache, h, pos, 2)

    def f(i, state):  # layer i (1-based) on one state, through the ordinary decode path
        return runner.layer_single(state[None], i - 1, cache.clone(), pos)[0]

    def best(i, keep, skip):  # returns (state, skipped?)
        if keep is None:
            return skip, True
        if skip is None:
            return keep, False
        ck = F.cosine_similarity(keep, h[i], dim=0)
        cs = F.cosine_similarity(skip, h[i], dim=0)
        return (skip, True) if cs > ck else (keep, False)

    g1 = {0: (f(1, h[0]), frozenset()), 1: (h[0], frozenset({0}))}
    g2 = {}
    for j in range(3):
        keep = (f(2, g1[j][0]), g1[j][1]) if j in g1 else None
        skip = (g1[j - 1][0], g1[j - 1][1] | {1}) if j - 1 in g1 else None
        state, skipped = best(2, keep and keep[0], skip and skip[0])
        g2[j] = skip if skipped else keep
    g3, g4 = {}, {}
    for i, prev, cur in ((3, g2, g3), (4, g3, g4)):
        for j in range(3):
            keep = (f(i, prev[j][0]), prev[j][1]) if j in prev else None
            skip = (prev[j - 1][0], prev[j - 1][1] | {i - 1}) if j - 1 in prev else None
            _, skipped = best(i, keep and keep[0], skip and skip[0])
            cur[j] = skip if skipped else keep
    assert plan.skip_sets == tuple(g4[j][1] for j in range(3))
    for j in range(3):
        torch.testing.assert_close(g[4][j], g4[j][0], rtol=1e-5, atol=1e-5)
