"""Packing is exact: a packed example is trained exactly as it would be alone, and nothing is lost."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from sftune.compat import dtype_kwargs
from sftune.data.collators import IGNORE_INDEX, DataCollatorForSFT, mask_for_model
from sftune.data.packing import best_fit_decreasing, pack_dataset


def random_rows(n: int, seed: int = 0, low: int = 2, high: int = 40, vocab: int = 200) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        length = int(rng.integers(low, high))
        ids = rng.integers(3, vocab, size=length).tolist()
        mask = (rng.random(length) > 0.3).astype(int).tolist()
        rows.append({"input_ids": ids, "loss_mask": mask})
    return rows


def test_best_fit_decreasing_places_every_item_once_within_capacity():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 100, size=2000)
    bins = best_fit_decreasing(lengths, 128)
    placed = sorted(i for b in bins for i in b)
    assert placed == list(range(len(lengths)))
    assert max(lengths[b].sum() for b in bins) <= 128
    # Best fit is near the lower bound on the number of bins.
    assert len(bins) <= int(np.ceil(lengths.sum() / 128)) * 1.02 + 1


def test_best_fit_decreasing_refuses_an_item_larger_than_a_bin():
    with pytest.raises(ValueError, match="does not fit"):
        best_fit_decreasing(np.array([5, 300]), 128)


@pytest.mark.parametrize("strategy", ["bfd", "wrapped"])
def test_packing_drops_and_duplicates_no_token(strategy):
    rows = random_rows(300)
    packed = pack_dataset(Dataset.from_list(rows), 64, strategy)
    assert max(len(r) for r in packed["input_ids"]) <= 64
    for packed_row in packed:
        assert sum(packed_row["seq_lengths"]) == len(packed_row["input_ids"]) == len(packed_row["loss_mask"])
    original = sorted((tuple(r["input_ids"]), tuple(r["loss_mask"])) for r in rows)
    if strategy == "bfd":
        documents = []
        for packed_row in packed:
            start = 0
            for length in packed_row["seq_lengths"]:
                end = start + length
                documents.append((tuple(packed_row["input_ids"][start:end]), tuple(packed_row["loss_mask"][start:end])))
                start = end
        assert sorted(documents) == original
    else:
        stream = [t for r in rows for t in r["input_ids"]]
        assert [t for r in packed["input_ids"] for t in r] == stream


def per_token_losses(model, batch) -> list[torch.Tensor]:
    """Loss of every trained token, row by row, in order."""
    with torch.no_grad():
        inputs = mask_for_model({k: v for k, v in batch.items() if k not in ("labels", "num_tokens")}, model)
        logits = model(**inputs).logits
    labels = batch["labels"][:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return [row[lab != IGNORE_INDEX] for row, lab in zip(losses, labels, strict=True)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_gives_each_example_the_loss_it_has_alone(tiny_llama_path, attn):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_path, attn_implementation=attn, **dtype_kwargs(torch.float32)
    )
    model.eval()
    rows = random_rows(12, seed=3, vocab=model.config.vocab_size)
    packed = pack_dataset(Dataset.from_list(rows), 96, "bfd")
    collator = DataCollatorForSFT(pad_token_id=0)
    packed_losses = torch.cat(per_token_losses(model, collator(list(packed))))
    # The same documents, in the same order, each run alone.
    documents = []
    for packed_row in packed:
        start = 0
        for length in packed_row["seq_lengths"]:
            documents.append(
                {
                    "input_ids": packed_row["input_ids"][start : start + length],
                    "loss_mask": packed_row["loss_mask"][start : start + length],
                }
            )
            start += length
    alone = torch.cat([per_token_losses(model, collator([doc]))[0] for doc in documents])
    assert packed_losses.shape == alone.shape
    torch.testing.assert_close(packed_losses, alone, atol=1e-5, rtol=1e-5)


def test_mean_loss_is_the_same_packed_and_unpacked(tiny_llama_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, **dtype_kwargs(torch.float32)).eval()
    rows = random_rows(10, seed=4, vocab=model.config.vocab_size)
    collator = DataCollatorForSFT(pad_token_id=0)
    unpacked = torch.cat(per_token_losses(model, collator(rows)))
    packed = torch.cat(per_token_losses(model, collator(list(pack_dataset(Dataset.from_list(rows), 128)))))
    # Token-averaged: every trained token counts once either way, except each document's first token,
    # which is never predicted (no previous token of its own document).
    torch.testing.assert_close(unpacked.mean(), packed.mean(), atol=1e-5, rtol=1e-5)


def test_constant_length_dataset_blocks(tiny_tokenizer_path):
    from transformers import AutoTokenizer

    from sftune import ConstantLengthDataset

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
    texts = [{"text": f"row {i} has some words"} for i in range(50)]
    blocks = list(ConstantLengthDataset(tokenizer, texts, dataset_text_field="text", seq_length=16, shuffle=False,
                                        num_of_sequences=2, chars_per_token=3.6))  # fmt: skip
    assert blocks and all(b["input_ids"].shape == (16,) for b in blocks)
    stream = [t for b in blocks for t in b["input_ids"].tolist()]
    assert tokenizer.eos_token_id in stream  # examples are joined with EOS
    expected_start = tokenizer("row 0 has some words")["input_ids"] + [tokenizer.eos_token_id]
    assert stream[: len(expected_start)] == expected_start
    formatted = ConstantLengthDataset(tokenizer, texts, formatting_func=lambda e: e["text"].upper(), seq_length=8,
                                      infinite=True, num_of_sequences=1)  # fmt: skip
    iterator = iter(formatted)
    with pytest.warns(UserWarning, match="starting over"):
        for _ in range(200):  # more blocks than one pass holds: the infinite option restarts
            next(iterator)


def test_streaming_dataset_packs_over_a_bounded_buffer():
    from datasets import IterableDataset

    from sftune.data.packing import pack_iterable

    rows = random_rows(50, seed=5)
    stream = IterableDataset.from_generator(lambda: iter(rows))
    packed = list(pack_iterable(stream, 64, buffer_size=16))
    documents = sorted(
        tuple(row["input_ids"][sum(row["seq_lengths"][:k]) : sum(row["seq_lengths"][: k + 1])])
        for row in packed
        for k in range(len(row["seq_lengths"]))
    )
    assert documents == sorted(tuple(r["input_ids"]) for r in rows)
    assert all(len(row["input_ids"]) <= 64 for row in packed)
