"""The full model's fp32 few-row products and one-call plain step (clasp.fp32_kernels), every path
forced on whatever CPU runs the tests: each instruction set of the blocked kernel against float64
and against torch's products, greedy `ar` and CLaSp output through each against torch's own `ar`,
the one-call step (plain and with layers skipped) against the runner's torch step, the selection
rule, and the per-machine record."""

from __future__ import annotations

import pytest
import torch

from clasp import cpu_draft, draft_kernels, fp32_kernels
from clasp.config import ClaspConfig, SamplingParams
from clasp.fp32_kernels import Fp32KernelChoice, select
from clasp.loading import load_model
from clasp.matrices import BlockedFp32Weight, DenseMatrix
from clasp.model_runner import ModelRunner, Segment

PROMPTS = ["Write a short poem about the sea.", "Explain what a prime number is."]
NEW_TOKENS = 40


def isas() -> list[str]:
    try:
        return cpu_draft.supported_fp32_isas()
    except RuntimeError as e:  # no compiler: the torch path is all there is, and the tests say so
        pytest.skip(f"the CPU kernel extension cannot be built here: {e}")


@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_blocked_products_match_float64_and_torch_for_every_row_count(isa):
    if isa not in isas():
        pytest.skip(f"this CPU cannot run {isa}")
    torch.manual_seed(0)
    for out, inp in ((40, 24), (576, 576), (100, 1536)):  # a padded last block, square, wide
        w = torch.randn(out, inp)
        m = BlockedFp32Weight.block(w, isa)
        for rows in (1, 2, 3, 5, 9, 15, 16, 17, 40):  # 17 and 40 leave the kernel's range: torch's path
            x = torch.randn(rows, inp)
            reference = x.double() @ w.double().T
            got = m(x)
            assert got.shape == (rows, out) and got.dtype == torch.float32
            assert float((got.double() - reference).abs().max() / reference.abs().max()) < 1e-5
            torch.testing.assert_close(got, DenseMatrix(w)(x), rtol=1e-5, atol=1e-4)
    m.max_rows = 0  # off: the plain matrix's path
    x = torch.randn(2, w.shape[1])
    torch.testing.assert_close(m(x), DenseMatrix(w)(x), rtol=0, atol=0)


def test_selection_rule():
    ok = {"torch": 0.0, "clasp-avx512": 2e-7, "clasp-avx2": 3e-7, "clasp-portable": 2e-7}
    ms = {"torch": {1: 27.0, 2: 38.0, 5: 39.0, 9: 43.0, 16: 49.0, 32: 63.0},
          "clasp-avx512": {1: 22.0, 2: 24.0, 5: 26.0, 9: 28.0, 16: 32.0, 32: 65.0},
          "clasp-avx2": {1: 24.0, 2: 27.0, 5: 26.0, 9: 35.0, 16: 50.0, 32: 102.0},
          "clasp-portable": {1: 53.0}}
    assert select(ms, ok) == ("avx512", 16)  # loses at 32 rows: torch from 17 on
    # An inaccurate kernel is never chosen, however fast.
    assert select(ms, {**ok, "clasp-avx512": 3e-3}) == ("avx2", 9)  # 50 > 0.95 * 49 at 16 rows
    # Not faster at one row by the margin: torch keeps every few-row product.
    assert select({**ms, "torch": {**ms["torch"], 1: 22.5}}, {"torch": 0.0, "clasp-avx512": 2e-7}) == (None, 0)
    assert select(ms, {"torch": 0.0, "clasp-avx512": "could not run"}) == (None, 0)


@pytest.fixture(scope="module")
def own_runner():
    """A runner of the embedded model whose fp32 kernels these tests switch freely (the session's
    engine keeps the one chosen at its load)."""
    model, _ = load_model(None, torch.float32, torch.device("cpu"))
    return ModelRunner.from_hf(model)


def _greedy(runner, engine, prompt: str, mode: str) -> list[int]:
    from clasp.decoding import generate

    config = ClaspConfig(mode=mode, draft_dtype=None)  # the draft shares the full weights: through them too
    result = None
    for chunk in generate(runner, engine.tokenizer, engine.encode(prompt), SamplingParams(max_new_tokens=NEW_TOKENS),
                          config, engine.eos_ids):
        result = chunk.result
    return result.token_ids


def test_greedy_output_through_every_fp32_path_equals_torch_ar(own_runner, engine):
    """torch's products are the reference; each instruction set of the blocked kernel, with and
    without the one-call step, must give the same greedy tokens, and CLaSp through it the same
    again (its shared-weight drafts run through the one-call step with layers skipped)."""
    runner = own_runner
    fp32_kernels.install(runner, Fp32KernelChoice.forced("torch"))
    assert runner.fused_step is None
    reference = {p: _greedy(runner, engine, p, "ar") for p in PROMPTS}
    for isa in isas():
        for fused in (True, False):
            fp32_kernels.install(runner, Fp32KernelChoice.forced(f"clasp-{isa}", fused_step=fused))
            assert all(isinstance(m, BlockedFp32Weight) and m.kernel.isa == cpu_draft.FP32_ISAS[isa]
                       for m in runner.weights.matrices())
            assert (runner.fused_step is not None) == fused
            for prompt in PROMPTS:
                assert _greedy(runner, engine, prompt, "ar") == reference[prompt], (isa, fused, prompt)
            assert _greedy(runner, engine, PROMPTS[0], "clasp") == reference[PROMPTS[0]], (isa, fused)
    fp32_kernels.install(runner, Fp32KernelChoice.forced("torch"))


def test_one_call_step_matches_the_runners_step(own_runner, engine):
    runner = own_runner
    ids = torch.tensor(engine.encode(PROMPTS[1]))
    for isa in isas():
        fp32_kernels.install(runner, Fp32KernelChoice.forced(f"clasp-{isa}"))
        fused = runner.fused_step
        for skip in (frozenset(), frozenset({3, 7, 20, 29})):
            caches = [runner.new_cache(64, num_slots=2) for _ in range(2)]
            for cache in caches:
                runner.forward(ids[:-1], cache, 0, slot=1)
            out = []
            for cache, step in zip(caches, (fused, None)):
                runner.fused_step = step
                out.append(runner.forward_batch([Segment(1, ids.shape[0] - 1, ids[-1:], skip)], cache, draft=bool(skip)))
                assert cache.lengths[1] == ids.shape[0] and cache.lengths[0] == 0
            runner.fused_step = fused
            torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-4)
            for layer in range(runner.spec.num_layers):  # the same KV written, none where skipped
                torch.testing.assert_close(caches[0].keys[layer][1], caches[1].keys[layer][1], rtol=1e-4, atol=1e-5)
    fp32_kernels.install(runner, Fp32KernelChoice.forced("torch"))


def test_the_choice_is_measured_once_per_machine(own_runner, engine, tmp_path, monkeypatch):
    runner = own_runner
    monkeypatch.setenv("CLASP_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("CLASP_RECALIBRATE", raising=False)
    ids = torch.tensor(engine.tokenizer(draft_kernels.CALIBRATION_TEXT)["input_ids"])
    names = ["torch", f"clasp-{isas()[0]}"]
    first = fp32_kernels.choose_cached(runner, ids, names, "model:1x1:1")
    path = fp32_kernels.cache_path("model:1x1:1", names)
    assert not first.cached and path.exists()
    assert set(first.ms) == set(names) and all(isinstance(first.errors[n], float) for n in names)
    assert first.errors[names[1]] < fp32_kernels.MAX_RELATIVE_ERROR
    if first.isa is not None:
        assert first.step_agreement is not None and set(first.step_ms) == {"torch", "fused"}
    fp32_kernels.install(runner, Fp32KernelChoice.forced("torch"))
    second = fp32_kernels.choose_cached(runner, ids, names, "model:1x1:1")
    assert second.cached and (second.isa, second.max_rows, second.fused_step) == (first.isa, first.max_rows,
                                                                                   first.fused_step)
    assert (runner.fused_step is not None) == first.fused_step
    monkeypatch.setenv("CLASP_RECALIBRATE", "1")
    assert not fp32_kernels.choose_cached(runner, ids, names, "model:1x1:1").cached
    fp32_kernels.install(runner, Fp32KernelChoice.forced("torch"))


def test_forced_choices_and_bad_names(engine):
    with pytest.raises(ValueError, match="fp32_kernel must be one of"):
        Fp32KernelChoice.forced("clasp-sse2")
    from clasp.backends.base import LoadOptions
    from clasp.backends.cpu import set_up_fp32

    with pytest.raises(ValueError, match="fp32_kernel must be one of"):
        set_up_fp32(engine.runner, LoadOptions(None, None, fp32_kernel="mkl"))
    info = engine.runner.backend.describe()["fp32_kernel"]
    assert info is not None and isinstance(info["one_call_step"], bool)


def test_rows_in_one_call_match_the_torch_path(own_runner, engine):
    """A ragged batch (a verification of four tokens in one slot, one token in another, a third
    request two tokens in) through one C++ call equals the torch path's logits and KV, with and
    without per-row skip sets."""
    runner = own_runner
    ids = [torch.tensor(engine.encode(p)) for p in PROMPTS + ["Name three rivers in Europe."]]
    for isa in isas():
        fp32_kernels.install(runner, Fp32KernelChoice.forced(f"clasp-{isa}"))
        fused = runner.fused_step
        for skips in ([frozenset()] * 3, [frozenset({2, 5}), frozenset(), frozenset({29})]):
            out, caches = [], []
            for step in (fused, None):
                runner.fused_step = step
                cache = runner.new_cache(96, num_slots=3)
                starts = [len(t) - n for t, n in zip(ids, (4, 1, 2))]
                for slot, (t, start) in enumerate(zip(ids, starts)):
                    runner.forward(t[:start], cache, 0, slot=slot)
                segments = [Segment(slot, start, t[start:], k) for slot, (t, start, k) in enumerate(zip(ids, starts, skips))]
                out.append(runner.forward_batch(segments, cache, draft=any(skips)))
                assert cache.lengths == [len(t) for t in ids]
                caches.append(cache)
            runner.fused_step = fused
            assert out[0].shape == (7, runner.spec.vocab_size)
            torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-4)
            for layer in range(runner.spec.num_layers):
                torch.testing.assert_close(caches[0].keys[layer], caches[1].keys[layer], rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(caches[0].values[layer], caches[1].values[layer], rtol=1e-4, atol=1e-4)
            last = runner.forward_batch([Segment(0, len(ids[0]) - 1, ids[0][-1:])], caches[0], last_only=True)
            assert last.shape == (1, runner.spec.vocab_size)
    fp32_kernels.install(runner, Fp32KernelChoice.forced("torch"))
