"""IterativeSFTTrainer.step() goes through SFTTrainer's pipeline; texts_labels; plain TrainingArguments."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from sftune import IterativeSFTConfig, IterativeSFTTrainer, SFTConfig, SFTTrainer
from sftune.data.collators import IGNORE_INDEX, DataCollatorForSFT

TEXTS = ["To be or not to be.", "the sky is blue and the cat is red today", "one two"]


def config(tmp_path, **overrides) -> IterativeSFTConfig:
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=1e-3,
                  report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True, seed=3)  # fmt: skip
    values.update(overrides)
    return IterativeSFTConfig(**values)


def test_texts_labels_equal_to_texts_is_the_same_as_no_texts_labels(tiny_llama_path, tmp_path):
    states, rows = [], []
    for texts_labels in (None, TEXTS):
        trainer = IterativeSFTTrainer(str(tiny_llama_path), args=config(tmp_path))
        rows.append(trainer.prepare_examples(None, None, None, TEXTS, texts_labels))
        trainer.step(texts=TEXTS, texts_labels=texts_labels)
        states.append(trainer.model.state_dict())
    assert rows[0] == rows[1]
    tok = AutoTokenizer.from_pretrained(tiny_llama_path)
    assert tok.decode(rows[1][0]["input_ids"]) == "To be or not to be." + tok.eos_token  # once, not twice
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key])


def test_texts_labels_suffix_trains_only_the_suffix_and_other_values_are_refused(tiny_llama_path, tmp_path):
    trainer = IterativeSFTTrainer(str(tiny_llama_path), args=config(tmp_path))
    tok = trainer.tokenizer
    (example,) = trainer.prepare_examples(None, None, None, ["Q: colour? A: blue"], [" A: blue"])
    prefix = tok("Q: colour?", add_special_tokens=False)["input_ids"]
    assert example["loss_mask"] == [0] * len(prefix) + [1] * (len(example["input_ids"]) - len(prefix))
    with pytest.raises(ValueError, match=r"texts_labels\[0\] is neither texts\[0\] nor a suffix"):
        trainer.step(texts=["Say red:"], texts_labels=[" red red"])


def test_step_rows_are_sftrainers_rows(tiny_llama_plain_path, tmp_path):
    """The same text becomes the same tokens and loss mask in step() as in SFTTrainer."""
    sft = SFTTrainer(str(tiny_llama_plain_path), args=SFTConfig(output_dir=str(tmp_path / "sft"), report_to="none"),
                     train_dataset=Dataset.from_list([{"text": t} for t in TEXTS]))  # fmt: skip
    iterative = IterativeSFTTrainer(str(tiny_llama_plain_path), args=config(tmp_path))
    rows = iterative.prepare_examples(None, None, None, TEXTS, None)
    assert [r["input_ids"] for r in rows] == sft.train_dataset["input_ids"]
    assert [r["loss_mask"] for r in rows] == sft.train_dataset["loss_mask"]
    assert isinstance(iterative.data_collator, DataCollatorForSFT) and iterative.data_collator.padding_free


def test_step_loss_is_the_models_own_loss_through_its_forward(tiny_llama_path, tmp_path):
    """With lr=0, step()'s loss is the token average of the model's own per-example losses; forward gets labels."""
    trainer = IterativeSFTTrainer(str(tiny_llama_path), args=config(tmp_path, learning_rate=0.0, max_grad_norm=0))
    calls = []
    forward = trainer.model.forward

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return forward(*args, **kwargs)

    trainer.model.forward = spy
    ids = [[5, 6, 7, 8, 9], [10, 11], [13, 14, 15]]
    labels = [[IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9], [10, 11], [IGNORE_INDEX, 40, 41]]  # the last: not the ids
    loss = trainer.step(input_ids=ids, labels=labels)["loss"]
    assert len(calls) == 1 and "labels" in calls[0] and "position_ids" in calls[0]
    assert calls[0]["input_ids"].shape[0] < 3  # padding-free: examples share rows

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    total, count = 0.0, 0
    for x, y in zip(ids, labels, strict=True):
        n = sum(t != IGNORE_INDEX for t in y[1:])
        total += model(input_ids=torch.tensor([x]), labels=torch.tensor([y])).loss.item() * n
        count += n
    assert loss == pytest.approx(total / count, rel=1e-4)


def test_plain_training_arguments_and_the_tokenizer_keyword(tiny_llama_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, report_to="none",
                             learning_rate=3e-4, save_strategy="no")  # fmt: skip
    trainer = IterativeSFTTrainer(str(tiny_llama_path), args=args, tokenizer=tokenizer)
    assert isinstance(trainer.args, IterativeSFTConfig)
    assert trainer.args.learning_rate == 3e-4 and trainer.args.per_device_train_batch_size == 2
    assert trainer.processing_class is tokenizer
    assert trainer.step(texts=["a b c", "d e"])["global_step"] == 1
    with pytest.warns(FutureWarning, match="max_length"):
        old = IterativeSFTTrainer(str(tiny_llama_path), args=args, tokenizer=tokenizer, max_length=4)
    assert old.args.max_length == 4
    with pytest.raises(TypeError, match="unexpected"):
        IterativeSFTTrainer(str(tiny_llama_path), args=args, tokenizer=tokenizer, bogus=1)


def test_step_truncation_is_reported_once(tiny_llama_path, tmp_path, caplog):
    import logging

    trainer = IterativeSFTTrainer(str(tiny_llama_path), args=config(tmp_path, max_length=4))
    with caplog.at_level(logging.WARNING, logger="sftune"):
        first = trainer.step(input_ids=[[5, 6, 7, 8, 9, 10], [5, 6]])
        second = trainer.step(input_ids=[[5, 6, 7, 8, 9, 10, 11]])
    reports = [r.getMessage() for r in caplog.records if "Truncation" in r.getMessage()]
    assert len(reports) == 1 and "dropped 2 tokens from 1 examples of step()" in reports[0]
    assert first["num_truncated_tokens"] == 2 and second["num_truncated_tokens"] == 3
    assert trainer.truncated == {"examples": 2, "tokens": 5}


def test_evaluate_uses_the_same_collator_and_forward_gets_model_inputs_only(tiny_llama_path, tmp_path):
    rows = Dataset.from_list([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [5, 6, 7]}] * 2)
    trainer = IterativeSFTTrainer(str(tiny_llama_path), args=config(tmp_path), eval_dataset=rows)
    seen = []
    trainer.model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0 and seen and all("num_tokens" not in keys for keys in seen)
