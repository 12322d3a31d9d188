"""Helpers for tests/test_iterate.py: a tiny random model on a real vocabulary whose stop token is likely, a user
verifier given as `module:function`, and a runnable entry for the kill -9 resume test."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def tiny_model(tokenizer, stop_id: int, stop_bias: float = 8.0, seed: int = 0):
    """A random 2-layer Llama over `tokenizer`'s vocabulary; its output layer gets a bias on `stop_id` so replies
    end after a few tokens, as a trained model's do. Its generation config stops at the EOS and `stop_id`, as real
    chat models' do (Phi-3's and Gemma-2's generation_config.json name both)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=[tokenizer.eos_token_id, stop_id])  # fmt: skip
    model = LlamaForCausalLM(config)
    head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[stop_id] = stop_bias
    model.lm_head = head
    return model


def even_length(reply: str, reference) -> bool:
    """Accepts about half of random replies, deterministically."""
    return len(reply) % 2 == 0


def slow_even_length(reply: str, reference) -> bool:
    """even_length, slowly: gives the kill -9 test time to land mid-generation."""
    import time

    time.sleep(0.01)
    return len(reply) % 2 == 0


def raises(reply: str, reference) -> bool:
    raise KeyError("boom")


def end_of_turn_id(tokenizer) -> int:
    """The token the chat template renders right after a final reply."""
    from sftune.data import render

    return tokenizer.convert_tokens_to_ids(render.template_end_of_turn(tokenizer, render.template_for(tokenizer))[0])


def smollm2_tokenizer():
    from sftune.models import ensure_pad_token
    from tests import real_tokenizers

    return ensure_pad_token(real_tokenizers.load("smollm2"))


def run_from_recipe(recipe: str, resume: bool) -> None:
    """python -m tests.iterate_helpers RECIPE.json [--resume]: the loop with the tiny model, as a process to kill."""
    from sftune.iterate import IterateConfig, iterate

    tokenizer = smollm2_tokenizer()
    model = tiny_model(tokenizer, end_of_turn_id(tokenizer))
    config = IterateConfig.from_dict(json.loads(Path(recipe).read_text()))
    iterate(config, resume=resume, model=model, tokenizer=tokenizer)


if __name__ == "__main__":
    run_from_recipe(sys.argv[1], "--resume" in sys.argv)
