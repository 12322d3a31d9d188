"""Models for the GPU tests and their CPU twins, built offline from the tiny tokenizer (see tests/fixtures.py)."""

from __future__ import annotations

import pytest

from tests.fixtures import build_tiny_causal_lm

# Wider random weights than the default 0.02: logits then span several nats, so a small adapter can lower the loss
# within a few steps and a leak between documents moves losses far more than bf16 rounding does.
LEARNABLE = dict(initializer_range=0.1)
# Real heads (head_dim 64, grouped KV) so the GPU's attention kernels take their usual paths.
GPU_SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="session")
def learnable_llama_path(tmp_path_factory, tiny_chatml_tokenizer_path):
    return build_tiny_causal_lm(
        "llama", tiny_chatml_tokenizer_path, tmp_path_factory.mktemp("llama_learn"), **LEARNABLE
    )


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def gpu_model_path(request, tmp_path_factory, tiny_chatml_tokenizer_path):
    out = tmp_path_factory.mktemp(f"gpu_{request.param}")
    return build_tiny_causal_lm(request.param, tiny_chatml_tokenizer_path, out, **GPU_SHAPE, **LEARNABLE)
