"""Verification of drafted tokens: exact greedy matching and speculative rejection sampling.

Terms (per verification round, with K drafted tokens):
- accepted tokens: the leading drafted tokens the full model agrees with; their count is the
  accepted length tau (0..K). tau never counts the extra token below.
- resampled token: when draft i is rejected, the full model's replacement for it, drawn from
  the residual distribution norm(max(p_i - q_i, 0)) (greedy: the full model's argmax).
- bonus token: when all K drafts are accepted, one more token from the full model's p_{K+1}.
Each round therefore emits tau + 1 tokens. This keeps the output distribution exactly the
full model's (Leviathan et al. 2023; Chen et al. 2023).
"""

from __future__ import annotations

import torch

from clasp.config import SamplingParams


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Warp logits [N, vocab] by temperature, top-k and top-p; return probabilities [N, vocab]."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row of probs [N, vocab] -> [N]."""
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def verify_greedy(draft_ids: list[int], target_logits: torch.Tensor) -> tuple[int, int]:
    """draft_ids: K tokens; target_logits: [K+1, vocab]. Returns (tau, next token id)."""
    target_ids = target_logits.argmax(-1).tolist()  # the round's one host sync
    tau = 0
    while tau < len(draft_ids) and draft_ids[tau] == target_ids[tau]:
        tau += 1
    return tau, target_ids[tau]


def rejection_sample(
    draft_ids: torch.Tensor,  # [K] int64
    draft_probs: torch.Tensor,  # [K, vocab], q_i: the draft's warped distribution at step i
    target_probs: torch.Tensor,  # [K+1, vocab], p_i: the full model's warped distribution
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Speculative rejection sampling. Returns (tau, resampled-or-bonus token id)."""
    k = draft_ids.shape[0]
    rows = torch.arange(k, device=draft_ids.device)
    p = target_probs[rows, draft_ids]
    q = draft_probs[rows, draft_ids]
    u = torch.rand(k, generator=generator, device=draft_ids.device)
    # Accept draft i with probability min(1, p/q); q > 0 because the draft sampled it.
    rejected = u * q > p
    tau = int(rejected.int().argmax()) if bool(rejected.any()) else k  # one host sync
    if tau == k:
        return k, int(sample(target_probs[k:k + 1], generator))
    residual = (target_probs[tau] - draft_probs[tau]).clamp_min(0)
    total = residual.sum()
    if total <= 0:  # p == q exactly: rejection had probability 0 (kept for float safety)
        residual, total = target_probs[tau], target_probs[tau].sum()
    return tau, int(sample((residual / total)[None], generator))
