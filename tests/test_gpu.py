"""GPU smoke tests: the CUDA backend on the embedded model. Every test is skipped without CUDA.

Run on a lent GPU by benchmarks/gpu/run.sh (section "tests"). float32 where output must equal
plain decoding token for token (as on CPU: 16-bit batched verification and one-row steps round
differently); bfloat16 for what the service runs by default.
"""

from __future__ import annotations

import gc

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROMPTS = ["What is 2+2?", "Name three primary colors.", "Write a short poem about the sea."]


@pytest.fixture(scope="module")
def gpu_fp32():
    from clasp.config import ClaspConfig
    from clasp.engine import Engine

    return Engine.load(None, ClaspConfig(), device="cuda", dtype="float32")


@pytest.fixture(scope="module")
def gpu_bf16():
    from clasp.config import ClaspConfig
    from clasp.engine import Engine

    return Engine.load(None, ClaspConfig(), device="cuda", dtype="bfloat16")


def test_backend_is_cuda_with_graphs_and_measured_costs(gpu_bf16):
    runner = gpu_bf16.runner
    info = runner.backend.describe()
    assert info["backend"] == "cuda"
    assert info["graph_check"].get("passed"), info["graph_check"]
    assert runner.static_steps is not None and runner.static_steps.capture
    assert runner.cache_pool is not None
    assert set(info["costs_ms"]) == {"rows_1", "rows_2", "rows_9", "draft_token"}
    assert all(v > 0 for v in info["costs_ms"].values())
    costs = runner.backend.cost_model(runner)
    assert costs.per_draft_byte > 0 and costs.first_extra_row >= 0 and costs.extra_row >= 0


def test_logits_are_fp32_from_a_bf16_head(gpu_bf16):
    from clasp.matrices import Fp32LogitsMatrix

    runner = gpu_bf16.runner
    assert isinstance(runner.weights.lm_head, Fp32LogitsMatrix)
    ids = torch.tensor(gpu_bf16.encode("The capital of France is"), device="cuda")
    runner.static_steps, steps = None, runner.static_steps
    try:
        logits = runner.forward(ids, runner.new_cache(len(ids)), 0, last_only=True)
    finally:
        runner.static_steps = steps
    assert logits.dtype == torch.float32 and Fp32LogitsMatrix._available
    assert bool((logits.bfloat16().float() != logits).any())  # not 16-bit values widened


@pytest.mark.parametrize("prompt", PROMPTS)
def test_fp32_clasp_equals_ar_token_for_token(gpu_fp32, prompt):
    from clasp.config import ClaspConfig, SamplingParams

    ids = gpu_fp32.encode(prompt)
    params = SamplingParams(max_new_tokens=48)
    ar = gpu_fp32.generate(ids, params, ClaspConfig(mode="ar"))
    for config in (ClaspConfig(), ClaspConfig(mode="clasp", num_skip_layers=8, replan_interval=4, draft_dtype=None)):
        result = gpu_fp32.generate(ids, params, config)
        assert result.token_ids == ar.token_ids
        assert result.stats.num_draft_tokens > 0
    runner = gpu_fp32.runner
    runner.static_steps, steps = None, runner.static_steps
    try:  # and the captured graphs decode what eager passes decode
        eager = gpu_fp32.generate(ids, params, ClaspConfig(mode="ar"))
    finally:
        runner.static_steps = steps
    assert eager.token_ids == ar.token_ids


@pytest.mark.parametrize("max_skip", [3, 12])
def test_batched_dp_equals_naive_dp(gpu_fp32, max_skip):
    from clasp.planner import plan_layers, plan_layers_naive

    runner = gpu_fp32.runner
    ids = gpu_fp32.encode("Explain how a rainbow forms, step by step.")
    cache = runner.new_cache(len(ids) + 8)
    hidden = []
    runner.forward(torch.tensor(ids, device="cuda"), cache, 0, hidden_states=hidden)
    hidden = torch.stack([h[-1] for h in hidden])
    plan, g = plan_layers(runner, cache, hidden, len(ids) - 1, max_skip)
    naive, g_naive = plan_layers_naive(runner, cache, hidden, len(ids) - 1, max_skip)
    assert plan.skip_sets == naive.skip_sets
    for a, b in zip(g, g_naive):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def _sdpa_inputs(dtype, n, start, heads=9, kv_heads=3, hd=64):
    gen = torch.Generator(device="cuda").manual_seed(n + start)
    q = torch.randn(1, heads, n, hd, device="cuda", generator=gen).to(dtype)
    k = torch.randn(1, kv_heads, start + n, hd, device="cuda", generator=gen).to(dtype)
    v = torch.randn(1, kv_heads, start + n, hd, device="cuda", generator=gen).to(dtype)
    return q, k, v


@pytest.mark.parametrize("n,start", [(5, 300), (9, 40), (2, 1)])
def test_verification_attention_runs_on_flash_in_bf16_and_efficient_in_fp32(n, start):
    """Each path on the SDPA backend it is meant for: with every other backend (MATH included)
    switched off, a fallback would raise "no available kernel"."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from clasp.attention import boolean_mask_attention, span_attention

    q, k, v = _sdpa_inputs(torch.bfloat16, n, start)
    reference = boolean_mask_attention(q.float(), k.float(), v.float(), start)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = span_attention(q, k, v, start)  # verification, GQA, lower-right causal
        torch.nn.functional.scaled_dot_product_attention(q[:, :, -1:], k, v, enable_gqa=True)  # one token
        torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :n], v[:, :, :n], is_causal=True,
                                                         enable_gqa=True)  # a prefill
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)
    q, k, v = _sdpa_inputs(torch.float32, n, start)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        out = span_attention(q, k, v, start)
    torch.testing.assert_close(out, boolean_mask_attention(q, k, v, start), rtol=1e-4, atol=1e-4)


def test_seeded_sampling_reproduces(gpu_bf16):
    from clasp.config import ClaspConfig, SamplingParams

    ids = gpu_bf16.encode("Write a haiku about autumn.")
    params = SamplingParams(max_new_tokens=40, temperature=0.8, seed=7)
    for config in (ClaspConfig(mode="ar"), ClaspConfig()):
        a = gpu_bf16.generate(ids, params, config)
        b = gpu_bf16.generate(ids, params, config)
        assert a.token_ids == b.token_ids


def _tensor_codec():
    """The plan codec's tensor functions (serving.plan_wire). The device machine cannot generate
    the gRPC code that module imports (no grpc_tools there); then the same two safetensors calls."""
    try:
        from serving.plan_wire import decode_tensor, encode_tensor
    except ImportError:
        from safetensors.torch import load, save

        return (lambda t: save({"tensor": t.detach().contiguous().cpu()})), (lambda b: load(b)["tensor"])
    return encode_tensor, decode_tensor


def test_hidden_states_survive_the_safetensors_round_trip(gpu_bf16):
    from clasp.decoding import prefill

    encode_tensor, decode_tensor = _tensor_codec()
    runner = gpu_bf16.runner
    ids = torch.tensor(gpu_bf16.encode("Explain photosynthesis."), device="cuda")
    _, hidden = prefill(runner, runner.new_cache(len(ids) + 1), ids, collect_hidden=True)
    assert hidden.shape == (runner.spec.num_layers + 1, runner.spec.hidden_size) and hidden.dtype == torch.bfloat16
    back = decode_tensor(encode_tensor(hidden))
    assert back.dtype == hidden.dtype and torch.equal(back.to("cuda"), hidden)


def test_memory_is_stable_across_requests(gpu_bf16):
    from clasp.config import ClaspConfig, SamplingParams

    ids = gpu_bf16.encode("Name three primary colors.")
    params = SamplingParams(max_new_tokens=32)

    def run():
        # Not adaptive: the same rounds every time (the controller's timings would vary the draft
        # lengths, and a new length captures a new verification graph, which is not a leak).
        for config in (ClaspConfig(mode="ar"), ClaspConfig(adaptive=False)):
            gpu_bf16.generate(ids, params, config)
        gc.collect()
        torch.cuda.synchronize()

    run()  # graphs captured and pooled caches allocated here
    steps = gpu_bf16.runner.static_steps
    before, built = torch.cuda.memory_allocated(), steps.num_built
    for _ in range(5):
        run()
    assert steps.num_built == built  # nothing new captured: the pooled cache kept its addresses
    assert torch.cuda.memory_allocated() <= before + (1 << 20)


def test_a_copy_that_does_not_fit_is_a_clear_error(gpu_bf16):
    from clasp.backends.cuda import check_free_memory

    free, total = torch.cuda.mem_get_info()
    with pytest.raises(ValueError, match="GiB are free"):
        check_free_memory(torch.device("cuda"), total, "the test's copy")
