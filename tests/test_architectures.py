"""`--model PATH` works for every supported family: tiny random models saved as real HF
directories load through Engine.load and match transformers' logits and greedy output."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from clasp.config import ClaspConfig, SamplingParams
from clasp.engine import Engine
from clasp.loading import embedded_model_dir

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, vocab_size=49152, tie_word_embeddings=False)
FAMILIES = {
    "llama-rope-llama3": ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 64})),
    "mistral": ("mistral", dict(sliding_window=None)),
    "qwen2-qkv-bias": ("qwen2", dict(use_sliding_window=False)),
    "qwen3-qk-norm": ("qwen3", dict(head_dim=16, use_sliding_window=False)),
}


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def tiny_model_dir(request, tmp_path_factory, engine):
    model_type, extra = FAMILIES[request.param]
    config = AutoConfig.for_model(model_type, **TINY, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # every tensor random (biases and norms init to 0 and 1: they must count)
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
            else:
                p.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    engine.tokenizer.save_pretrained(path)  # any tokenizer with this vocabulary will do
    return path, model


def test_logits_match_transformers(tiny_model_dir):
    path, hf_model = tiny_model_dir
    engine = Engine.load(path, ClaspConfig(), device="cpu", dtype="float32")
    ids = list(range(300, 340))
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids])).logits[0]
    cache = engine.runner.new_cache(64)
    got = engine.runner.forward(torch.tensor(ids), cache, 0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_greedy_matches_transformers_generate(tiny_model_dir):
    path, hf_model = tiny_model_dir
    engine = Engine.load(path, ClaspConfig(), device="cpu", dtype="float32")
    prompt = list(range(500, 520))
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    inputs = torch.tensor([prompt])
    expected = hf_model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=24, do_sample=False,
                                 min_new_tokens=24, pad_token_id=0)[0, len(prompt):].tolist()
    for config in (ClaspConfig(mode="ar"), ClaspConfig(mode="clasp", num_skip_layers=2, replan_interval=2)):
        assert engine.generate(prompt, params, config).token_ids == expected


def test_embedded_model_dir_is_a_plain_hf_directory(engine):
    """The converted embedded model loads through the same --model PATH route."""
    assert (embedded_model_dir(convert=False) / "model.safetensors").exists()
