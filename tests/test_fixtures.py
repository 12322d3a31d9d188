"""The offline tiny models and tokenizers every other test builds on: they load, run, and render as expected."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from tests.fixtures import build_tiny_causal_lm

TWO_TURNS = [
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": "5."},
    {"role": "user", "content": "And times ten?"},
    {"role": "assistant", "content": "50!"},
]
SYSTEM = {"role": "system", "content": "Be brief."}


def test_plain_tokenizer_has_no_template_and_no_pad(tiny_tokenizer_path):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
    assert tok.chat_template is None
    assert tok.eos_token == "<|endoftext|>"
    assert tok.pad_token is None and tok.pad_token_id is None
    assert tok.bos_token is None
    assert tok.model_max_length == 512
    assert 600 <= len(tok) <= 1000
    text = "Hello world, the answer is 42: red fig!"
    ids = tok(text).input_ids
    assert tok.decode(ids) == text  # byte-level: lossless, no bos/eos added
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"):
        assert len(tok(special).input_ids) == 1, special


def test_chatml_tokenizer_renders_two_turns(tiny_chatml_tokenizer_path):
    tok = AutoTokenizer.from_pretrained(tiny_chatml_tokenizer_path)
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert tok.bos_token is None
    assert tok.apply_chat_template([SYSTEM, *TWO_TURNS], tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
        "<|im_start|>assistant\n5.<|im_end|>\n"
        "<|im_start|>user\nAnd times ten?<|im_end|>\n"
        "<|im_start|>assistant\n50!<|im_end|>\n"
    )
    assert tok.apply_chat_template(TWO_TURNS[:1], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n"
    )
    # transformers 5: tokenize=True returns a BatchEncoding unless return_dict=False.
    ids = tok.apply_chat_template(TWO_TURNS, tokenize=True, return_dict=False)
    assert ids == tok(tok.apply_chat_template(TWO_TURNS, tokenize=False)).input_ids
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 4


def test_llama2_tokenizer_renders_two_turns(tiny_llama2_tokenizer_path):
    tok = AutoTokenizer.from_pretrained(tiny_llama2_tokenizer_path)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert tok.apply_chat_template(TWO_TURNS, tokenize=False) == (
        "<s>[INST] What is 2 plus 3? [/INST] 5. </s><s>[INST] And times ten? [/INST] 50! </s>"
    )
    assert tok.apply_chat_template([SYSTEM, *TWO_TURNS[:2]], tokenize=False) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is 2 plus 3? [/INST] 5. </s>"
    )
    ids = tok(tok.apply_chat_template(TWO_TURNS, tokenize=False)).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id  # no extra bos/eos added by encoding
    assert ids.count(tok.convert_tokens_to_ids("[INST]")) == 2


@pytest.mark.parametrize(
    ("fixture", "model_type", "has_template"),
    [("tiny_llama_path", "llama", True), ("tiny_llama_plain_path", "llama", False), ("tiny_qwen2_path", "qwen2", True)],
)
def test_causal_lm_fixture_loads_and_trains(request, fixture, model_type, has_template):
    path = request.getfixturevalue(fixture)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    config = model.config
    assert config.model_type == model_type
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert (config.num_key_value_heads, config.intermediate_size, config.max_position_embeddings) == (2, 128, 512)
    assert config.vocab_size == len(tok)
    assert config.tie_word_embeddings is False
    assert config.eos_token_id == tok.eos_token_id
    assert (tok.chat_template is not None) == has_template
    assert model.dtype == torch.float32

    batch = tok(["the red cat says hello 12.", "two plus two is four!"], return_tensors=None)
    length = min(len(ids) for ids in batch.input_ids)
    input_ids = torch.tensor([ids[:length] for ids in batch.input_ids])
    out = model(input_ids=input_ids, labels=input_ids)
    assert torch.isfinite(out.loss)
    assert abs(out.loss.item() - math.log(len(tok))) < 1.0  # random init: close to uniform
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_t5_fixture_loads_and_trains(tiny_t5_path):
    tok = AutoTokenizer.from_pretrained(tiny_t5_path)
    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_path)
    assert model.config.model_type == "t5"
    assert model.config.d_model == 64 and model.config.num_layers == 2
    assert tok.pad_token_id is not None
    assert model.config.decoder_start_token_id == model.config.pad_token_id == tok.pad_token_id
    enc = tok(["what is two plus three?"], return_tensors="pt")
    enc.pop("token_type_ids", None)  # tokenizers 0.20 add them; transformers 4.x T5 does not take them
    labels = tok(["five."], return_tensors="pt").input_ids
    out = model(**enc, labels=labels)
    assert torch.isfinite(out.loss)


def test_build_tiny_causal_lm_is_seeded_and_takes_overrides(tiny_chatml_tokenizer_path, tiny_llama_path, tmp_path):
    again = build_tiny_causal_lm("llama", tiny_chatml_tokenizer_path, tmp_path / "again")
    first = AutoModelForCausalLM.from_pretrained(tiny_llama_path).state_dict()
    second = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)

    small = build_tiny_causal_lm(
        "qwen2", tiny_chatml_tokenizer_path, tmp_path / "small", num_hidden_layers=1, tie_word_embeddings=True
    )
    model = AutoModelForCausalLM.from_pretrained(small)
    assert model.config.num_hidden_layers == 1 and model.config.tie_word_embeddings is True
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert AutoTokenizer.from_pretrained(small).chat_template is not None
