"""SFTTrainer on tiny models: the documented API, end to end."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from sftune import SFTConfig, SFTTrainer

MESSAGES = [
    {"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w} {w}."}]}
    for w in ["red", "blue", "green", "amber", "violet", "teal", "gold", "pink"]
]


def config(tmp_path, **overrides) -> SFTConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        max_seq_length=64,
        disable_tqdm=True,
    )
    values.update(overrides)
    return SFTConfig(**values)


def test_model_by_path_trains_logs_metrics_and_reloads(tiny_llama_path, tmp_path):
    trainer = SFTTrainer(str(tiny_llama_path), args=config(tmp_path), train_dataset=Dataset.from_list(MESSAGES))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    logged = trainer.state.log_history[0]
    assert {"loss", "num_tokens", "mean_token_accuracy"} <= set(logged)
    assert logged["num_tokens"] > 0 and 0.0 <= logged["mean_token_accuracy"] <= 1.0
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[key], value)
    assert (tmp_path / "saved" / "README.md").read_text().startswith("---")
    assert AutoTokenizer.from_pretrained(tmp_path / "saved").chat_template


def test_text_dataset_with_model_instance_and_tokenizer(tiny_llama_plain_path, tiny_tokenizer_path, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_plain_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
    assert tokenizer.pad_token is None
    data = Dataset.from_list([{"text": f"the number {i} is here"} for i in range(8)])
    trainer = SFTTrainer(model, args=config(tmp_path, padding_free=False), train_dataset=data, tokenizer=tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token  # the fallback
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    ends = batch["attention_mask"].sum(1) - 1
    # EOS is the last real token of each row and is trained on, although pad == eos.
    for row, end in enumerate(ends.tolist()):
        assert batch["labels"][row, end] == tokenizer.eos_token_id
    trainer.train()


def test_model_init_kwargs_with_an_instance_is_refused(tiny_llama_path, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    with pytest.raises(ValueError, match="model_init_kwargs"):
        SFTTrainer(model, args=config(tmp_path, model_init_kwargs={"dtype": "bfloat16"}),
                   train_dataset=Dataset.from_list(MESSAGES))  # fmt: skip


def test_model_init_kwargs_string_dtype(tiny_llama_path, tmp_path):
    args = config(tmp_path, model_init_kwargs={"torch_dtype": "bfloat16"})
    trainer = SFTTrainer(str(tiny_llama_path), args=args, train_dataset=Dataset.from_list(MESSAGES))
    assert trainer.model.dtype == torch.bfloat16


def test_max_seq_length_default_and_newer_name(tiny_llama_path, tmp_path):
    args = config(tmp_path, max_seq_length=None)
    trainer = SFTTrainer(str(tiny_llama_path), args=args, train_dataset=Dataset.from_list(MESSAGES))
    assert args.max_seq_length == min(trainer.processing_class.model_max_length, 1024)
    assert config(tmp_path, max_seq_length=None, max_length=77).max_seq_length == 77
    with pytest.raises(ValueError, match="two names"):
        config(tmp_path, max_seq_length=10, max_length=20)


def test_plain_training_arguments_are_accepted(tiny_llama_path, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", learning_rate=3e-4)
    trainer = SFTTrainer(str(tiny_llama_path), args=args, train_dataset=Dataset.from_list(MESSAGES))
    assert isinstance(trainer.args, SFTConfig) and trainer.args.learning_rate == 3e-4


def test_legacy_trainer_keyword_arguments(tiny_llama_path, tmp_path):
    with pytest.warns(FutureWarning, match="deprecated"):
        trainer = SFTTrainer(str(tiny_llama_path), args=config(tmp_path), train_dataset=Dataset.from_list(MESSAGES),
                             max_seq_length=32)  # fmt: skip
    assert trainer.args.max_seq_length == 32


def test_eval_dataset_dict(tiny_llama_path, tmp_path):
    data = Dataset.from_list(MESSAGES)
    trainer = SFTTrainer(str(tiny_llama_path), args=config(tmp_path), train_dataset=data,
                         eval_dataset={"a": data.select(range(4)), "b": data.select(range(4, 8))})  # fmt: skip
    metrics = trainer.evaluate()
    assert "eval_a_loss" in metrics and "eval_b_loss" in metrics


def test_peft_config_trains_only_adapters(tiny_llama_path, tmp_path):
    from peft import LoraConfig, PeftModel

    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    args = config(tmp_path, gradient_checkpointing=True)
    trainer = SFTTrainer(str(tiny_llama_path), args=args, train_dataset=Dataset.from_list(MESSAGES),
                         peft_config=peft_config)  # fmt: skip
    assert isinstance(trainer.model, PeftModel)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if p.requires_grad)
    # A PeftModel passed in keeps training without peft_config.
    again = SFTTrainer(trainer.model, args=config(tmp_path), train_dataset=Dataset.from_list(MESSAGES))
    again.train()
    with pytest.raises(ValueError, match="already a PeftModel"):
        SFTTrainer(trainer.model, args=config(tmp_path), train_dataset=Dataset.from_list(MESSAGES),
                   peft_config=peft_config)  # fmt: skip


def test_neftune_noise_only_during_training(tiny_llama_path, tmp_path):
    args = config(tmp_path, neftune_noise_alpha=5.0)
    trainer = SFTTrainer(str(tiny_llama_path), args=args, train_dataset=Dataset.from_list(MESSAGES))
    embeddings = trainer.model.get_input_embeddings()
    ids = torch.tensor([[5, 6, 7]])
    seen = []
    handle = embeddings.register_forward_hook(lambda m, i, o: seen.append(len(m._forward_hooks)))
    trainer.train()
    handle.remove()
    assert seen and min(seen) >= 2  # our probe plus NEFTune's hook while training
    assert not embeddings._forward_hooks  # gone after train()
    trainer.model.eval()
    torch.testing.assert_close(embeddings(ids), embeddings(ids))


def test_completion_only_loss_on_prompt_completion(tiny_llama_path, tmp_path):
    data = Dataset.from_list([{"prompt": f"Say {w}:", "completion": f" {w}"} for w in ["a", "b", "c", "d"]])
    trainer = SFTTrainer(str(tiny_llama_path), args=config(tmp_path), train_dataset=data)
    row = trainer.train_dataset[0]
    tokenizer = trainer.processing_class
    trained = [t for t, m in zip(row["input_ids"], row["loss_mask"], strict=True) if m]
    assert tokenizer.decode(trained) == " a" + tokenizer.eos_token
    trainer.train()


def test_skip_prepare_dataset_with_custom_collator(tiny_llama_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    raw = Dataset.from_list([{"sentence": f"row {i}", "extra": i} for i in range(8)])

    def collate(examples):
        batch = tokenizer([e["sentence"] for e in examples], return_tensors="pt", padding=True)
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch

    args = config(tmp_path, remove_unused_columns=False, dataset_text_field="",
                  dataset_kwargs={"skip_prepare_dataset": True})  # fmt: skip
    trainer = SFTTrainer(str(tiny_llama_path), args=args, train_dataset=raw, data_collator=collate,
                         processing_class=tokenizer)  # fmt: skip
    assert trainer.train_dataset is raw
    trainer.train()


def test_use_liger_without_the_package_warns_and_trains(tiny_llama_path, tmp_path):
    with pytest.warns(UserWarning, match="[Ll]iger"):
        trainer = SFTTrainer(str(tiny_llama_path), args=config(tmp_path, use_liger=True),
                             train_dataset=Dataset.from_list(MESSAGES))  # fmt: skip
    trainer.train()


def test_packing_epoch_visits_every_example_exactly_once_with_masks_kept(tiny_llama_path, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"Say {w} {i}."}, {"role": "assistant", "content": f"{w} {i}"}]}
        for i, w in enumerate(["red", "blue", "green", "amber", "violet", "teal", "gold", "pink"] * 3)
    ]
    args = config(tmp_path, packing=True, max_seq_length=64, max_steps=-1, num_train_epochs=2,
                  per_device_train_batch_size=2, assistant_only_loss=True)  # fmt: skip
    unpacked = SFTTrainer(str(tiny_llama_path), args=config(tmp_path, assistant_only_loss=True),
                          train_dataset=Dataset.from_list(rows)).train_dataset  # fmt: skip
    trainer = SFTTrainer(str(tiny_llama_path), args=args, train_dataset=Dataset.from_list(rows))
    assert len(trainer.train_dataset) < len(rows)  # several examples per row
    seen = []
    collate = trainer.data_collator

    def recording(features):
        for f in features:
            start = 0
            for length in f["seq_lengths"]:
                seen.append(
                    (tuple(f["input_ids"][start : start + length]), tuple(f["loss_mask"][start : start + length]))
                )
                start += length
        return collate(features)

    trainer.data_collator = recording
    trainer.train()
    expected = sorted((tuple(r["input_ids"]), tuple(r["loss_mask"])) for r in unpacked)
    assert sorted(seen) == sorted(expected * 2)  # two epochs, each example once per epoch, masks intact
    assert trainer.state.global_step == 2 * -(-len(trainer.train_dataset) // 2)


def test_packing_truncates_over_long_examples_to_max_length(tiny_llama_plain_path, tmp_path):
    rows = [{"text": " ".join(f"w{i}" for i in range(300))}, {"text": "short one"}]
    args = config(tmp_path, packing=True, max_seq_length=32, packing_strategy="bfd")
    trainer = SFTTrainer(str(tiny_llama_plain_path), args=args, train_dataset=Dataset.from_list(rows))
    lengths = sorted(length for row in trainer.train_dataset for length in row["seq_lengths"])
    assert lengths[-1] == 32 and len(lengths) == 2  # cut to max_length (kept from the start), never dropped


def test_throughput_and_mfu_are_logged(tiny_llama_path, tmp_path):
    trainer = SFTTrainer(str(tiny_llama_path), args=config(tmp_path), train_dataset=Dataset.from_list(MESSAGES))
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(entry["tokens_per_second"] > 0 and 0 < entry["mfu"] < 1 for entry in logged)


def test_padding_free_batches_train_exactly_like_padded_ones(tiny_llama_path, tmp_path):
    words = ["red", "blue", "green", "amber", "violet", "teal", "gold", "pink"]
    rows = [{"prompt": f"Say {w} " + "and more " * (i % 5), "completion": f" {w}"} for i, w in enumerate(words * 2)]
    states, fed, logged = [], [], []
    for padding_free in (False, True):
        args = config(tmp_path / str(padding_free), padding_free=padding_free, max_steps=2,
                      per_device_train_batch_size=8, gradient_accumulation_steps=1, loss_chunk_size=0)  # fmt: skip
        trainer = SFTTrainer(str(tiny_llama_path), args=args, train_dataset=Dataset.from_list(rows))
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
        fed.append(batch["input_ids"].numel())
        trainer.train()
        states.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        logged.append([entry["num_tokens"] for entry in trainer.state.log_history if "loss" in entry])
    assert logged[0] == logged[1]  # the same real tokens, step by step
    assert fed[1] < fed[0]  # fewer padded positions
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], atol=1e-5, rtol=1e-4)


def test_training_flops_count_weight_gradients_only_for_trainable_parameters(tiny_llama_path):
    from peft import LoraConfig, get_peft_model

    from sftune.throughput import training_flops_per_token

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    n = sum(p.numel() for p in model.parameters())
    assert training_flops_per_token(model) == 6 * n
    adapted = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    total = sum(p.numel() for p in adapted.parameters())
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert training_flops_per_token(adapted) == 4 * total + 2 * trainable < 6 * total
