"""Tokenize segments into `input_ids` and a `loss_mask`, truncate, and run this over a whole dataset.

Each segment is tokenized on its own and the pieces are concatenated. The loss mask is therefore exact to the
token by construction, and a prompt is tokenized exactly as it will be at inference, when it is tokenized alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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


def truncate(ids: list[int], mask: list[int], options: TokenizeOptions, row: int) -> tuple[list[int], list[int]]:
    limit = options.max_length
    if limit is None or len(ids) <= limit:
        return ids, mask
    kept = slice(None, limit) if options.truncation_mode == "keep_start" else slice(len(ids) - limit, None)
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
    check_loss_options_apply(fmt, options)

    def tokenize_batch(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        n = len(indices)
        examples = [{key: values[i] for key, values in batch.items()} for i in range(n)]
        texts: list[str | None] = [None] * n
        if fmt == formats.FORMATTING_FUNC:
            if formatting_func_batched:
                texts = list(_call_formatting_func(formatting_func, batch, f"rows {indices[0]}-{indices[-1]}"))
                if len(texts) != n:
                    raise DatasetFormatError(
                        f"formatting_func returned {len(texts)} texts for a batch of {n} rows (rows {indices[0]}-"
                        f"{indices[-1]}); a batched formatting_func must return one string per row."
                    )
            else:
                texts = [
                    _call_formatting_func(formatting_func, example, f"row {row}")
                    for example, row in zip(examples, indices, strict=True)
                ]
        rows = [
            row_segments(example, row, fmt, tokenizer, options, text)
            for example, row, text in zip(examples, indices, texts, strict=True)
        ]
        return tokenize_rows(rows, tokenizer, options, indices[0])

    return tokenize_batch


def _call_formatting_func(formatting_func: Callable, value: Any, where: str) -> Any:
    try:
        return formatting_func(value)
    except Exception as err:
        raise DatasetFormatError(
            f"formatting_func raised {type(err).__name__}: {err} on {where}. Fix the function or that data "
            f"(it got {sorted(value) if isinstance(value, dict) else type(value).__name__})."
        ) from err


def check_loss_options_apply(fmt: str, options: TokenizeOptions) -> None:
    """Loss options that cannot apply to this data are an error, not silently ignored."""
    if options.assistant_only_loss and fmt not in (formats.MESSAGES, formats.PROMPT_COMPLETION):
        raise DatasetFormatError(
            f"assistant_only_loss=True needs conversational data (a 'messages' column), but the data is {fmt}: "
            "nothing in it marks the assistant's tokens. Set assistant_only_loss=False, or give 'messages' rows."
        )
    if options.completion_only_loss and fmt != formats.PROMPT_COMPLETION:
        hint = " For conversations use assistant_only_loss=True." if fmt == formats.MESSAGES else ""
        raise DatasetFormatError(
            f"completion_only_loss=True needs 'prompt'/'completion' data, but the data is {fmt}: there is no "
            f"completion to train on alone. Leave completion_only_loss unset (None) or give prompt/completion rows.{hint}"
        )


def pretokenized_function(
    options: TokenizeOptions, vocab_size: int | None = None
) -> Callable[[dict[str, list], list[int]], dict[str, list]]:
    """Rows already tokenized: keep `input_ids`, take the mask from `completion_mask`/`assistant_masks` if any.

    Ids outside [0, vocab_size) are refused here, naming the row, rather than as an IndexError at step 1."""

    def passthrough(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        masks = batch.get("completion_mask") or batch.get("assistant_masks")
        if masks is None and (options.assistant_only_loss or options.completion_only_loss):
            flag = "assistant_only_loss" if options.assistant_only_loss else "completion_only_loss"
            column = "assistant_masks" if options.assistant_only_loss else "completion_mask"
            raise DatasetFormatError(
                f"{flag}=True, but the tokenized data has no '{column}' column to say which tokens to train on. "
                f"Add that column, or set {flag}=False."
            )
        out_ids, out_masks = [], []
        for i, ids in enumerate(batch["input_ids"]):
            if vocab_size is not None and ids and not (0 <= min(ids) and max(ids) < vocab_size):
                bad = next(token for token in ids if not 0 <= token < vocab_size)
                raise DatasetFormatError(
                    f"Row {indices[i]}: input_ids holds {bad}, outside the tokenizer's vocabulary (0-{vocab_size - 1}). "
                    "Tokenize the data with the model's own tokenizer."
                )
            mask = list(masks[i]) if masks is not None else [1] * len(ids)
            ids, mask = truncate(list(ids), mask, options, indices[i])
            out_ids.append(ids)
            out_masks.append(mask)
        return {"input_ids": out_ids, "loss_mask": out_masks}

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
    if fmt == formats.TOKENIZED:
        function = pretokenized_function(options, len(tokenizer))
    else:
        batched_func = False
        if formatting_func is not None:
            first = dataset[0] if is_map_style else next(iter(dataset))
            batched_func = formats.formatting_func_is_batched(formatting_func, first)
        function = make_tokenize_function(fmt, tokenizer, options, formatting_func, batched_func)
    map_kwargs: dict[str, Any] = {
        "batched": True,
        "batch_size": batch_size,
        "with_indices": True,
    }
    map_kwargs["remove_columns"] = columns
    if is_map_style:
        map_kwargs.update(num_proc=num_proc, desc=f"Tokenizing {name} dataset ({fmt})")
    logger.info("Preparing the %s dataset: format %s", name, fmt)
    return dataset.map(function, **map_kwargs)
