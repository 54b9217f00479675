"""The one-call C++ CPU draft (clasp/cpu_draft.cpp): its int8 products against a reference of
the same quantized arithmetic, its whole-token draft against the torch path over the same int8
matrices, in every instruction set this CPU can run (each forced explicitly: AVX-512 VNNI, AVX2,
portable loops). tests/test_draft_kernels.py checks each against the full model. Its fp32
few-row products (Fp32Matrix) against torch's fp32 product, in AVX-512F, AVX2 and portable code."""

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
FP32_ISAS = list(cpu_draft.FP32_ISAS)


def _isa_or_skip(isa: str) -> str:
    if isa not in cpu_draft.supported_isas():
        pytest.skip(f"this CPU cannot run {isa}")
    return isa


def _fp32_isa_or_skip(isa: str) -> str:
    if isa not in cpu_draft.supported_fp32_isas():
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


# ---------------------------------------------------------------------- fp32 few-row products
def _assert_fp32_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Within fp32 rounding of torch's product: only the order of the sums differs."""
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("isa", FP32_ISAS)
# 14: one tile of a block pair; 15-16: one block at a time; 17, 29: row tiles over input ranges;
# 64: the most rows in one pass
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 9, 14, 15, 16, 17, 29, 64])
@pytest.mark.parametrize("shape", [(960, 576), (576, 1536), (37, 70)])  # qkv, down; padded rows, odd inputs
def test_fp32_products_match_torch(isa, rows, shape):
    torch.manual_seed(rows)
    w, x = torch.randn(*shape), torch.randn(rows, shape[1])
    matrix = cpu_draft.fp32_matrix(w, _fp32_isa_or_skip(isa))
    assert matrix.isa == cpu_draft.FP32_ISAS[isa] and matrix.shape == shape
    _assert_fp32_close(matrix(x), x @ w.T)
    _assert_fp32_close(matrix.forward(x[:, :].T.contiguous().T), x @ w.T)  # a non-contiguous input


@pytest.mark.parametrize("isa", FP32_ISAS)
def test_fp32_products_past_16_rows_bias_and_large_values(isa):
    """More rows than one pass (64) take several passes; a bias is added; values of very different
    sizes (the model's outlier channels) keep fp32 accuracy."""
    torch.manual_seed(7)
    w, bias = torch.randn(100, 300), torch.randn(100)
    w[:, :4] *= 1000.0
    x = torch.randn(137, 300)
    matrix = cpu_draft.fp32_matrix(w, _fp32_isa_or_skip(isa), bias=bias)
    _assert_fp32_close(matrix(x), x @ w.T + bias)
    assert matrix(x[:0]).shape == (0, 100)


def test_avx512_fp32_rows_do_not_depend_on_the_other_rows_of_the_pass():
    """From 4 rows on, the AVX-512 kernel sums each output over its inputs in order, however the
    pass is tiled (one tile, block pairs, input ranges): a row's products are bitwise the same
    whichever batch it is verified in."""
    _fp32_isa_or_skip("avx512")
    torch.manual_seed(11)
    w, x = torch.randn(200, 1536), torch.randn(64, 1536)
    matrix = cpu_draft.fp32_matrix(w, "avx512")
    alone = matrix(x[:4])
    for rows in (5, 14, 15, 16, 17, 29, 64):
        assert torch.equal(matrix(x[:rows])[:4], alone), rows


def test_fp32_instruction_sets_can_be_switched_and_agree():
    torch.manual_seed(5)
    w, x = torch.randn(200, 128), torch.randn(9, 128)
    matrix = cpu_draft.fp32_matrix(w, "portable")
    results = {}
    for isa in cpu_draft.supported_fp32_isas():
        matrix.isa = cpu_draft.FP32_ISAS[isa]
        assert matrix.isa == cpu_draft.FP32_ISAS[isa]
        results[isa] = matrix(x)
    assert "portable" in results
    for got in results.values():
        _assert_fp32_close(got, results["portable"])


def test_fp32_bad_calls_are_clear_errors():
    w = torch.randn(8, 32)
    matrix = cpu_draft.fp32_matrix(w)
    with pytest.raises(ValueError, match="isa must be one of"):
        cpu_draft.fp32_matrix(w, "avx512-vnni")  # an int8 instruction set
    with pytest.raises(ValueError, match="expected a 2-D floating-point CPU matrix"):
        cpu_draft.fp32_matrix(torch.ones(8, dtype=torch.float32))
    with pytest.raises(RuntimeError, match=r"expected float32 CPU input \[T, 32\]"):
        matrix(torch.ones(2, 31))
    with pytest.raises(RuntimeError, match="unknown fp32 instruction set 2"):
        matrix.isa = cpu_draft.ISAS["avx512-vnni"]
    with pytest.raises(RuntimeError, match="unknown instruction set 3"):
        Int8Weight.quantize(torch.ones(8, 32), torch.float32, "clasp-portable").kernel.isa = 3


# ---------------------------------------------------------------------- the fused fp32 step
def _assert_step_matches(runner: ModelRunner, step: cpu_draft.FusedFp32Step, prompt: torch.Tensor,
                         tokens: list[int], skip: frozenset[int] = frozenset()) -> None:
    """Each token through the fused step and through ModelRunner.forward, on caches prefilled
    alike: the logits within fp32 rounding, the same argmax, the same KV written."""
    fused_cache, torch_cache = runner.new_cache(len(prompt) + len(tokens)), runner.new_cache(len(prompt) + len(tokens))
    runner.forward(prompt, fused_cache, 0)
    runner.forward(prompt, torch_cache, 0)
    for i, token in enumerate(tokens):
        position = len(prompt) + i
        fused = step.forward(token, fused_cache, position, skip, runner._rope_cos, runner._rope_sin)
        reference = runner.forward(torch.tensor([token]), torch_cache, position, skip)
        torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
        assert int(fused.argmax()) == int(reference.argmax())
        for layer in range(runner.spec.num_layers):
            torch.testing.assert_close(fused_cache.keys[layer][:, :, :position + 1],
                                       torch_cache.keys[layer][:, :, :position + 1], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fused_cache.values[layer][:, :, :position + 1],
                                       torch_cache.values[layer][:, :, :position + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", FP32_ISAS)
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("skip", [frozenset(), frozenset({1, 2})])
def test_fused_fp32_step_matches_the_runner(isa, model_type, skip):
    runner = _tiny_runner(model_type)
    step = cpu_draft.FusedFp32Step(runner.spec, runner.embed, runner.weights, _fp32_isa_or_skip(isa))
    assert step.isa == isa
    _assert_step_matches(runner, step, torch.arange(40, 77), [5, 250, 17], skip)


def test_fused_fp32_step_matches_the_embedded_model():
    """On the real model, in the fastest instruction set here: logits, argmax and KV of 3 steps."""
    engine = Engine.load(None, ClaspConfig(draft_dtype=None), device="cpu", dtype="float32", pack_weights=False)
    runner = engine.runner
    step = cpu_draft.FusedFp32Step(runner.spec, runner.embed, runner.weights, cpu_draft.supported_fp32_isas()[0])
    prompt = torch.tensor(engine.encode("Name three planets of the solar system."))
    _assert_step_matches(runner, step, prompt, [int(t) for t in engine.encode("Mars, Venus", chat=False)])


def test_fused_fp32_step_bad_calls_are_clear_errors():
    runner = _tiny_runner("llama")
    step = cpu_draft.FusedFp32Step(runner.spec, runner.embed, runner.weights, "portable")
    cache = runner.new_cache(8)
    with pytest.raises(RuntimeError, match="skipped layer 9 is out of range"):
        step.forward(1, cache, 0, frozenset({9}), runner._rope_cos, runner._rope_sin)
    with pytest.raises(RuntimeError, match="rotary tables do not cover position 8"):
        step.forward(1, cache, 8, frozenset(), runner._rope_cos, runner._rope_sin)
    with pytest.raises(ValueError, match="isa must be one of"):
        step.isa = "avx512-vnni"
    with pytest.raises(ValueError, match="plain float32 weights"):
        cpu_draft.FusedFp32Step(runner.spec, runner.embed, runner.weights.int8(torch.float32, "clasp-portable"))


@pytest.mark.parametrize("heads, kv_heads, hidden", [(6, 2, 384), (4, 1, 512), (8, 8, 512)])  # groups 3, 4, 1
def test_grouped_attention_equals_one_head_at_a_time(heads, kv_heads, hidden):
    """AVX-512 attention over a KV head's query heads together (head_dim 64 or 128) gives bitwise
    the logits and KV of one head at a time, for a step and for ragged rows."""
    _fp32_isa_or_skip("avx512")
    config = AutoConfig.for_model("llama", vocab_size=300, hidden_size=hidden, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                  max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(3)
    runner = ModelRunner.from_hf(AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval())
    step = cpu_draft.FusedFp32Step(runner.spec, runner.embed, runner.weights, "avx512")
    results = {}
    for grouped in (True, False):
        step._model.group_heads = grouped
        cache = runner.new_cache(64, num_slots=2)
        for slot in range(2):
            runner.forward(torch.arange(3 + slot, 40), cache, 0, slot=slot)
        one = step.forward(7, cache.slot_view(0), 37 + 0, frozenset(), runner._rope_cos, runner._rope_sin)
        rows = step.forward_rows([5, 9, 11, 4], [0, 0, 1, 1], [38, 39, 36, 37], cache, [frozenset()] * 4,
                                 runner._rope_cos, runner._rope_sin)
        results[grouped] = (one, rows, [k.clone() for k in cache.keys], [v.clone() for v in cache.values])
    for a, b in zip(results[True][:2], results[False][:2]):
        assert torch.equal(a, b)
    for a, b in zip(results[True][2] + results[True][3], results[False][2] + results[False][3]):
        assert torch.equal(a, b)


def test_grouped_attention_in_the_int8_draft(engine):
    """The embedded model's int8 draft (9 query heads over 3 KV heads, head_dim 64) in VNNI: the
    grouped attention drafts bitwise what one head at a time does."""
    runner = engine.runner
    if runner.fused_draft is None or "avx512-vnni" not in cpu_draft.supported_isas():
        pytest.skip("no fused AVX-512 VNNI draft here")
    draft = runner.fused_draft
    saved = draft.isa
    ids = torch.tensor(engine.encode("Name three planets of the solar system."))
    outputs = {}
    try:
        draft.isa = "avx512-vnni"
        for grouped in (True, False):
            draft._model.group_heads = grouped
            cache = runner.new_cache(128, num_slots=2)
            for slot in range(2):
                runner.forward(ids[:-1], cache, 0, slot=slot)
            outputs[grouped] = draft.forward_rows([int(ids[-1])] * 2, [0, 1], [len(ids) - 1] * 2, cache,
                                                  [frozenset(), frozenset({3, 4})], runner._rope_cos, runner._rope_sin)
    finally:
        draft._model.group_heads = True
        draft.isa = saved
    assert torch.equal(outputs[True], outputs[False])
