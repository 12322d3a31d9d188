"""Already-prepared data passes through SFTTrainer untouched: torch datasets and tokenized datasets."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import AutoTokenizer

from sftune import ConstantLengthDataset, SFTConfig, SFTTrainer
from sftune.data.collators import IGNORE_INDEX


def config(tmp_path, **overrides) -> SFTConfig:
    values = dict(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                  logging_steps=1, save_strategy="no", report_to="none", max_seq_length=32, disable_tqdm=True)  # fmt: skip
    values.update(overrides)
    return SFTConfig(**values)


class TorchRows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class TorchStream(torch.utils.data.IterableDataset):
    def __init__(self, rows):
        self.rows = rows

    def __iter__(self):
        yield from self.rows


def test_constant_length_dataset_trains_as_given(tiny_llama_plain_path, tiny_tokenizer_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
    texts = Dataset.from_list([{"text": f"the number {i} is here and there"} for i in range(40)])
    data = ConstantLengthDataset(tokenizer, texts, dataset_text_field="text", seq_length=16, shuffle=False)
    trainer = SFTTrainer(str(tiny_llama_plain_path), args=config(tmp_path), train_dataset=data, tokenizer=tokenizer)
    assert trainer.train_dataset is data
    blocks = iter(data)
    first = [next(blocks), next(blocks)]
    batch = trainer.data_collator(first)
    assert batch["input_ids"].tolist() == [b["input_ids"].tolist() for b in first]
    trainer.train()
    assert trainer.state.global_step == 2


def test_torch_dataset_rows_keep_their_labels(tiny_llama_plain_path, tmp_path):
    rows = [
        {"input_ids": torch.tensor([5, 6, 7, 8]), "labels": torch.tensor([IGNORE_INDEX, IGNORE_INDEX, 7, 8])},
        {"input_ids": torch.tensor([9, 10, 11]), "labels": torch.tensor([IGNORE_INDEX, 10, 11])},
    ] * 4
    for data in (TorchRows(rows), TorchStream(rows)):
        trainer = SFTTrainer(str(tiny_llama_plain_path), args=config(tmp_path, padding_free=False), train_dataset=data)
        assert trainer.train_dataset is data
        batch = trainer.data_collator(rows[:2])
        assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 7, 8], [IGNORE_INDEX, 10, 11, IGNORE_INDEX]]
        trainer.train()
        assert trainer.state.global_step == 2


def test_padding_free_batches_keep_caller_labels(tiny_llama_plain_path, tmp_path):
    rows = [
        {"input_ids": [5, 6, 7, 8], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8]},
        {"input_ids": [9, 10], "labels": [IGNORE_INDEX, 10]},
        {"input_ids": [12, 13]},
    ]
    trainer = SFTTrainer(str(tiny_llama_plain_path), args=config(tmp_path), train_dataset=TorchRows(rows))
    batch = trainer.data_collator(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 12, 13]]
    # The caller's -100s stay; a packed document's first token is never predicted from the one before it.
    assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 7, 8], [IGNORE_INDEX, 10, IGNORE_INDEX, 13]]


def test_tokenized_hf_dataset_is_used_as_is(tiny_llama_plain_path, tmp_path):
    rows = [{"input_ids": [5, 6, 7, 8], "text": "ignored because input_ids are there"}] * 4
    trainer = SFTTrainer(str(tiny_llama_plain_path), args=config(tmp_path), train_dataset=Dataset.from_list(rows))
    assert trainer.train_dataset[0]["input_ids"] == [5, 6, 7, 8]
