"""Tiny random models and tokenizers, built offline once per test session and passed to tests by path."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.fixtures import (  # noqa: E402
    CHATML_TEMPLATE,
    LLAMA2_TEMPLATE,
    build_tiny_causal_lm,
    build_tiny_t5,
    build_tokenizer,
)


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory):
    """No chat template, eos <|endoftext|>, no pad token (exercises the pad fallback)."""
    return build_tokenizer(tmp_path_factory.mktemp("tok_plain"))


@pytest.fixture(scope="session")
def tiny_chatml_tokenizer_path(tmp_path_factory):
    """ChatML template, eos = pad = <|im_end|> (as in SmolLM2)."""
    return build_tokenizer(
        tmp_path_factory.mktemp("tok_chatml"), chat_template=CHATML_TEMPLATE, eos="<|im_end|>", pad="<|im_end|>"
    )


@pytest.fixture(scope="session")
def tiny_llama2_tokenizer_path(tmp_path_factory):
    """A Llama-2-style [INST] template, bos <s>, eos </s>, pad <pad>."""
    return build_tokenizer(
        tmp_path_factory.mktemp("tok_llama2"), chat_template=LLAMA2_TEMPLATE, eos="</s>", pad="<pad>", bos="<s>"
    )


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory, tiny_chatml_tokenizer_path):
    return build_tiny_causal_lm("llama", tiny_chatml_tokenizer_path, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def tiny_llama_plain_path(tmp_path_factory, tiny_tokenizer_path):
    return build_tiny_causal_lm("llama", tiny_tokenizer_path, tmp_path_factory.mktemp("llama_plain"))


@pytest.fixture(scope="session")
def tiny_qwen2_path(tmp_path_factory, tiny_chatml_tokenizer_path):
    return build_tiny_causal_lm("qwen2", tiny_chatml_tokenizer_path, tmp_path_factory.mktemp("qwen2"))


@pytest.fixture(scope="session")
def tiny_t5_path(tmp_path_factory, tiny_llama2_tokenizer_path):
    return build_tiny_t5(tiny_llama2_tokenizer_path, tmp_path_factory.mktemp("t5"))
