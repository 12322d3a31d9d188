"""Tokenize segments into `input_ids` and a `loss_mask`, fit them to max_length, and run this over a whole dataset.

A row's segments concatenate to one text, which is tokenized as one string: tokenizing pieces separately is not
tokenizing the text (SentencePiece adds `▁` at each piece start; byte-level BPE cannot merge across a cut). The
segments only decide the mask, through the fast tokenizer's character offsets (rules in `tokenize_rows`).
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc

from . import formats, render
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
    assistant_turns_as_examples: bool = False
    # Conversation turns the whole rendering does not show as at inference (sftune.data.render): "split" trains
    # each as its own example rendered as at inference; "error" refuses the row before training.
    inexact_turns: str = "split"
    chat_template_kwargs: dict | None = None  # passed to the chat template, e.g. {"enable_thinking": False}
    stop_tokens: tuple[str, ...] | None = None  # tokens that end generation (default: sftune.data.render.stop_tokens)
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


def chat_options(options: TokenizeOptions, tokenizer: Any, example: dict[str, Any]) -> formats.ChatOptions:
    kwargs = example.get("chat_template_kwargs") or options.chat_template_kwargs
    return formats.ChatOptions(
        assistant_only=options.assistant_only_loss,
        every_turn=options.assistant_turns_as_examples,
        inexact_turns=options.inexact_turns,
        template_kwargs=dict(kwargs) if kwargs else None,
        stops=options.stop_tokens,
    )


def row_examples(
    example: dict[str, Any],
    row: int,
    fmt: str,
    tokenizer: Any,
    options: TokenizeOptions,
    text: str | None = None,
    stats: formats.TurnStats | None = None,
) -> list[tuple[Segments, bool]]:
    """The examples a row becomes (segments, and whether the text needs the tokenizer's special tokens and EOS
    around it): one, or for conversations one more per turn rendered apart (sftune.data.render).

    Chat-templated text already carries its own special tokens and end-of-turn markers; raw text does not.
    """
    if fmt in (formats.TEXT, formats.FORMATTING_FUNC):
        column = options.text_field if fmt == formats.TEXT else "formatting_func output"
        value = example.get(options.text_field) if text is None else text
        return [(formats.text_segments(value, row, column), True)]
    tools = example.get("tools")
    if fmt == formats.MESSAGES:
        chat = chat_options(options, tokenizer, example)
        examples = formats.conversation_examples(example["messages"], row, tokenizer, tools, chat, stats=stats)
        return [(segments, False) for segments in examples]
    if fmt == formats.PROMPT_COMPLETION:
        prompt, completion = example["prompt"], example["completion"]
        chat = dataclasses.replace(chat_options(options, tokenizer, example), assistant_only=True, every_turn=False)
        examples = formats.prompt_completion_segments(prompt, completion, row, tokenizer, tools, chat, stats)
        if options.completion_only_loss is False:
            examples = [[(piece, True) for piece, _ in segments] for segments in examples]
        return [(segments, isinstance(prompt, str)) for segments in examples]
    raise ValueError(f"Unknown format {fmt!r}")


def tokenize_rows(
    rows: list[tuple[Segments, bool]],
    tokenizer: Any,
    options: TokenizeOptions,
) -> dict[str, list[list[int]]]:
    """Tokenize many rows (segments, is_raw_text) in a few batched tokenizer calls; `input_ids` and `loss_mask`,
    whole (`fit` then decides what of them fits max_length).

    Each row's text (its segments joined) is tokenized as one string with `add_special_tokens=False`, which is
    what `apply_chat_template(tokenize=True)` does, so a conversation's ids equal the template's by construction.
    Masks:
    - A token is trained when any of its characters lies in a trained segment. Trained chat replies end on an
      end-of-turn special token, which never straddles; at a reply's start a token can straddle the header and the
      reply only when the reply begins with characters the tokenizer merges with the header's last ones (ChatML's
      `assistant\n` + a reply starting with `\n` gives one `\n\n` token). That token is trained: it carries reply
      text, the ids must be the template's, and not training it would leave reply text unlearned.
    - Plain-string prompt/completion (raw text whose first segment is untrained): the prompt keeps exactly the
      tokens it has alone (as at inference, when it is tokenized alone), and the completion is tokenized in context:
      when the prompt's tokens are a prefix of the whole string's, the ids are the whole string's (so no extra
      SentencePiece `▁` and BPE merges as in the full text). When they are not (the prompt ends inside something
      the tokenizer would merge with the completion, e.g. a trailing space), the ids are the prompt's tokens
      followed by the completion tokenized after a forced boundary (as it tokenizes after a newline, which adds
      no dummy prefix and merges with nothing), and all of the completion is trained.
    """
    texts = ["".join(piece for piece, _ in segments) for segments, _ in rows]
    encoded = tokenize_texts(tokenizer, texts, needs_offsets=any(len(segments) > 1 for segments, _ in rows))
    prompts = {
        i: segments[0][0]
        for i, (segments, is_raw_text) in enumerate(rows)
        if is_raw_text and len(segments) > 1 and not segments[0][1]
    }
    prompt_ids = (
        dict(zip(prompts, tokenizer(list(prompts.values()), add_special_tokens=False)["input_ids"])) if prompts else {}
    )
    prefix, suffix = special_tokens_around(tokenizer) if options.add_special_tokens else ([], [])
    eos = tokenizer.eos_token_id
    all_ids, all_masks = [], []
    for offset, (segments, is_raw_text) in enumerate(rows):
        ids = list(encoded["input_ids"][offset])
        if offset in prompt_ids:
            ids, mask = prompt_then_completion(tokenizer, prompt_ids[offset], ids, segments)
        else:
            mask = offsets_mask(encoded["offset_mapping"][offset], segments) if len(segments) > 1 else None
            mask = mask if mask is not None else [int(bool(segments) and segments[0][1])] * len(ids)
        if is_raw_text:
            ids = prefix + ids
            mask = [0] * len(prefix) + mask
            if eos is not None and eos not in suffix and (not ids or ids[-1] != eos):
                ids.append(eos)  # teaches the model to stop
                mask.append(1)
            ids += suffix
            mask += [0] * len(suffix)
        all_ids.append(ids)
        all_masks.append(mask)
    return {"input_ids": all_ids, "loss_mask": all_masks}


def tokenize_texts(tokenizer: Any, texts: list[str], needs_offsets: bool) -> dict[str, list]:
    if not texts:
        return {"input_ids": []}
    if not needs_offsets:
        return tokenizer(texts, add_special_tokens=False)
    try:
        return tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise DatasetFormatError(
            "Masking part of a row (assistant_only_loss, or a conversational completion) needs the tokenizer's "
            "character offsets, which only fast tokenizers give. Load the tokenizer with use_fast=True, or set "
            "assistant_only_loss=False / completion_only_loss=False."
        ) from None


def trained_ranges(segments: Segments) -> list[tuple[int, int]]:
    ranges, cursor = [], 0
    for piece, trainable in segments:
        if trainable and piece:
            if ranges and ranges[-1][1] == cursor:
                ranges[-1] = (ranges[-1][0], cursor + len(piece))
            else:
                ranges.append((cursor, cursor + len(piece)))
        cursor += len(piece)
    return ranges


def offsets_mask(offsets: list[tuple[int, int]], segments: Segments) -> list[int]:
    """1 for each token with a character inside a trained range (tokens are in text order: two bisections per range)."""
    ranges = trained_ranges(segments)
    if not ranges:
        return [0] * len(offsets)
    if len(ranges) == 1 and ranges[0] == (0, sum(len(piece) for piece, _ in segments)):
        return [1] * len(offsets)
    mask = [0] * len(offsets)
    if not offsets:
        return mask
    starts, ends = zip(*offsets, strict=True)
    ends = [max(end, start + 1) for start, end in offsets]  # a zero-width token counts at its position
    for start, end in ranges:
        first, last = bisect.bisect_right(ends, start), bisect.bisect_left(starts, end)
        mask[first:last] = [1] * max(0, last - first)
    return mask


def prompt_then_completion(
    tokenizer: Any, prompt: list[int], full: list[int], segments: Segments
) -> tuple[list[int], list[int]]:
    trainable = [t for _, t in segments]
    if full[: len(prompt)] == prompt:
        rest = len(full) - len(prompt)
        return full, [0] * len(prompt) + [int(any(trainable[1:]))] * rest
    completion = "".join(piece for piece, _ in segments[1:])
    anchor = tokenizer("\n", add_special_tokens=False)["input_ids"]
    anchored = tokenizer("\n" + completion, add_special_tokens=False)["input_ids"]
    tail = (
        anchored[len(anchor) :]
        if anchored[: len(anchor)] == anchor
        else tokenizer(completion, add_special_tokens=False)["input_ids"]
    )
    return prompt + tail, [int(trainable[0])] * len(prompt) + [int(any(trainable[1:]))] * len(tail)


def make_tokenize_function(
    fmt: str,
    tokenizer: Any,
    options: TokenizeOptions,
    formatting_func: Callable | None = None,
    formatting_func_batched: bool = False,
) -> Callable[[dict[str, list], list[int]], dict[str, list]]:
    """The batched `datasets.map` function that turns rows of format `fmt` into tokens."""
    check_loss_options_apply(fmt, options)
    if fmt in (formats.MESSAGES, formats.PROMPT_COMPLETION) and options.stop_tokens is None:
        if getattr(tokenizer, "chat_template", None) is not None:  # found once, not per row
            options = dataclasses.replace(options, stop_tokens=render.stop_tokens(tokenizer))

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
        rows, numbers, apart, reasons = [], [], [], []
        for example, row, text in zip(examples, indices, texts, strict=True):
            stats = formats.TurnStats()
            made = row_examples(example, row, fmt, tokenizer, options, text, stats)
            rows += made
            numbers += [row] * len(made)  # one row can give several examples
            apart += [stats.apart_turns] + [0] * (len(made) - 1)
            reasons += [stats.reasons] + [0] * (len(made) - 1)
        out = tokenize_rows(rows, tokenizer, options)
        out[SOURCE_ROW] = numbers
        out[APART_TURNS] = apart
        out[APART_REASONS] = reasons
        return out

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
    if options.inexact_turns not in ("split", "error"):
        raise DatasetFormatError(f"inexact_turns must be 'split' or 'error', got {options.inexact_turns!r}.")
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
            out_ids.append(list(ids))
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
    keep_source_rows: bool = False,
) -> Any:
    """Turn a `datasets.Dataset` or `IterableDataset` of any supported format into `input_ids` + `loss_mask`
    (and, with `keep_source_rows`, `_source_row`: the row each example came from; map datasets only)."""
    from datasets import Dataset

    is_map_style = isinstance(dataset, Dataset)
    if is_map_style and len(dataset) == 0:
        raise DatasetFormatError(f"The {name} dataset is empty; give it at least one row.")
    columns = list(dataset.column_names or next(iter(dataset)).keys())
    fmt = formats.detect_format(columns, options.text_field, formatting_func is not None)
    if fmt == formats.SHAREGPT:
        dataset, columns, fmt = _sharegpt_as_messages(dataset, columns, is_map_style), ["messages"], formats.MESSAGES
    # Rows are tokenized whole, then fitted to max_length by `fit_to_max_length`, where what is cut is counted.
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
    stream_report = None if is_map_style else StreamReport(name, options)
    prepared = dataset.map(fit_to_max_length(function, options, stream_report), **map_kwargs)
    if is_map_style:
        table = prepared.with_format("arrow")[:]
        dropped = table.column(DROPPED)
        report = TruncationReport(f"the {name} dataset", options)
        report.add(pc.sum(pc.greater(dropped, 0)).as_py(), pc.sum(dropped).as_py() or 0)
        report.warn()
        apart, why = table.column(APART_TURNS), table.column(APART_REASONS)
        report_turns_apart(name, pc.sum(pc.greater(apart, 0)).as_py(), pc.sum(apart).as_py() or 0, why, options)
        require_trained_tokens(name, table.column("loss_mask"), options)
        internal = [DROPPED, APART_TURNS, APART_REASONS] + ([] if keep_source_rows else [SOURCE_ROW])
        prepared = prepared.remove_columns(internal)
    return prepared


def report_turns_apart(name: str, conversations: int, turns: int, why: Any, options: TokenizeOptions) -> None:
    """One log line per dataset: conversations whose turns were rendered as their own examples, and why."""
    bits = 0
    for value in pc.unique(why).to_pylist():
        bits |= value or 0
    if not bits:
        return
    reasons = formats.TurnStats.describe(bits)
    if turns:
        logger.info(
            "The %s dataset: %d assistant turns of %d conversations are trained as their own examples rendered as "
            "at inference, because %s (the rest of each conversation stays one example). Set inexact_turns='error' "
            "to refuse such rows instead.",
            name,
            turns,
            conversations,
            "; or ".join(r for r in reasons if r != render.NO_STOP),
        )
    if render.NO_STOP in reasons:
        logger.warning("The %s dataset: on some assistant turns %s.", name, render.NO_STOP)


def require_trained_tokens(name: str, masks: Any, options: TokenizeOptions) -> None:
    """A dataset that trains no token at all is refused before training (it would train on nothing)."""
    if len(masks) and not pc.sum(pc.list_flatten(masks)).as_py():
        hint = (
            " With assistant_only_loss=True only assistant replies are trained: give rows with assistant messages, "
            "or set assistant_only_loss=False."
            if options.assistant_only_loss
            else ""
        )
        raise DatasetFormatError(
            f"No row of the {name} dataset has a single token to train on ({len(masks)} examples), so training "
            f"would learn nothing.{hint}"
        )


DROPPED = "_tokens_dropped"
APART_TURNS = "_turns_apart"  # per row (on its first example): assistant turns rendered as their own examples
APART_REASONS = "_turns_apart_why"  # per row: bits of formats.TurnStats.REASONS
SOURCE_ROW = "_source_row"  # the dataset row each tokenized example came from (one row may give several)


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
    stream_report: StreamReport | None = None,
) -> Callable[[dict[str, list], list[int]], dict[str, list]]:
    """Wrap a tokenize function so that every row fits in `options.max_length`: truncated (recording how many tokens
    were dropped, in a `_tokens_dropped` column, or in `stream_report` for streams) or split into pieces."""

    def fitted(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        whole = function(batch, indices)
        rows = whole.pop(SOURCE_ROW, indices)
        counts = {key: whole.pop(key, None) or [0] * len(rows) for key in (APART_TURNS, APART_REASONS)}
        keys = list(whole)  # input_ids, loss_mask and maybe labels: all per token
        out: dict[str, list] = {key: [] for key in keys}
        dropped, sources = [], []
        per_example: dict[str, list] = {key: [] for key in counts}
        for i, row in enumerate(rows):
            ids = whole["input_ids"][i]
            pieces = fit(ids, whole["loss_mask"][i], options, row)
            sources += [row] * len(pieces)
            for piece in pieces:
                for key in keys:
                    out[key].append(whole[key][i][piece])
            lost = len(ids) - sum(len(ids[piece]) for piece in pieces)
            dropped += [lost] + [0] * (len(pieces) - 1)
            for key, values in counts.items():
                per_example[key] += [values[i]] + [0] * (len(pieces) - 1)
            if stream_report is not None:
                if lost:
                    stream_report.record(row, lost)
                if counts[APART_TURNS][i] or counts[APART_REASONS][i]:
                    stream_report.record_turns(row, counts[APART_TURNS][i], counts[APART_REASONS][i])
        if stream_report is None:
            out[DROPPED] = dropped
            out[SOURCE_ROW] = sources
            out.update(per_example)
        return out

    return fitted


def fit(ids: list[int], mask: list[int], options: TokenizeOptions, row: int) -> list[slice]:
    """What of an example fits in `options.max_length`: all of it, `max_length` pieces (`overlong="split"`), or the
    side `truncation_mode` keeps. A row whose kept side trains nothing while the row does (its prompt alone fills
    max_length) is refused, naming the row: it would train on nothing, silently.

    The one place that decides this, for SFTTrainer (map and streamed datasets), IterativeSFTTrainer.step and
    `sftune preview`; what it drops is reported by `TruncationReport`."""
    limit = options.max_length
    if limit is None or len(ids) <= limit:
        return [slice(None)]
    if options.overlong == "split":
        return [slice(start, start + limit) for start in range(0, len(ids), limit)]
    keep_start = options.truncation_mode == "keep_start"
    kept = slice(None, limit) if keep_start else slice(len(ids) - limit, None)
    if any(mask) and not any(mask[kept]):
        prompt_tokens = mask.index(1) if keep_start else len(ids) - limit
        raise DatasetFormatError(
            f"Row {row}: the prompt alone is {prompt_tokens} tokens, so nothing it trains on fits in max_length="
            f"{limit}. Raise max_length (max_seq_length), shorten the prompt, or drop the row "
            "(e.g. dataset.filter(...))."
        )
    return [kept]


SFT_TRUNCATION_FIX = "Raise max_length, or with packing=True use packing_strategy='bfd_split' to train on every token."


class TruncationReport:
    """Counts the examples and tokens that fitting to max_length (`fit`) dropped, and says so in one message format:
    once per map dataset (with its totals), and at the first cut for streams and `IterativeSFTTrainer.step` (whose
    later cuts are only counted, in `examples` and `tokens`)."""

    def __init__(self, name: str, options: TokenizeOptions, fix: str = SFT_TRUNCATION_FIX, later: str = "") -> None:
        self.name, self.options, self.fix, self.later = name, options, fix, later
        self.examples, self.tokens, self.warned = 0, 0, False

    def add(self, examples: int, tokens: int) -> None:
        self.examples += examples
        self.tokens += tokens

    def warn(self, first_row: int | None = None) -> None:
        """Log what has been dropped so far (nothing if nothing was)."""
        if not self.examples:
            return
        self.warned = True
        where = f", the first at row {first_row}" if first_row is not None else ""
        logger.warning(
            "Truncation dropped %d tokens from %d examples of %s longer than max_length=%d (truncation_mode=%s%s).%s "
            "%s",
            self.tokens,
            self.examples,
            self.name,
            self.options.max_length,
            self.options.truncation_mode,
            where,
            f" {self.later}" if self.later else "",
            self.fix,
        )

    def add_and_warn_once(self, examples: int, tokens: int, first_row: int | None = None) -> None:
        """Count a cut; warn at the first one only (streams and step(), whose end is not known)."""
        already = self.warned
        self.add(examples, tokens)
        if not already:
            self.warn(first_row)


class StreamReport:
    """For streamed data, whose length is unknown in advance: say at the first truncated example and the first
    conversation with turns rendered apart, once each; later ones are counted (`truncation`)."""

    def __init__(self, name: str, options: TokenizeOptions) -> None:
        self.name, self.told_turns = name, False
        later = "Later over-long examples are cut the same way, without another warning."
        self.truncation = TruncationReport(f"the streamed {name} dataset", options, later=later)

    def record_turns(self, row: int, turns: int, bits: int) -> None:
        if not self.told_turns and turns:
            self.told_turns = True
            logger.info(
                "The streamed %s dataset: from row %d on, assistant turns are trained as their own examples rendered "
                "as at inference where %s. Set inexact_turns='error' to refuse such rows instead.",
                self.name,
                row,
                "; or ".join(r for r in formats.TurnStats.describe(bits) if r != render.NO_STOP),
            )

    def record(self, row: int, tokens: int) -> None:
        self.truncation.add_and_warn_once(1, tokens, row)
