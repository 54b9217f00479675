"""The runner read straight from safetensors (clasp.checkpoint) is the runner built from the
Hugging Face model (ModelRunner.from_hf), tensor for tensor: the embedded model, and small random
Llama (Llama 3 rotary scaling, untied lm_head), Qwen2 (q/k/v biases) and Qwen3 (q/k norms)
checkpoints saved by transformers. What it does not cover loads through transformers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from clasp import checkpoint
from clasp.engine import load_runner
from clasp.loading import embedded_model_dir, load_model, rope_parameters
from clasp.model_runner import MATRICES, ModelRunner


def _same_runner(a: ModelRunner, b: ModelRunner, ids: torch.Tensor) -> None:
    assert a.spec == b.spec
    assert torch.equal(a.embed, b.embed)
    for la, lb in zip(a.weights.layers, b.weights.layers):
        for name in MATRICES:
            assert torch.equal(getattr(la, name).weight, getattr(lb, name).weight), name
        for name in ("qkv_bias", "input_norm", "post_norm", "q_norm", "k_norm"):
            x, y = getattr(la, name), getattr(lb, name)
            assert (x is None and y is None) or torch.equal(x, y), name
    assert torch.equal(a.weights.lm_head.weight, b.weights.lm_head.weight)
    logits_a = a.forward(ids, a.new_cache(64), 0)
    logits_b = b.forward(ids, b.new_cache(64), 0)
    assert torch.equal(a._rope_cos, b._rope_cos) and torch.equal(a._rope_sin, b._rope_sin)
    assert torch.equal(logits_a, logits_b)


def test_the_embedded_model_reads_as_from_hf(hf_model, engine):
    runner, tokenizer, eos = load_runner(None, torch.float32, torch.device("cpu"))
    assert isinstance(runner.rotary, checkpoint.Rotary)
    assert eos == engine.eos_ids
    ids = torch.tensor(tokenizer("The history of the printing press begins")["input_ids"])
    _same_runner(runner, ModelRunner.from_hf(load_model(None, torch.float32, torch.device("cpu"))[0]), ids)
    config = json.loads((embedded_model_dir() / "config.json").read_text())
    assert rope_parameters(config)["rope_type"] == "default"


def _save(tmp_path, name: str, model) -> dict:
    path = tmp_path / name
    model.save_pretrained(path)
    return json.loads((path / "config.json").read_text())


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32, "rope_theta": 500000.0}


@pytest.mark.parametrize("kind", ["llama3", "qwen2", "qwen3"])
def test_small_checkpoints_read_as_from_hf(tmp_path, kind):
    import transformers

    torch.manual_seed(0)
    shape = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128)
    if kind == "llama3":
        config = transformers.LlamaConfig(**shape, tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE)
        model = transformers.LlamaForCausalLM(config)
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**shape, head_dim=16))
    model.eval()
    saved = _save(tmp_path, kind, model)
    runner = checkpoint.load_runner(tmp_path / kind, saved, torch.float32, torch.device("cpu"))
    assert runner is not None
    if kind == "qwen2":
        assert runner.weights.layers[0].qkv_bias is not None
    if kind == "qwen3":
        assert runner.weights.layers[0].q_norm is not None
    if kind == "llama3":
        assert rope_parameters(saved)["rope_type"] == "llama3"
        assert not torch.equal(runner.weights.lm_head.weight, runner.embed)
    _same_runner(runner, ModelRunner.from_hf(model, release=False), torch.arange(3, 40))


def test_older_config_format_and_uncovered_rotary():
    assert rope_parameters({"rope_theta": 5e5, "rope_scaling": {"type": "llama3", "factor": 8.0}}) == {
        "rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}
    assert rope_parameters({}) == {"rope_type": "default", "rope_theta": 10000.0}
    assert checkpoint.inverse_frequencies({"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}, 64) is None


def test_an_uncovered_rotary_scaling_loads_through_transformers(tmp_path):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    model = transformers.LlamaForCausalLM(config).eval()
    saved = _save(tmp_path, "linear", model)
    assert checkpoint.load_runner(tmp_path / "linear", saved, torch.float32, torch.device("cpu")) is None
    for name in ("tokenizer.json", "tokenizer_config.json"):  # any tokenizer: the model is what is loaded
        shutil.copy(embedded_model_dir() / name, tmp_path / "linear" / name)
    runner, _, _ = load_runner(tmp_path / "linear", torch.float32, torch.device("cpu"))
    assert not isinstance(runner.rotary, checkpoint.Rotary)  # transformers' own rotary module
    _same_runner(runner, ModelRunner.from_hf(model, release=False), torch.arange(3, 40))
