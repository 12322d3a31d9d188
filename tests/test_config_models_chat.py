"""SFTConfig fields and defaults, ModelConfig and its helpers, GPU-only errors, setup_chat_format."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from sftune import (
    ModelConfig,
    SFTConfig,
    get_kbit_device_map,
    get_peft_config,
    get_quantization_config,
    setup_chat_format,
)
from sftune.compat import TRANSFORMERS_5
from sftune.config import normalize_model_init_kwargs
from sftune.models import load_model


def test_sft_config_documented_fields_and_defaults(tmp_path):
    args = SFTConfig(output_dir=str(tmp_path))
    expected = {
        "dataset_text_field": "text",
        "packing": False,
        "eval_packing": None,
        "max_seq_length": None,
        "max_length": None,
        "dataset_num_proc": None,
        "dataset_batch_size": 1000,
        "model_init_kwargs": None,
        "dataset_kwargs": None,
        "neftune_noise_alpha": None,
        "use_liger": False,
        "num_of_sequences": 1024,
        "chars_per_token": 3.6,
        "completion_only_loss": None,
        "assistant_only_loss": False,
    }
    for name, value in expected.items():
        assert getattr(args, name) == value, name
    assert args.dataset_options == {
        "skip_prepare_dataset": False,
        "add_special_tokens": True,
        "append_concat_token": True,
    }


def test_sft_config_rejects_unknown_dataset_kwargs_and_bad_choices(tmp_path):
    with pytest.raises(ValueError, match="Unknown dataset_kwargs"):
        _ = SFTConfig(output_dir=str(tmp_path), dataset_kwargs={"skip_prepare": True}).dataset_options
    with pytest.raises(ValueError, match="packing_strategy"):
        SFTConfig(output_dir=str(tmp_path), packing_strategy="greedy")
    with pytest.raises(ValueError, match="truncation_mode"):
        SFTConfig(output_dir=str(tmp_path), truncation_mode="middle")


def test_model_init_kwargs_dtype_strings():
    assert normalize_model_init_kwargs({"torch_dtype": "bfloat16"}) == {"dtype": torch.bfloat16}
    assert normalize_model_init_kwargs({"dtype": "torch.float16"}) == {"dtype": torch.float16}
    assert normalize_model_init_kwargs({"dtype": "auto"}) == {"dtype": "auto"}
    with pytest.raises(ValueError, match="Unknown dtype"):
        normalize_model_init_kwargs({"dtype": "float13"})


def test_model_config_has_the_17_documented_fields_and_defaults():
    fields = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    assert fields == {
        "model_name_or_path": None,
        "model_revision": "main",
        "torch_dtype": None,
        "trust_remote_code": False,
        "attn_implementation": None,
        "use_peft": False,
        "lora_r": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.05,
        "lora_target_modules": None,
        "lora_modules_to_save": None,
        "lora_task_type": "CAUSAL_LM",
        "use_rslora": False,
        "load_in_8bit": False,
        "load_in_4bit": False,
        "bnb_4bit_quant_type": "nf4",
        "use_bnb_nested_quant": False,
    }


def test_model_config_from_command_line_and_helpers():
    parser = HfArgumentParser(ModelConfig)
    (config,) = parser.parse_args_into_dataclasses(
        ["--model_name_or_path", "m", "--use_peft", "--lora_r", "8", "--lora_target_modules", "q_proj", "v_proj"]
    )
    assert config.lora_r == 8 and config.lora_target_modules == ["q_proj", "v_proj"]
    peft_config = get_peft_config(config)
    assert peft_config.r == 8 and set(peft_config.target_modules) == {"q_proj", "v_proj"}
    assert peft_config.lora_alpha == 32 and peft_config.task_type == "CAUSAL_LM"
    assert get_peft_config(ModelConfig()) is None
    assert get_quantization_config(ModelConfig()) is None
    if not TRANSFORMERS_5 and importlib.util.find_spec("bitsandbytes") is None:
        # transformers 4.x cannot build the config without bitsandbytes: a clear message says what to install
        with pytest.raises(RuntimeError, match="needs bitsandbytes"):
            get_quantization_config(ModelConfig(load_in_4bit=True))
        return
    quant = get_quantization_config(ModelConfig(load_in_4bit=True, torch_dtype="bfloat16"))
    assert quant.load_in_4bit and quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_compute_dtype == torch.bfloat16
    assert get_quantization_config(ModelConfig(load_in_8bit=True)).load_in_8bit
    if not torch.cuda.is_available():
        assert get_kbit_device_map() is None
    with pytest.raises(ValueError, match="exclusive"):
        ModelConfig(load_in_8bit=True, load_in_4bit=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"load_in_8bit": True}, "bitsandbytes|CUDA GPU"),
        ({"load_in_4bit": True}, "bitsandbytes|CUDA GPU"),
        ({"attn_implementation": "flash_attention_2"}, "flash-attn|CUDA GPU"),
    ],
)
def test_gpu_only_features_fail_before_loading_with_what_is_missing(tiny_llama_path, kwargs, needle):
    with pytest.raises(RuntimeError, match=needle):
        load_model(tiny_llama_path, kwargs)


def test_setup_chat_format_adds_tokens_template_and_resizes(tiny_llama_plain_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_plain_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_plain_path)
    before = len(tokenizer)
    model, tokenizer = setup_chat_format(model, tokenizer, resize_to_multiple_of=64)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.pad_token == "<|im_end|>"
    assert model.get_input_embeddings().weight.shape[0] % 64 == 0
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer) >= before
    assert model.config.eos_token_id == tokenizer.eos_token_id
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_setup_chat_format_refuses_an_existing_template(tiny_llama_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    with pytest.raises(ValueError, match="already has a chat template"):
        setup_chat_format(model, tokenizer)
