"""The one-call C++ CPU draft (clasp/cpu_draft.cpp): its int8 products against a reference of
the same quantized arithmetic, its whole-token draft against the torch path over the same int8
matrices, in every instruction set this CPU can run (each forced explicitly: AVX-512 VNNI, AVX2,
portable loops). tests/test_draft_kernels.py checks each against the full model."""

from __future__ import annotations

import platform
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from clasp import cpu_draft
from clasp.config import ClaspConfig
from clasp.engine import Engine
from clasp.matrices import Int8Weight, linear
from clasp.model_runner import ModelRunner

# Only a machine that cannot build C++ at all skips; a missing ninja is an install failure.
pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64"
                                or shutil.which("c++") is None, reason="needs x86-64 Linux with a C++ compiler")
ISAS = list(cpu_draft.ISAS)


def _isa_or_skip(isa: str) -> str:
    if isa not in cpu_draft.supported_isas():
        pytest.skip(f"this CPU cannot run {isa}")
    return isa


def quantized_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-row int8 weights, per-tensor asymmetric uint8 activations (each row of x), in float64."""
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).double()
    rows = []
    for row in x:
        lo, hi = min(float(row.min()), 0.0), max(float(row.max()), 0.0)
        s = torch.tensor((hi - lo) / 255.0, dtype=torch.float32)
        zero = int(torch.round(-torch.tensor(lo, dtype=torch.float32) / s).clamp(0, 255))
        xq = (torch.round(row * (1.0 / s)) + zero).clamp(0, 255).double()
        rows.append(scale.double() * float(s) * ((xq - zero) @ q.T))
    return torch.stack(rows).float()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", [(64, 128), (37, 70), (3, 5)])  # padded rows and inputs
def test_products_match_the_quantized_reference(isa, shape):
    torch.manual_seed(0)
    w, x = torch.randn(*shape), torch.randn(4, shape[1])
    weight = Int8Weight.quantize(w, torch.float32, f"clasp-{_isa_or_skip(isa)}")
    assert weight.kernel is not None and weight.packed is None and weight.q is None
    got = linear(x, weight)
    expected = quantized_reference(x, w)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert (got - x @ w.T).abs().max() / (x @ w.T).abs().max() < 0.03  # and near the fp32 product


@pytest.mark.parametrize("isa", ISAS)
def test_every_instruction_set_computes_the_same_integer_products(isa):
    """Exact integer sums in every instruction set: the largest activations (255) times the largest
    weights (+-127) over long rows, where 16-bit pair sums (vpmaddubsw) would saturate."""
    torch.manual_seed(3)
    w = torch.randn(1536, 576)
    w[:, :64] = w.abs().amax(1, keepdim=True)  # full-scale weights where the activations peak
    x = torch.randn(3, 576)
    x[:, :64] = 50.0
    expected = linear(x, Int8Weight.quantize(w, torch.float32, "clasp-portable"))
    got = linear(x, Int8Weight.quantize(w, torch.float32, f"clasp-{_isa_or_skip(isa)}"))
    assert torch.equal(got, expected)
    torch.testing.assert_close(got, quantized_reference(x, w), rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def _tiny_runner(model_type: str) -> ModelRunner:
    config = AutoConfig.for_model(model_type, vocab_size=300, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(2)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)  # Qwen2's q/k/v biases must count
            elif p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return ModelRunner.from_hf(model)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("skip", [frozenset(), frozenset({1, 2})])
def test_draft_token_matches_the_torch_path(isa, model_type, skip):
    runner = _tiny_runner(model_type)
    runner.enable_fused_draft(_isa_or_skip(isa))
    assert runner.fused_draft.isa == isa and runner.draft_has_copy
    prompt = torch.arange(40, 77)
    fused_cache, torch_cache = runner.new_cache(64), runner.new_cache(64)
    runner.forward(prompt, fused_cache, 0)
    runner.forward(prompt, torch_cache, 0)
    for step, token in enumerate([5, 250, 17]):
        position = len(prompt) + step
        fused = runner.forward(torch.tensor([token]), fused_cache, position, skip, draft=True)
        # hidden_states forces the per-op torch path over the same int8 matrices
        reference = runner.forward(torch.tensor([token]), torch_cache, position, skip, draft=True, hidden_states=[])
        assert fused_cache.length == torch_cache.length == position + 1
        torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4)
        for layer in range(runner.spec.num_layers):
            torch.testing.assert_close(fused_cache.keys[layer][:, :, :position + 1],
                                       torch_cache.keys[layer][:, :, :position + 1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fused_cache.values[layer][:, :, :position + 1],
                                       torch_cache.values[layer][:, :, :position + 1], rtol=1e-5, atol=1e-5)


def test_bad_calls_are_clear_errors():
    runner = _tiny_runner("llama")
    runner.enable_fused_draft("portable")
    cache = runner.new_cache(8)
    with pytest.raises(RuntimeError, match="skipped layer 9 is out of range"):
        runner.fused_draft.forward(1, cache, 0, frozenset({9}), runner._rope_cos, runner._rope_sin)
    with pytest.raises(RuntimeError, match="token id 300 is out of range"):
        runner.fused_draft.forward(300, cache, 0, frozenset(), runner._rope_cos, runner._rope_sin)
    with pytest.raises(ValueError, match="KV cache overflow"):
        runner.forward(torch.tensor([1]), cache, 8, draft=True)
    with pytest.raises(ValueError, match="isa must be one of"):
        runner.fused_draft.isa = "sse2"
    with pytest.raises(ValueError, match="fused_draft needs an int8 draft copy"):
        Engine.load(None, ClaspConfig(draft_dtype="float16"), device="cpu", dtype="float32", fused_draft=True)
    with pytest.raises(ValueError, match="draft_kernel needs an int8 draft copy"):
        Engine.load(None, ClaspConfig(draft_dtype=None), device="cpu", dtype="float32", draft_kernel="fused-avx2")


def test_switching_instruction_sets_switches_every_matrix():
    runner = _tiny_runner("llama")
    runner.enable_fused_draft("portable")
    for isa in cpu_draft.supported_isas():
        runner.fused_draft.isa = isa
        assert runner.fused_draft.isa == isa
        assert {m.kernel.isa for m in runner.draft_weights.matrices()} == {cpu_draft.ISAS[isa]}
