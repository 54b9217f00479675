"""The CLaSp layer-skip DP (paper, Algorithm 1), in its sequence-parallel form.

Given the full model's hidden states h_0..h_L of the last accepted token, g[i][j] is the best
approximation of h_i reachable after the first i layers with exactly j of them skipped:

    g[i][j] = argmax_{c in {layer_i(g[i-1][j]), g[i-1][j-1]}} cos(c, h_i)

The first candidate runs layer i on the state that skipped j layers so far; the second skips
layer i. Candidates of layer i for all j are evaluated in one batched call that attends over
the real context (the token's KV cache, positions before it) plus each candidate's own KV.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F

from clasp.kv_cache import KVCache
from clasp.model_runner import ModelRunner


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Skip sets for every skip count j = 0..max_skip, computed at verification step `step`."""

    skip_sets: tuple[frozenset[int], ...]  # index j: the j layers to skip
    scores: tuple[float, ...]  # index j: cos(g[L][j], h_L)
    step: int
    seconds: float = 0.0

    def skip_set(self, num_skip: int) -> frozenset[int]:
        return self.skip_sets[min(num_skip, len(self.skip_sets) - 1)]

    def score(self, num_skip: int) -> float:
        return self.scores[min(num_skip, len(self.scores) - 1)]


def _run_dp(hidden: torch.Tensor, max_skip: int, apply_layer) -> tuple[list[torch.Tensor], list[frozenset[int]]]:
    """The DP driver. apply_layer(i, states [J, hidden]) -> layer i (0-based) applied to each row.

    Returns g (g[i]: [min(i, M)+1, hidden], row j = g[i][j]) and the skip set of g[L][j] for each j.
    Choices stay on the device; the skip sets are read back once, by backtracking.
    """
    num_layers = hidden.shape[0] - 1
    g = [hidden[0:1]]  # g[0][0] = h_0
    skipped_rows: list[torch.Tensor] = []  # skipped_rows[i-1][j]: g[i][j] came from g[i-1][j-1]
    for i in range(1, num_layers + 1):
        prev = g[i - 1]
        width = min(i, max_skip) + 1  # j = 0..min(i, M)
        target = hidden[i].float()[None]
        # Candidate "run layer i" exists for j < len(prev); "skip layer i" for j >= 1.
        keep = apply_layer(i - 1, prev)[:width]
        keep_cos = F.cosine_similarity(keep.float(), target, dim=-1)
        skip_cos = F.cosine_similarity(prev[: width - 1].float(), target, dim=-1)
        pad = torch.full((1,), float("-inf"), device=hidden.device)
        keep_cos = torch.cat([keep_cos, pad])[:width] if keep.shape[0] < width else keep_cos
        skip_cos = torch.cat([pad, skip_cos])
        choose_skip = skip_cos > keep_cos  # ties keep the layer
        keep_states = torch.cat([keep, prev[-1:]])[:width]  # padded row is never chosen
        skip_states = torch.cat([prev[:1], prev[: width - 1]])  # row 0 is never chosen
        g.append(torch.where(choose_skip[:, None], skip_states, keep_states))
        skipped_rows.append(choose_skip)
    width = g[-1].shape[0]
    flat = torch.cat(skipped_rows).tolist()  # the plan's one host sync (one copy, not one per layer)
    decisions, at = [], 0
    for row in skipped_rows:
        decisions.append(flat[at:at + row.shape[0]])
        at += row.shape[0]
    sets = []
    for j_final in range(width):
        j, layers = j_final, set()
        for i in range(num_layers, 0, -1):
            if decisions[i - 1][j]:
                layers.add(i - 1)
                j -= 1
        sets.append(frozenset(layers))
    return g, sets


def plan_layers(runner: ModelRunner, cache: KVCache, hidden: torch.Tensor, position: int, max_skip: int,
                step: int = 0, draft: bool = False, slot: int = 0) -> tuple[LayerPlan, list[torch.Tensor]]:
    """Run the sequence-parallel DP.

    hidden: [L+1, hidden] states h_0..h_L of the token at `position` from the full model;
    the cache's `slot` must hold the full model's KV for positions < position. Returns the plan and g.
    """
    if hidden.is_cuda:  # work queued before the plan (a prefill) must not count as DP time
        torch.cuda.synchronize(hidden.device)
    started = time.perf_counter()
    with torch.inference_mode():
        g, sets = _run_dp(hidden, max_skip,
                          lambda i, states: runner.layer_candidates(states, i, cache, position, draft=draft,
                                                                     slot=slot))
    return _finish(g, sets, hidden, step, time.perf_counter() - started), g


def plan_layers_naive(runner: ModelRunner, cache: KVCache, hidden: torch.Tensor, position: int, max_skip: int,
                      step: int = 0) -> tuple[LayerPlan, list[torch.Tensor]]:
    """The same DP with one ordinary single-token layer call per (i, j): the test reference."""
    started = time.perf_counter()
    scratch = cache.clone()

    def apply_layer(i: int, states: torch.Tensor) -> torch.Tensor:
        return torch.cat([runner.layer_single(states[j:j + 1], i, scratch, position) for j in range(states.shape[0])])

    with torch.inference_mode():
        g, sets = _run_dp(hidden, max_skip, apply_layer)
    return _finish(g, sets, hidden, step, time.perf_counter() - started), g


def _finish(g, sets, hidden, step, seconds) -> LayerPlan:
    scores = F.cosine_similarity(g[-1].float(), hidden[-1].float()[None], dim=-1)
    return LayerPlan(tuple(sets), tuple(scores.tolist()), step, seconds)
