"""The one-call C++ CPU draft (clasp/cpu_draft.cpp): its int8 products against a reference of
the same quantized arithmetic, its whole-token draft against the torch path over the same int8
matrices, on AVX-512 VNNI and on the portable loops. The greedy-equivalence tests run it too:
the engine fixture uses it wherever the CPU has VNNI (asserted here)."""

from __future__ import annotations

import platform
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from clasp import cpu_draft
from clasp.config import ClaspConfig
from clasp.engine import Engine
from clasp.model_runner import Int8Weight, ModelRunner, linear

# Only a machine that cannot build C++ at all skips; a missing ninja is an install failure.
pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64"
                                or shutil.which("c++") is None, reason="needs x86-64 Linux with a C++ compiler")
KERNELS = ["clasp", "clasp-portable"]


def _kernel_or_skip(kernel: str) -> str:
    if kernel == "clasp" and not cpu_draft.cpu_has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI")
    return kernel


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


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", [(64, 128), (37, 70), (3, 5)])  # padded rows and inputs
def test_products_match_the_quantized_reference(kernel, shape):
    torch.manual_seed(0)
    w, x = torch.randn(*shape), torch.randn(4, shape[1])
    weight = Int8Weight.quantize(w, torch.float32, _kernel_or_skip(kernel))
    assert weight.kernel is not None and weight.packed is None and weight.q is None
    got = linear(x, weight)
    expected = quantized_reference(x, w)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert (got - x @ w.T).abs().max() / (x @ w.T).abs().max() < 0.03  # and near the fp32 product


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


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("skip", [frozenset(), frozenset({1, 2})])
def test_draft_token_matches_the_torch_path(kernel, model_type, skip):
    runner = _tiny_runner(model_type)
    runner.enable_fused_draft(vnni=_kernel_or_skip(kernel) == "clasp")
    assert runner.fused_draft.uses_vnni == (kernel == "clasp") and runner.draft_has_copy
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
    runner.enable_fused_draft(vnni=cpu_draft.cpu_has_vnni())
    cache = runner.new_cache(8)
    with pytest.raises(RuntimeError, match="skipped layer 9 is out of range"):
        runner.fused_draft.forward(1, cache, 0, frozenset({9}), runner._rope_cos, runner._rope_sin)
    with pytest.raises(RuntimeError, match="token id 300 is out of range"):
        runner.fused_draft.forward(300, cache, 0, frozenset(), runner._rope_cos, runner._rope_sin)
    with pytest.raises(ValueError, match="KV cache overflow"):
        runner.forward(torch.tensor([1]), cache, 8, draft=True)
    with pytest.raises(ValueError, match="fused_draft needs an int8 draft copy"):
        Engine.load(None, ClaspConfig(draft_dtype="float16"), device="cpu", dtype="float32", fused_draft=True)


def test_the_engine_drafts_through_the_kernel_where_the_cpu_has_vnni(engine):
    """So every greedy-equivalence test on such a CPU exercises it (and would catch a failed build)."""
    if cpu_draft.cpu_has_vnni():
        assert engine.runner.fused_draft is not None and engine.runner.fused_draft.uses_vnni
    else:
        assert engine.runner.fused_draft is None
