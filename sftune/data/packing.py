"""Packing: put several tokenized examples in one row, keeping each example's boundaries.

Packed rows carry `seq_lengths`; the collator turns them into restarting `position_ids`, and `mask_for_model` into
the attention the model's backend reads, never crossing a document, so a packed example is trained exactly as it
would be alone.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Group item indices into bins of total length <= capacity: longest first, each into the fullest bin it fits.

    Bins are kept in buckets by remaining space, so finding the best fit is one vectorised scan of at most
    `capacity` flags.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"An item of length {int(lengths.max())} does not fit in bins of {capacity}.")
    bins_by_space: list[list[int]] = [[] for _ in range(capacity + 1)]
    has_space = np.zeros(capacity + 1, dtype=bool)
    bins: list[list[int]] = []
    for index in np.argsort(-lengths, kind="stable").tolist():
        length = int(lengths[index])
        offset = int(has_space[length:].argmax())
        space = length + offset
        if has_space[space]:
            bin_id = bins_by_space[space].pop()
            has_space[space] = bool(bins_by_space[space])
        else:
            bin_id, space = len(bins), capacity
            bins.append([])
        bins[bin_id].append(index)
        left = space - length
        if left > 0:
            bins_by_space[left].append(bin_id)
            has_space[left] = True
    return bins


def pack_dataset(dataset: Any, max_length: int, strategy: str = "bfd", seed: int = 0) -> Any:
    """Pack a prepared dataset (`input_ids`, `loss_mask`) into rows of at most `max_length` tokens.

    "bfd" (and "bfd_split", whose over-long examples were split into pieces while tokenizing): whole examples in
    best-fit-decreasing bins. "wrapped": examples concatenated in order and cut every `max_length` tokens; a cut
    example continues in the next row as its own document.
    """
    from datasets import Dataset, IterableDataset

    if isinstance(dataset, IterableDataset):
        return pack_iterable(dataset, max_length, strategy)
    table = dataset.with_format("arrow")[:]
    ids, masks = (
        table.column("input_ids").combine_chunks(),
        table.column("loss_mask").combine_chunks(),
    )
    lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False)
    if strategy in ("bfd", "bfd_split"):
        bins = best_fit_decreasing(lengths, max_length)
        order = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=len(lengths))
        items_per_bin = np.fromiter((len(b) for b in bins), dtype=np.int64, count=len(bins))
        packed_ids = _regroup(ids.take(order), items_per_bin)
        packed_masks = _regroup(masks.take(order), items_per_bin)
        seq_lengths = pa.ListArray.from_arrays(_offsets(items_per_bin), pa.array(lengths[order]))
    elif strategy == "wrapped":
        flat_ids, flat_masks = ids.flatten(), masks.flatten()
        total = len(flat_ids)
        starts = np.arange(0, total, max_length)
        row_offsets = pa.array(np.append(starts, total).astype(np.int32))
        packed_ids = pa.ListArray.from_arrays(row_offsets, flat_ids)
        packed_masks = pa.ListArray.from_arrays(row_offsets, flat_masks)
        seq_lengths = pa.array(_wrapped_seq_lengths(lengths, max_length, total))
    else:
        raise ValueError(f"Unknown packing strategy {strategy!r}; use 'bfd_split', 'bfd' or 'wrapped'.")
    packed = pa.table({"input_ids": packed_ids, "loss_mask": packed_masks, "seq_lengths": seq_lengths})
    return Dataset(packed)


def pack_iterable(dataset: Any, max_length: int, strategy: str = "bfd", buffer_size: int = 1000) -> Any:
    """Pack a streaming dataset: best-fit-decreasing over a buffer of `buffer_size` examples at a time."""
    from datasets import IterableDataset

    settings = {"max_length": max_length, "strategy": strategy, "buffer_size": buffer_size}
    return IterableDataset.from_generator(_packed_rows, gen_kwargs={"source": dataset, "settings": settings})


def _packed_rows(source: Any, settings: dict[str, Any]) -> Any:
    from datasets import Dataset

    buffer: list[dict[str, Any]] = []
    for example in source:
        buffer.append({"input_ids": list(example["input_ids"]), "loss_mask": list(example["loss_mask"])})
        if len(buffer) == settings["buffer_size"]:
            yield from pack_dataset(Dataset.from_list(buffer), settings["max_length"], settings["strategy"])
            buffer = []
    if buffer:
        yield from pack_dataset(Dataset.from_list(buffer), settings["max_length"], settings["strategy"])


def _offsets(counts: np.ndarray) -> pa.Array:
    return pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))


def _regroup(items: pa.ListArray, items_per_bin: np.ndarray) -> pa.ListArray:
    """Concatenate consecutive runs of `items_per_bin` lists into one list each."""
    item_lengths = pc.list_value_length(items).to_numpy(zero_copy_only=False)
    tokens_per_bin = (
        np.add.reduceat(item_lengths, _offsets(items_per_bin).to_numpy()[:-1]) if len(items) else np.zeros(0)
    )
    return pa.ListArray.from_arrays(_offsets(np.asarray(tokens_per_bin)), items.flatten())


def _wrapped_seq_lengths(lengths: np.ndarray, max_length: int, total: int) -> list[list[int]]:
    """Document pieces inside each fixed-size block of the concatenated stream."""
    boundaries = np.union1d(np.cumsum(lengths)[:-1], np.arange(max_length, total, max_length))
    edges = np.concatenate([[0], boundaries, [total]])
    pieces = np.diff(edges)
    block_of_piece = edges[:-1] // max_length
    return [pieces[block_of_piece == b].tolist() for b in range(-(-total // max_length))]
