"""Tokenize segments into `input_ids` and a `loss_mask`, truncate, and run this over a whole dataset.

Each segment is tokenized on its own and the pieces are concatenated. The loss mask is therefore exact to the
token by construction, and a prompt is tokenized exactly as it will be at inference, when it is tokenized alone.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc

from . import formats
from .formats import DatasetFormatError, Segments

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizeOptions:
    """Everything that decides how a row becomes tokens."""

    max_length: int | None
    text_field: str = "text"
    add_special_tokens: bool = True
    completion_only_loss: bool | None = None
    assistant_only_loss: bool = False
    truncation_mode: str = "keep_start"
    # What happens to an example longer than max_length: "truncate" (tokens dropped, and counted) or "split" into
    # max_length pieces, each its own example that keeps its loss mask (used by packing_strategy="bfd_split").
    overlong: str = "truncate"


def special_tokens_around(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids a tokenizer adds before and after a text (e.g. BOS for Llama), found by comparison."""
    probe = "a"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


def row_segments(
    example: dict[str, Any],
    row: int,
    fmt: str,
    tokenizer: Any,
    options: TokenizeOptions,
    text: str | None = None,
) -> tuple[Segments, bool]:
    """A row's segments, and whether the text needs the tokenizer's special tokens and EOS around it.

    Chat-templated text already carries its own special tokens and end-of-turn markers; raw text does not.
    """
    if fmt in (formats.TEXT, formats.FORMATTING_FUNC):
        column = options.text_field if fmt == formats.TEXT else "formatting_func output"
        value = example.get(options.text_field) if text is None else text
        return formats.text_segments(value, row, column), True
    tools = example.get("tools")
    if fmt == formats.MESSAGES:
        segments = formats.conversation_segments(example["messages"], row, tokenizer, tools=tools)
        if not options.assistant_only_loss:
            segments = [(piece, True) for piece, _ in segments]
        return segments, False
    if fmt == formats.PROMPT_COMPLETION:
        prompt, completion = example["prompt"], example["completion"]
        segments = formats.prompt_completion_segments(prompt, completion, row, tokenizer, tools=tools)
        if options.completion_only_loss is False:
            segments = [(piece, True) for piece, _ in segments]
        return segments, isinstance(prompt, str)
    raise ValueError(f"Unknown format {fmt!r}")


def tokenize_rows(
    rows: list[tuple[Segments, bool]],
    tokenizer: Any,
    options: TokenizeOptions,
    first_row: int,
) -> dict[str, list[list[int]]]:
    """Tokenize the segments of many rows in one tokenizer call; return `input_ids` and `loss_mask` per row."""
    flat = [piece for segments, _ in rows for piece, _ in segments]
    pieces = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    prefix, suffix = special_tokens_around(tokenizer) if options.add_special_tokens else ([], [])
    eos = tokenizer.eos_token_id
    all_ids, all_masks = [], []
    cursor = 0
    for offset, (segments, is_raw_text) in enumerate(rows):
        ids: list[int] = []
        mask: list[int] = []
        if is_raw_text:
            ids += prefix
            mask += [0] * len(prefix)
        for _, trainable in segments:
            piece = pieces[cursor]
            cursor += 1
            ids += piece
            mask += [int(trainable)] * len(piece)
        if is_raw_text:
            if eos is not None and eos not in suffix and (not ids or ids[-1] != eos):
                ids.append(eos)  # teaches the model to stop
                mask.append(1)
            ids += suffix
            mask += [0] * len(suffix)
        ids, mask = truncate(ids, mask, options, first_row + offset)
        all_ids.append(ids)
        all_masks.append(mask)
    return {"input_ids": all_ids, "loss_mask": all_masks}


def kept_slice(length: int, limit: int, truncation_mode: str) -> slice:
    """The part of a `length`-token sequence that truncation to `limit` tokens keeps."""
    return slice(None, limit) if truncation_mode == "keep_start" else slice(max(length - limit, 0), None)


def truncate(ids: list[int], mask: list[int], options: TokenizeOptions, row: int) -> tuple[list[int], list[int]]:
    limit = options.max_length
    if limit is None or len(ids) <= limit:
        return ids, mask
    kept = kept_slice(len(ids), limit, options.truncation_mode)
    kept_mask = mask[kept]
    if any(mask) and not any(kept_mask):
        prompt_tokens = mask.index(1) if options.truncation_mode == "keep_start" else len(ids) - limit
        raise DatasetFormatError(
            f"Row {row}: the prompt alone is {prompt_tokens} tokens, so nothing it trains on fits in max_length="
            f"{limit}. Raise max_length (max_seq_length), shorten the prompt, or drop the row "
            "(e.g. dataset.filter(...))."
        )
    return ids[kept], kept_mask


def make_tokenize_function(
    fmt: str,
    tokenizer: Any,
    options: TokenizeOptions,
    formatting_func: Callable | None = None,
    formatting_func_batched: bool = False,
) -> Callable[[dict[str, list], list[int]], dict[str, list]]:
    """The batched `datasets.map` function that turns rows of format `fmt` into tokens."""

    def tokenize_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        n = len(indices)
        examples = [{key: values[i] for key, values in batch.items()} for i in range(n)]
        texts: list[str | None] = [None] * n
        if fmt == formats.FORMATTING_FUNC:
            if formatting_func_batched:
                texts = list(formatting_func(batch))
                if len(texts) != n:
                    raise DatasetFormatError(
                        f"formatting_func returned {len(texts)} texts for a batch of {n} rows (rows {indices[0]}-"
                        f"{indices[-1]}); a batched formatting_func must return one string per row."
                    )
            else:
                texts = [formatting_func(example) for example in examples]
        rows = [
            row_segments(example, row, fmt, tokenizer, options, text)
            for example, row, text in zip(examples, indices, texts, strict=True)
        ]
        return tokenize_rows(rows, tokenizer, options, indices[0])

    return tokenize_batch


def pretokenized_function(
    options: TokenizeOptions,
) -> Callable[[dict[str, list], list[int]], dict[str, list]]:
    """Rows already tokenized: keep `input_ids`, take the mask from `completion_mask`/`assistant_masks` if any."""

    def passthrough(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        masks = batch.get("completion_mask") or batch.get("assistant_masks")
        out_ids, out_masks = [], []
        for i, ids in enumerate(batch["input_ids"]):
            mask = list(masks[i]) if masks is not None else [1] * len(ids)
            ids, mask = truncate(list(ids), mask, options, indices[i])
            out_ids.append(ids)
            out_masks.append(mask)
        out = {"input_ids": out_ids, "loss_mask": out_masks}
        if batch.get("labels") is not None:  # the caller's own labels, kept beside the ids they belong to
            out["labels"] = [list(labels) for labels in batch["labels"]]
        return out

    return passthrough


def prepare_dataset(
    dataset: Any,
    tokenizer: Any,
    options: TokenizeOptions,
    formatting_func: Callable | None = None,
    num_proc: int | None = None,
    batch_size: int = 1000,
    name: str = "train",
) -> Any:
    """Turn a `datasets.Dataset` or `IterableDataset` of any supported format into `input_ids` + `loss_mask`."""
    from datasets import Dataset

    is_map_style = isinstance(dataset, Dataset)
    if is_map_style and len(dataset) == 0:
        raise DatasetFormatError(f"The {name} dataset is empty; give it at least one row.")
    columns = list(dataset.column_names or next(iter(dataset)).keys())
    fmt = formats.detect_format(columns, options.text_field, formatting_func is not None)
    if fmt == formats.SHAREGPT:
        dataset, columns, fmt = _sharegpt_as_messages(dataset, columns, is_map_style), ["messages"], formats.MESSAGES
    # Rows are tokenized whole, then fitted to max_length by `fit_to_max_length`, where what is cut is counted.
    whole = dataclasses.replace(options, max_length=None)
    if fmt == formats.TOKENIZED:
        function = pretokenized_function(whole)
    else:
        batched_func = False
        if formatting_func is not None:
            first = dataset[0] if is_map_style else next(iter(dataset))
            batched_func = formats.formatting_func_is_batched(formatting_func, first)
        function = make_tokenize_function(fmt, tokenizer, whole, formatting_func, batched_func)
    map_kwargs: dict[str, Any] = {
        "batched": True,
        "batch_size": batch_size,
        "with_indices": True,
    }
    map_kwargs["remove_columns"] = columns
    if is_map_style:
        map_kwargs.update(num_proc=num_proc, desc=f"Tokenizing {name} dataset ({fmt})")
    logger.info("Preparing the %s dataset: format %s", name, fmt)
    if options.max_length is None:
        return dataset.map(function, **map_kwargs)
    stream_report = None if is_map_style else StreamTruncationReport(name, options)
    prepared = dataset.map(fit_to_max_length(function, options, stream_report), **map_kwargs)
    if is_map_style:
        dropped = prepared.with_format("arrow")[:].column(DROPPED)
        report_truncation(name, options, pc.sum(pc.greater(dropped, 0)).as_py(), pc.sum(dropped).as_py() or 0)
        prepared = prepared.remove_columns(DROPPED)
    return prepared


DROPPED = "_tokens_dropped"


def _sharegpt_as_messages(dataset: Any, columns: list[str], is_map_style: bool) -> Any:
    """Keep only the conversations, as `messages`; other columns (e.g. `tools`) are not ShareGPT's."""

    def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        pairs = zip(batch["conversations"], indices, strict=True)
        return {"messages": [formats.sharegpt_to_messages(conversation, row) for conversation, row in pairs]}

    kwargs: dict[str, Any] = {"batched": True, "with_indices": True, "remove_columns": columns}
    if is_map_style:
        kwargs["desc"] = "Converting ShareGPT conversations to messages"
    return dataset.map(convert, **kwargs)


def fit_to_max_length(
    function: Callable[[dict[str, list], list[int]], dict[str, list]],
    options: TokenizeOptions,
    stream_report: StreamTruncationReport | None = None,
) -> Callable[[dict[str, list], list[int]], dict[str, list]]:
    """Wrap a tokenize function so that every row fits in `options.max_length`: truncated (recording how many tokens
    were dropped, in a `_tokens_dropped` column, or in `stream_report` for streams) or split into pieces."""
    limit = options.max_length

    def fitted(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        whole = function(batch, indices)
        keys = list(whole)  # input_ids, loss_mask and maybe labels: all per token
        out: dict[str, list] = {key: [] for key in keys}
        dropped = []
        for i, row in enumerate(indices):
            ids, mask = whole["input_ids"][i], whole["loss_mask"][i]
            if len(ids) <= limit:
                pieces = [slice(None)]
            elif options.overlong == "split":
                pieces = [slice(start, start + limit) for start in range(0, len(ids), limit)]
            else:
                truncate(ids, mask, options, row)  # refuses a row whose kept part has nothing to train on
                pieces = [kept_slice(len(ids), limit, options.truncation_mode)]
            for piece in pieces:
                for key in keys:
                    out[key].append(whole[key][i][piece])
            lost = len(ids) - sum(len(ids[piece]) for piece in pieces)
            dropped += [lost] + [0] * (len(pieces) - 1)
            if lost and stream_report is not None:
                stream_report.record(row, lost)
        if stream_report is None:
            out[DROPPED] = dropped
        return out

    return fitted


def report_truncation(name: str, options: TokenizeOptions, examples: int, tokens: int) -> None:
    if examples:
        logger.warning(
            "Truncation dropped %d tokens from %d examples of the %s dataset that are longer than max_length=%d "
            "(truncation_mode=%s). Raise max_length, or with packing=True use packing_strategy='bfd_split' to "
            "train on every token.",
            tokens,
            examples,
            name,
            options.max_length,
            options.truncation_mode,
        )


class StreamTruncationReport:
    """For streamed data, whose length is unknown in advance: warn at the first truncated example, once."""

    def __init__(self, name: str, options: TokenizeOptions) -> None:
        self.name, self.options, self.warned = name, options, False

    def record(self, row: int, tokens: int) -> None:
        if not self.warned:
            self.warned = True
            logger.warning(
                "Truncation dropped %d tokens from example %d of the streamed %s dataset (longer than max_length=%d); "
                "later over-long examples are cut the same way. Raise max_length, or with packing=True use "
                "packing_strategy='bfd_split' to train on every token.",
                tokens,
                row,
                self.name,
                self.options.max_length,
            )
