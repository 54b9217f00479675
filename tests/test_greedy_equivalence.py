"""CLaSp greedy output equals plain greedy decoding, token for token."""

from __future__ import annotations

import pytest
import torch

from clasp.config import ClaspConfig, SamplingParams

# (prompt, chat template?, max_new_tokens): chat and raw, short and long, hitting EOS and the limit.
PROMPTS = [
    ("What is 2+2?", True, 64),  # short answer, ends with EOS
    ("Name three primary colors.", True, 64),
    ("Write a short poem about the sea.", True, 80),  # runs to the limit
    ("Translate to French: The weather is nice today and I want to go for a walk.", True, 64),
    ("Summarize: The Industrial Revolution began in Britain in the late 18th century. It brought "
     "mechanized textile production, steam power and new iron-making processes. Cities grew fast as "
     "people moved from farms to factories, and working conditions were often harsh. Over the next "
     "century the changes spread to Europe and North America, transforming economies and societies.", True, 72),
    ("The capital of France is", False, 40),  # raw continuation
    ("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", False, 64),
    ("Once upon a time, in a small village by the mountains, there lived", False, 56),
    ("Hi", True, 24),  # very short prompt
]


def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int, eos_ids) -> list[int]:
    inputs = torch.tensor([prompt_ids])
    out = hf_model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_new_tokens,
                            do_sample=False, pad_token_id=min(eos_ids), eos_token_id=sorted(eos_ids))
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def ar_outputs(engine):
    outputs = {}
    for prompt, chat, limit in PROMPTS:
        ids = engine.encode(prompt, chat=chat)
        outputs[prompt] = engine.generate(ids, SamplingParams(max_new_tokens=limit), ClaspConfig(mode="ar"))
    return outputs


def test_prompts_cover_eos_and_length(ar_outputs):
    reasons = {r.finish_reason for r in ar_outputs.values()}
    assert reasons == {"stop", "length"}


@pytest.mark.parametrize("prompt,chat,limit", PROMPTS, ids=[p[0][:24] for p in PROMPTS])
def test_ar_matches_transformers_generate(engine, hf_model, ar_outputs, prompt, chat, limit):
    ids = engine.encode(prompt, chat=chat)
    assert ar_outputs[prompt].token_ids == hf_greedy(hf_model, ids, limit, engine.eos_ids)


@pytest.mark.parametrize("prompt,chat,limit", PROMPTS, ids=[p[0][:24] for p in PROMPTS])
def test_clasp_matches_ar(engine, ar_outputs, prompt, chat, limit):
    ids = engine.encode(prompt, chat=chat)
    config = ClaspConfig(mode="clasp", num_skip_layers=8, replan_interval=4)
    result = engine.generate(ids, SamplingParams(max_new_tokens=limit), config)
    expected = ar_outputs[prompt]
    assert result.token_ids == expected.token_ids
    assert result.text == expected.text
    assert result.finish_reason == expected.finish_reason
    assert result.stats.num_draft_tokens > 0
    assert result.plans and all(len(p.skip_set) == 8 for p in result.plans)


@pytest.mark.parametrize("config", [
    ClaspConfig(),
    ClaspConfig(mode="clasp", num_skip_layers=0, draft_dtype=None),
    ClaspConfig(mode="clasp", num_skip_layers=15, max_draft_length=3, draft_exit_threshold=0.0),
    ClaspConfig(mode="static", num_skip_layers=6),
    ClaspConfig(mode="static", static_skip_set=(1, 5, 9, 20)),
    ClaspConfig(adaptive=False),
    ClaspConfig(mode="clasp", num_skip_layers=20, draft_dtype=None, ngram_size=0),
], ids=["defaults", "M0-fp32-draft", "M15-K3-no-exit", "static-M6", "static-explicit", "not-adaptive",
        "M20-shared-no-ngram"])
def test_other_settings_match_ar(engine, ar_outputs, config):
    for prompt, chat, limit in PROMPTS[2:5]:
        result = engine.generate(engine.encode(prompt, chat=chat), SamplingParams(max_new_tokens=limit), config)
        assert result.token_ids == ar_outputs[prompt].token_ids


def test_adaptive_m_drafts_with_several_skip_counts_and_matches_ar(engine, ar_outputs):
    """Adaptive M tries each skip count of the ladder (12, 9, 6, 3 for M=12 on shared weights);
    with it off, every model-drafted token skips exactly M layers. Output equals ar either way."""
    prompt, chat, limit = PROMPTS[2]
    ids, params = engine.encode(prompt, chat=chat), SamplingParams(max_new_tokens=limit)
    base = dict(mode="clasp", num_skip_layers=12, draft_dtype=None, ngram_size=0, replan_interval=4)
    adaptive = engine.generate(ids, params, ClaspConfig(**base, adaptive_skip=True))
    fixed = engine.generate(ids, params, ClaspConfig(**base))
    for result in (adaptive, fixed):
        assert result.token_ids == ar_outputs[prompt].token_ids
        assert result.stats.num_model_draft_tokens > 0
    assert fixed.stats.mean_skipped_layers == 12
    assert 3 <= adaptive.stats.mean_skipped_layers < 12  # every rung was tried at least once


def test_empty_skip_set_accepts_every_draft(engine):
    """The draft with no layers skipped and the same fp32 weights is the full model."""
    # Not adaptive: a draft as costly as the full model never pays, so the controller would stop it.
    config = ClaspConfig(mode="static", static_skip_set=(), draft_dtype=None, max_draft_length=4,
                         draft_exit_threshold=0.0, adaptive=False)
    result = engine.generate(engine.encode(PROMPTS[2][0]), SamplingParams(max_new_tokens=40, ignore_eos=True), config)
    assert result.stats.num_draft_tokens > 0
    assert result.stats.num_accepted_tokens == result.stats.num_draft_tokens


def test_stop_string_truncates(engine, ar_outputs):
    prompt, chat, limit = PROMPTS[2]
    reference = ar_outputs[prompt].text
    stop = reference.split()[3]
    params = SamplingParams(max_new_tokens=limit, stop=[stop])
    result = engine.generate(engine.encode(prompt, chat=chat), params, ClaspConfig(mode="clasp"))
    assert result.finish_reason == "stop_string"
    assert result.text == reference[:reference.find(stop)]
    assert engine.tokenizer.decode(result.token_ids, skip_special_tokens=True).find(stop) >= 0
    assert stop not in engine.tokenizer.decode(result.token_ids[:-1], skip_special_tokens=True)


@pytest.mark.parametrize("prompt", [PROMPTS[2][0], "Translate to Chinese and Japanese: I love green tea. 🍵"])
def test_streamed_text_equals_final_text(engine, prompt):
    chunks = list(engine.stream(engine.encode(prompt), SamplingParams(max_new_tokens=48)))
    result = chunks[-1].result
    assert "".join(c.text for c in chunks) == result.text
    assert result.text == engine.tokenizer.decode(result.token_ids, skip_special_tokens=True)
    assert sum((c.token_ids for c in chunks), []) == chunks[-1].result.token_ids
