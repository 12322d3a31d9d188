"""The code examples of TRL's SFTTrainer docs, with only the import changed (tiny local models and datasets
of the same columns stand in for hub names). Each trains one step."""

from __future__ import annotations

import pytest
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftune import DataCollatorForCompletionOnlyLM, ModelConfig, SFTConfig, SFTTrainer, get_peft_config

FAST = dict(max_steps=1, per_device_train_batch_size=2, report_to="none", save_strategy="no", disable_tqdm=True)


@pytest.fixture
def imdb():
    return Dataset.from_list([{"text": f"this film was number {i} and it was fine"} for i in range(6)])


def test_quickstart_model_by_name(tiny_llama_plain_path, tmp_path, imdb):
    sft_config = SFTConfig(dataset_text_field="text", max_seq_length=512, output_dir=str(tmp_path), **FAST)
    trainer = SFTTrainer(str(tiny_llama_plain_path), train_dataset=imdb, args=sft_config)
    trainer.train()


def test_completion_only_with_formatting_func(tiny_llama_plain_path, tmp_path):
    dataset = Dataset.from_list([{"instruction": f"add {i} and 1", "output": str(i + 1)} for i in range(6)])
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_plain_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_plain_path)
    tokenizer.pad_token = tokenizer.eos_token

    def formatting_prompts_func(example):
        output_texts = []
        for i in range(len(example["instruction"])):
            text = f"### Question: {example['instruction'][i]}\n ### Answer: {example['output'][i]}"
            output_texts.append(text)
        return output_texts

    response_template = " ### Answer:"
    collator = DataCollatorForCompletionOnlyLM(response_template, tokenizer=tokenizer)
    trainer = SFTTrainer(model, train_dataset=dataset, args=SFTConfig(output_dir=str(tmp_path), **FAST),
                         formatting_func=formatting_prompts_func, data_collator=collator)  # fmt: skip
    batch = collator([trainer.train_dataset[0]])
    trained = [t for t in batch["labels"][0].tolist() if t != -100]
    assert tokenizer.decode(trained) == " 1" + tokenizer.eos_token
    trainer.train()


def test_assistant_completions_with_instruction_template(tiny_llama_plain_path, tmp_path):
    dataset = Dataset.from_list(
        [{"text": f"### Human: say {w}### Assistant: {w} {w}### Human: again### Assistant: {w}"} for w in "abcdef"]
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_plain_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_plain_path)
    instruction_template = "### Human:"
    response_template = "### Assistant:"
    collator = DataCollatorForCompletionOnlyLM(instruction_template=instruction_template,
                                               response_template=response_template, tokenizer=tokenizer, mlm=False)  # fmt: skip
    trainer = SFTTrainer(model, args=SFTConfig(output_dir=str(tmp_path), dataset_text_field="text", **FAST),
                         train_dataset=dataset, data_collator=collator)  # fmt: skip
    labels = collator([trainer.train_dataset[0]])["labels"][0].tolist()
    assert tokenizer.decode([t for t in labels if t != -100]) == " a a a" + tokenizer.eos_token
    trainer.train()


def test_conversational_and_instruction_formats_with_packing(tiny_llama_path, tmp_path):
    conversations = Dataset.from_list(
        [
            {
                "messages": [
                    {"role": "system", "content": "You are helpful"},
                    {"role": "user", "content": f"Q{i}?"},
                    {"role": "assistant", "content": f"A{i}."},
                ]
            }
            for i in range(8)
        ]  # fmt: skip
    )
    instructions = Dataset.from_list([{"prompt": f"prompt {i}", "completion": f" answer {i}"} for i in range(8)])
    for dataset in (conversations, instructions):
        sft_config = SFTConfig(packing=True, output_dir=str(tmp_path), **FAST)
        SFTTrainer(str(tiny_llama_path), args=sft_config, train_dataset=dataset).train()


def test_packing_with_per_example_formatting_func(tiny_llama_plain_path, tmp_path):
    dataset = Dataset.from_list([{"question": f"q{i}", "answer": f"a{i}"} for i in range(8)])

    def formatting_func(example):
        text = f"### Question: {example['question']}\n ### Answer: {example['answer']}"
        return text

    sft_config = SFTConfig(packing=True, output_dir=str(tmp_path), **FAST)
    trainer = SFTTrainer(str(tiny_llama_plain_path), train_dataset=dataset, args=sft_config,
                         formatting_func=formatting_func)  # fmt: skip
    assert sum(len(r["seq_lengths"]) for r in trainer.train_dataset) == 8
    trainer.train()


def test_model_init_kwargs_peft_and_neftune(tiny_llama_path, tmp_path, imdb):
    from peft import LoraConfig

    sft_config = SFTConfig(model_init_kwargs={"torch_dtype": "bfloat16"}, output_dir=str(tmp_path), **FAST)
    SFTTrainer(str(tiny_llama_path), train_dataset=imdb, args=sft_config).train()
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
    SFTTrainer(str(tiny_llama_path), train_dataset=imdb, args=SFTConfig(output_dir=str(tmp_path), **FAST),
               peft_config=peft_config).train()  # fmt: skip
    sft_config = SFTConfig(neftune_noise_alpha=5, output_dir=str(tmp_path), **FAST)
    SFTTrainer(str(tiny_llama_path), train_dataset=imdb, args=sft_config).train()


def test_model_config_utility(tiny_llama_path, tmp_path, imdb):
    import torch

    from sftune import get_kbit_device_map, get_quantization_config

    model_config = ModelConfig(model_name_or_path=str(tiny_llama_path), attn_implementation=None, use_peft=True)
    training_args = SFTConfig(output_dir=str(tmp_path), **FAST)
    torch_dtype = (
        model_config.torch_dtype
        if model_config.torch_dtype in ["auto", None]
        else getattr(torch, model_config.torch_dtype)
    )
    quantization_config = get_quantization_config(model_config)
    model_kwargs = dict(
        revision=model_config.model_revision,
        trust_remote_code=model_config.trust_remote_code,
        attn_implementation=model_config.attn_implementation,
        torch_dtype=torch_dtype,
        use_cache=False if training_args.gradient_checkpointing else True,
        device_map=get_kbit_device_map() if quantization_config is not None else None,
        quantization_config=quantization_config,
    )
    training_args.model_init_kwargs = model_kwargs
    trainer = SFTTrainer(model=model_config.model_name_or_path, args=training_args, train_dataset=imdb,
                         peft_config=get_peft_config(model_config))  # fmt: skip
    trainer.train()
