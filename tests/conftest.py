"""Shared fixtures: the real embedded model, loaded once per session (float32 on CPU).

Float32 is used throughout so that batched verification is numerically the same as
step-by-step decoding, which exact greedy equality depends on.
"""

from __future__ import annotations

import pytest
import torch

from clasp.config import ClaspConfig
from clasp.engine import Engine
from clasp.loading import load_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def engine() -> Engine:
    return Engine.load(None, ClaspConfig(), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def hf_model():
    """A separate Hugging Face copy of the same weights, for transformers' own generate."""
    model, _ = load_model(None, torch.float32, torch.device("cpu"))
    return model


@pytest.fixture(scope="session")
def tiny_runner():
    """A 4-layer random Llama for hand-checked DP cases (seeded, float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from clasp.model_runner import ModelRunner

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    return ModelRunner.from_hf(model)
