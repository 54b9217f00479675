"""The GPU backend's pieces that run on a CPU: the lower-right causal attention equals the boolean
mask; the static-shape step (what CUDA graphs capture) equals the eager forward pass; its drafting
loop drafts what the host loop drafts; greedy output through it equals plain decoding; the KV-cache
pool reuses storage; the CUDA backend's load-time choices run end to end (eagerly, on CPU).

float32 throughout: the static step sums attention in another order than SDPA, so logits agree to
~1e-5 relative, and exact greedy equality needs fp32 as everywhere else in the suite.
"""

from __future__ import annotations

import gc

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from clasp.attention import boolean_mask_attention, lower_right_attention, span_attention
from clasp.backends.base import LoadOptions
from clasp.backends.cuda import CudaBackend, Fp8Weight
from clasp.config import ClaspConfig, SamplingParams
from clasp.decoding import draft
from clasp.model_runner import ModelRunner, Segment
from clasp.static_step import CachePool, StaticSteps



def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, share: float = 5e-5) -> None:
    """Static vs eager: fp32 with attention summed in another order. Gaps measured on the embedded
    model are ~2e-6 of the tensor's largest magnitude, ~1.2e-5 when layer 0 is skipped (the model
    far from its usual path); a wrong position or layer differs by orders of magnitude more."""
    gap, scale = float((actual - expected).abs().max()), float(expected.abs().max())
    assert gap <= share * scale, f"gap {gap:.3g} over {share:g} of the largest magnitude {scale:.3g}"


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("n,start", [(2, 1), (5, 300), (9, 40), (16, 3)])
def test_lower_right_causal_attention_equals_the_boolean_mask(heads, kv_heads, n, start):
    gen = torch.Generator().manual_seed(n * 1000 + start)
    q = torch.randn(1, heads, n, 64, generator=gen)
    k = torch.randn(1, kv_heads, start + n, 64, generator=gen)
    v = torch.randn(1, kv_heads, start + n, 64, generator=gen)
    reference = boolean_mask_attention(q, k, v, start)
    for expand_heads in (False, True):  # the CUDA forms for 16-bit (flash) and fp32 (memory-efficient)
        torch.testing.assert_close(lower_right_attention(q, k, v, start, expand_heads), reference,
                                   rtol=1e-5, atol=1e-5)
    assert torch.equal(span_attention(q, k, v, start), reference)  # the CPU form is the boolean mask
    # And the mask is causal: changing the last key changes only the last query's output.
    k2 = k.clone()
    k2[:, :, -1] += 1.0
    changed = (lower_right_attention(q, k2, v, start) - reference).abs().amax(dim=(0, 1, 3)) > 0
    assert changed.tolist() == [False] * (n - 1) + [True]


def test_span_attention_prefill_and_one_token_forms():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, t, 32, generator=gen) for h, t in ((4, 6), (2, 6), (2, 6)))
    torch.testing.assert_close(span_attention(q, k, v, 0), boolean_mask_attention(q, k, v, 0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(span_attention(q[:, :, -1:], k, v, 5), boolean_mask_attention(q[:, :, -1:], k, v, 5),
                               rtol=1e-5, atol=1e-5)


def prefilled(runner, ids: list[int], extra: int = 24, copies: int = 2):
    caches = [runner.new_cache(len(ids) + extra) for _ in range(copies)]
    for cache in caches:
        runner.forward(torch.tensor(ids), cache, 0, last_only=True)
    return caches


@pytest.mark.parametrize("rows,skip_set", [(1, frozenset()), (1, frozenset({3, 5, 7, 20})), (5, frozenset()),
                                           (9, frozenset({0, 29}))], ids=["step", "step-skip", "verify5", "verify9-skip"])
def test_static_step_equals_the_eager_step(engine, rows, skip_set):
    runner = engine.runner
    ids = engine.encode("Explain how a rainbow forms, step by step.")
    eager_cache, static_cache = prefilled(runner, ids)
    steps = StaticSteps(runner, capture=False)
    tokens = torch.tensor([42, 7, 99, 1000, 5, 17, 300, 2, 8])[:rows]
    for offset in (0, 3, 11):  # several positions, one static entry (positions are device data)
        start = len(ids) + offset
        hidden_eager, hidden_static = [], []
        eager = runner.forward_batch([Segment(0, start, tokens, skip_set)], eager_cache, hidden_states=hidden_eager)
        static = steps.forward([Segment(0, start, tokens, skip_set)], static_cache, False, False, hidden_static)
        assert_close_to_scale(static, eager)
        assert torch.equal(static.argmax(-1), eager.argmax(-1))
        assert len(hidden_static) == len(hidden_eager) == runner.spec.num_layers + 1
        for a, b in zip(hidden_static, hidden_eager):
            assert_close_to_scale(a, b)
        assert static_cache.length == eager_cache.length == start + rows
        for layer in range(runner.spec.num_layers):
            written = slice(start, start + rows)
            if layer in skip_set:
                continue
            assert_close_to_scale(static_cache.keys[layer][0, :, written], eager_cache.keys[layer][0, :, written])
    assert len(steps) == 1 and steps.num_built == 1


def test_static_step_declines_what_it_does_not_cover(engine):
    runner = engine.runner
    steps = StaticSteps(runner, capture=False, max_rows=4)
    cache = runner.new_cache(64, num_slots=2)
    five, one = torch.arange(5), torch.tensor([3])
    assert steps.forward([Segment(0, 10, five)], cache, False, False, None) is None  # more rows than max_rows
    assert steps.forward([Segment(0, 0, five[:3])], cache, False, False, None) is None  # a prefill at 0
    assert steps.forward([Segment(0, 10, one), Segment(1, 10, five[:2])], cache, False, False, None) is None
    assert steps.forward([Segment(0, 10, one, frozenset({1})), Segment(1, 10, one)], cache, False, False, None) is None
    assert steps.forward([Segment(0, 10, one), Segment(0, 11, one)], cache, False, False, None) is None
    assert len(steps) == 0


def test_static_drafting_loop_drafts_what_the_host_loop_drafts(engine):
    """One read per round, the same tokens and the same exit point as LayerSkipProposer's loop."""
    runner = engine.runner
    ids = engine.encode("Write a short poem about the sea.")
    host_cache, static_cache = prefilled(runner, ids)
    first = int(runner.forward(torch.tensor(ids[-1:]), runner.new_cache(len(ids) + 1), 0)[0].argmax())
    skip = frozenset(range(4, 20, 2))
    for threshold in (0.0, 0.25, 0.6):
        expected = draft(runner, host_cache, first, len(ids), skip, 8, threshold, SamplingParams(), None,
                         use_copy=False)
        runner.static_steps = StaticSteps(runner, capture=False)
        try:
            got = draft(runner, static_cache, first, len(ids), skip, 8, threshold, SamplingParams(), None,
                        use_copy=False)
            assert len(runner.static_steps) == 1  # it went through the static loop
        finally:
            runner.static_steps = None
        assert got.token_ids.tolist() == expected.token_ids.tolist()
        assert static_cache.length == host_cache.length == len(ids) + len(expected.token_ids)
    assert len(expected.token_ids) < 8  # the 0.6 threshold stopped the draft early


@pytest.mark.parametrize("config", [
    ClaspConfig(mode="clasp", num_skip_layers=8, replan_interval=4, draft_dtype=None),
    ClaspConfig(),
], ids=["shared-M8", "defaults"])
def test_greedy_through_static_steps_equals_ar(engine, config):
    runner = engine.runner
    prompts = ["Name three primary colors.", "Write a short poem about the sea."]
    expected = {p: engine.generate(engine.encode(p), SamplingParams(max_new_tokens=40), ClaspConfig(mode="ar"))
                for p in prompts}
    runner.static_steps = StaticSteps(runner, capture=False)
    try:
        for p in prompts:
            result = engine.generate(engine.encode(p), SamplingParams(max_new_tokens=40), config)
            assert result.token_ids == expected[p].token_ids
            assert result.stats.num_draft_tokens > 0
        assert runner.static_steps.num_built > 0
    finally:
        runner.static_steps = None


def test_prefill_keeps_only_the_last_rows_hidden_states(engine):
    runner = engine.runner
    ids = torch.tensor(engine.encode("The capital of France is"))
    full, last = [], []
    runner.forward(ids, runner.new_cache(len(ids)), 0, hidden_states=full)
    runner.forward(ids, runner.new_cache(len(ids)), 0, last_only=True, hidden_states=last)
    assert [tuple(h.shape) for h in last] == [(1, runner.spec.hidden_size)] * (runner.spec.num_layers + 1)
    for a, b in zip(last, full):
        torch.testing.assert_close(a, b[-1:])
        assert a.untyped_storage().nbytes() == a.numel() * a.element_size()  # not a view of all rows


def test_cache_pool_reuses_storage_once_a_cache_is_dropped(engine):
    runner = engine.runner
    released = []
    pool = CachePool(keep_free=1, on_release=released.append)
    a = pool.new_cache(runner, 100)
    b = pool.new_cache(runner, 200)
    assert a.max_length == b.max_length == CachePool.MIN_CAPACITY
    assert a.keys[0] is not b.keys[0]  # both in use: separate storage
    assert pool.capacity(runner, 300) == 512 and pool.capacity(runner, 10**9) == runner.spec.max_context
    storage = a.keys[0]
    a.truncate(50)
    del a
    gc.collect()
    c = pool.new_cache(runner, 64)
    assert c.keys[0] is storage and c.length == 0  # reused, with its own lengths
    del b, c
    gc.collect()
    assert len(released) == 1  # keep_free=1: the second storage dropped went back to the allocator
    assert pool.num_allocated == 2


def test_fp8_weight_product_is_close_and_half_the_bytes():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=gen)
    x = torch.randn(3, 64, generator=gen)
    f = Fp8Weight.quantize(w)
    out = f(x)
    ref = x @ w.T
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert float((out - ref).norm() / ref.norm()) < 0.08  # e4m3: 3 mantissa bits on both operands
    assert f.nbytes() == 96 * 64 + 96 * 4 and f.shape == (96, 64)


def tiny_runner_for_backend() -> ModelRunner:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return ModelRunner.from_hf(LlamaForCausalLM(config).eval())


def test_cuda_backend_load_time_choices_run_on_cpu(engine):
    """The CUDA backend's prepare() rehearsed on CPU (no graphs, no memory checks): the static step
    passes its check, a draft copy is chosen by measurement among the candidates, costs are
    measured, caches come from the pool, and greedy output through all of it equals ar's."""
    from clasp.decoding import start_request, step

    runner = tiny_runner_for_backend()
    backend = CudaBackend()
    backend.prepare(runner, LoadOptions(torch.float16, "auto", calibration_ids=torch.randint(0, 64, (24,))))
    runner.backend = backend
    info = backend.describe()
    assert info["graph_check"]["passed"] and runner.static_steps is not None
    assert info["norm"]["fused"]
    names = [c["name"] for c in info["draft_kernel"]["candidates"]]
    assert names == ["shared", "fp8-rowwise", "int8-weight-only"]
    assert info["draft_kernel"]["chosen"] in names
    assert set(info["costs_ms"]) == {"rows_1", "rows_2", "rows_9", "draft_token"}
    costs = backend.cost_model(runner)
    assert costs.step == 1.0 and costs.per_draft_byte > 0 and costs.first_extra_row >= 0
    assert runner.new_cache(10).max_length == CachePool.MIN_CAPACITY

    def run(config):
        req = start_request(runner, engine.tokenizer, [5, 9, 17, 33, 2, 40],
                            SamplingParams(max_new_tokens=30, ignore_eos=True), config, frozenset())
        while req.result is None:
            step(runner, [req])
        return req.result

    ar = run(ClaspConfig(mode="ar"))
    for config in (ClaspConfig(mode="clasp", num_skip_layers=2, replan_interval=2), ClaspConfig()):
        result = run(config)
        assert result.token_ids == ar.token_ids
        assert result.stats.num_draft_tokens > 0
