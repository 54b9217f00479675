"""Rolling the cache back after a rejected draft leaves it as a fresh pass would."""

from __future__ import annotations

import torch

from clasp.config import SamplingParams
from clasp.decoding import draft, verify


def test_rollback_then_continue_equals_fresh_pass(engine):
    runner = engine.runner
    prompt = engine.encode("List four animals that live in the ocean.")
    cache = runner.new_cache(len(prompt) + 32)
    logits = runner.forward(torch.tensor(prompt), cache, 0, last_only=True)
    first = int(logits.argmax())
    position = len(prompt)
    # A draft with many layers skipped writes KV for some layers at positions past `position`.
    proposal = draft(runner, cache, first, position, frozenset(range(2, 26)), 6, 0.0, SamplingParams(), None)
    # Force a rejection at the first draft: replace it with a token the model would not choose.
    proposal.token_ids[0] = (proposal.token_ids[0] + 1) % runner.spec.vocab_size
    result = verify(runner, cache, first, position, proposal, SamplingParams(), None, collect_hidden=False)
    assert result.accepted_length == 0
    assert cache.length == position + 1
    accepted = prompt + [first]
    continued = runner.forward(torch.tensor([result.next_token_id]), cache, position + 1)
    fresh_cache = runner.new_cache(len(accepted) + 1)
    fresh = runner.forward(torch.tensor(accepted + [result.next_token_id]), fresh_cache, 0, last_only=True)
    torch.testing.assert_close(continued, fresh, rtol=1e-4, atol=1e-4)


def test_truncate_bounds(engine):
    cache = engine.runner.new_cache(8)
    cache.truncate(8)
    for bad in (-1, 9):
        try:
            cache.truncate(bad)
        except ValueError as e:
            assert "truncate" in str(e)
        else:
            raise AssertionError("truncate accepted an out-of-range length")
