"""ConstantLengthDataset with a formatting_func that returns token ids (pre-tokenized data)."""

from __future__ import annotations

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from sftune import ConstantLengthDataset


def test_token_ids_from_formatting_func_are_packed_as_given(tiny_tokenizer_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
    eos = tokenizer.eos_token_id
    rows = Dataset.from_list([{"ids": list(range(10 + i, 17 + i))} for i in range(6)])
    data = ConstantLengthDataset(tokenizer, rows, formatting_func=lambda example: example["ids"], seq_length=8,
                                 shuffle=False)  # fmt: skip
    stream = [t for i in range(6) for t in list(range(10 + i, 17 + i)) + [eos]]
    blocks = [block["input_ids"].tolist() for block in data]
    assert blocks == [stream[i : i + 8] for i in range(0, len(stream) - 7, 8)]
    assert len(blocks) == 6


def test_texts_and_errors(tiny_tokenizer_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
    rows = Dataset.from_list([{"text": "the cat and the dog"}] * 4)
    data = ConstantLengthDataset(tokenizer, rows, dataset_text_field="text", seq_length=4, shuffle=False)
    ids = tokenizer("the cat and the dog")["input_ids"] + [tokenizer.eos_token_id]
    assert next(iter(data))["input_ids"].tolist() == ids[:4]
    bad = ConstantLengthDataset(tokenizer, rows, formatting_func=lambda example: 3.5, seq_length=4)
    with pytest.raises(ValueError, match="text \\(a string\\) or its token ids"):
        next(iter(bad))
