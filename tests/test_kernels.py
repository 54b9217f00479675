"""The draft's int8 weights, the prepacked verification weights, and the unpacked fp16 path."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from clasp.config import ClaspConfig, SamplingParams
from clasp.engine import Engine
from clasp.backends.cpu import pack_weights
from clasp.matrices import BlockedFp32Weight, Int8Weight, linear
from clasp.model_runner import ModelRunner


def tiny_llama(dtype=torch.float32) -> ModelRunner:
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return ModelRunner.from_hf(LlamaForCausalLM(config).eval().to(dtype))


@pytest.mark.parametrize("rows", [1, 2, 5, 40])
def test_int8_weight_product_is_close_to_fp32(rows):
    torch.manual_seed(0)
    w, x = torch.randn(300, 128), torch.randn(rows, 128)
    got = linear(x, Int8Weight.quantize(w, torch.float32))
    expected = x @ w.T
    assert got.shape == expected.shape and got.dtype == torch.float32
    # 8-bit weights and activations: ~1% of the output's scale, not bit-exact.
    assert (got - expected).abs().max() / expected.abs().max() < 0.03
    assert Int8Weight.quantize(w, torch.float32).nbytes() == 300 * 128 + 300 * 4


def test_packed_weights_give_the_same_logits():
    runner = tiny_llama()
    ids = torch.arange(10, 30)
    plain = [runner.forward(ids[:n], runner.new_cache(64), 0) for n in (1, 2, 3, 8, 20)]
    pack_weights(runner)
    assert runner.packed_nbytes == runner.weights.nbytes()
    packed = [runner.forward(ids[:n], runner.new_cache(64), 0) for n in (1, 2, 3, 8, 20)]
    for a, b in zip(plain, packed):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_packed_weights_serve_one_and_two_rows_where_calibration_picks_them():
    """Which kernel is faster for 1-2 rows is measured per CPU at packing; whichever it picks, the
    packed path must compute the same logits for every row count."""
    runner = tiny_llama()
    ids = torch.arange(10, 30)
    plain = [runner.forward(ids[:n], runner.new_cache(64), 0) for n in (1, 2)]
    pack_weights(runner)
    assert runner.packed_min_rows in (1, 2, 3)
    runner.packed_min_rows = 1
    assert runner.full_weights(1) is runner.multi_row_weights
    for n, a in zip((1, 2), plain):
        torch.testing.assert_close(runner.forward(ids[:n], runner.new_cache(64), 0), a, rtol=1e-5, atol=1e-5)


def test_packing_refuses_non_fp32():
    with pytest.raises(ValueError, match="fp32"):
        pack_weights(tiny_llama(torch.bfloat16))


def test_draft_dtype_auto_is_int8_on_cpu_only():
    assert ClaspConfig().draft_torch_dtype("cpu") == torch.int8
    assert ClaspConfig().draft_torch_dtype("cuda") == torch.float16
    assert ClaspConfig(draft_dtype=None).draft_torch_dtype("cpu") is None
    with pytest.raises(ValueError, match="draft_dtype"):
        ClaspConfig(draft_dtype="int4")


def test_fp16_draft_without_packing_matches_ar(engine):
    """The other load-time choices: a float16 draft copy and unpacked (MKL) verification."""
    other = Engine.load(None, ClaspConfig(draft_dtype="float16"), device="cpu", dtype="float32", pack_weights=False,
                        fp32_kernel="torch")
    assert other.runner.packed_nbytes == 0 and other.runner.draft_weights.lm_head.dtype == torch.float16
    assert not any(isinstance(m, BlockedFp32Weight) and m.max_rows for m in other.runner.weights.matrices())
    # The session's engine verifies through a packed copy or the blocked kernel, whichever load chose.
    blocked = engine.runner.weights.lm_head
    assert engine.runner.packed_nbytes > 0 or (isinstance(blocked, BlockedFp32Weight) and blocked.max_rows >= 5)
    assert isinstance(engine.runner.draft_weights.lm_head, Int8Weight)
    for prompt in ["Write a short poem about the sea.", "Name three primary colors."]:
        ids = engine.encode(prompt)
        params = SamplingParams(max_new_tokens=48)
        expected = engine.generate(ids, params, ClaspConfig(mode="ar")).token_ids
        result = other.generate(ids, params, ClaspConfig(draft_dtype="float16"))
        assert result.token_ids == expected
        assert result.stats.num_draft_tokens > 0


def test_auto_draft_falls_back_to_float16_without_an_int8_kernel(monkeypatch):
    """A torch build without fbgemm: `auto` still loads (float16 copy); an explicit int8 says why not."""
    def no_kernel(*args, **kwargs):
        raise RuntimeError("Didn't find engine for operation quantized::linear_prepack NoQEngine")

    monkeypatch.setattr(Int8Weight, "quantize", no_kernel)
    engine = Engine.load(None, ClaspConfig(), device="cpu", dtype="float32", pack_weights=False)
    assert engine.runner.draft_weights.lm_head.dtype == torch.float16
    with pytest.raises(ValueError, match="draft_dtype int8 is not supported on cpu"):
        Engine.load(None, ClaspConfig(draft_dtype="int8"), device="cpu", dtype="float32", pack_weights=False)
