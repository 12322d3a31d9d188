"""Collators: turn tokenized rows into padded tensors with labels.

Padding is found from each row's length, never from the pad id, so EOS stays in the loss when pad == eos.

Collators do not know the model: they give 0/1 padding masks, and for rows holding several documents `position_ids`
that restart at each document (plus, where the installed transformers does not isolate documents from those, a
boolean block-diagonal mask, True where a token may attend). `mask_for_model` is the one place that fits a batch to
a model's attention backend and dtype; sftune's trainers call it on every batch.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from ..compat import position_ids_isolate_documents
from ..constants import IGNORE_INDEX
from .packing import best_fit_decreasing

# DataCollatorForLanguageModeling arguments that TRL's collator passed on and that do not apply here.
LANGUAGE_MODELING_KWARGS = ("mlm_probability", "seed", "tf_experimental_compile")

logger = logging.getLogger(__name__)


def pad_rows(
    rows: Sequence[Sequence[int]], value: int, multiple_of: int | None = None, side: str = "right"
) -> torch.Tensor:
    """Pad lists of ints (on the right, or the left) into one (batch, longest) tensor."""
    longest = max(len(row) for row in rows)
    if multiple_of:
        longest = -(-longest // multiple_of) * multiple_of
    out = torch.full((len(rows), longest), value, dtype=torch.long)
    for i, row in enumerate(rows):
        place = slice(None, len(row)) if side == "right" else slice(longest - len(row), None)
        out[i, place] = torch.as_tensor(row, dtype=torch.long)
    return out


def block_causal_mask(seq_lengths: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    """A (batch, 1, width, width) boolean mask: causal inside each document, nothing across documents or padding."""
    doc_ids = torch.full((len(seq_lengths), width), -1, dtype=torch.long)
    for i, lengths in enumerate(seq_lengths):
        doc_ids[i, : sum(lengths)] = torch.repeat_interleave(torch.arange(len(lengths)), torch.as_tensor(list(lengths)))
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = same_doc & causal & (doc_ids[:, :, None] >= 0)
    # Padding rows attend to themselves so that softmax never sees an all-masked row (NaN in SDPA).
    mask |= torch.eye(width, dtype=torch.bool) & (doc_ids[:, :, None] < 0)
    return mask[:, None]


def mask_for_attention(mask: torch.Tensor, attn_implementation: str | None, dtype: torch.dtype) -> torch.Tensor:
    """A 4D boolean mask (True: may attend) in the form the attention backend reads. eager and flex_attention add a
    tensor mask to the scores, so True/False would add 1/0 and mask nothing: they get 0 / the dtype's minimum."""
    if mask.dtype == torch.bool and mask.dim() == 4 and attn_implementation in ("eager", "flex_attention"):
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask


def mask_for_model(batch: dict[str, Any], model: Any) -> dict[str, Any]:
    """`batch` fitted to `model`'s attention backend and dtype: the one place that does it for every collator.

    Rows that hold several documents come with `position_ids` restarting at each one. flash-attention finds the
    documents from those (its varlen kernel) and takes no 4D mask, so a collator's block-diagonal mask is dropped
    there. Eager, SDPA and flex attention get the block-diagonal mask (built here from the positions when the
    collator left it to transformers: its own detection is skipped whenever the model makes a KV cache, as it does
    by default with `use_cache=True`), boolean for SDPA and additive in the model's dtype for eager and flex, which
    add it to the scores. 2D padding masks pass unchanged."""
    mask = batch.get("attention_mask")
    positions = batch.get("position_ids")
    attn_implementation, dtype = attention_of(model)
    backend = attn_implementation or ""
    is_block_mask = isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4
    if "flash" in backend:
        if is_block_mask and positions is not None:
            return {key: value for key, value in batch.items() if key != "attention_mask"}
        return batch
    if mask is None and isinstance(positions, torch.Tensor) and positions.dim() == 2 and backend in MASKED_BACKENDS:
        mask, is_block_mask = causal_mask_from_positions(positions), True
    if not is_block_mask:
        return batch
    return {**batch, "attention_mask": mask_for_attention(mask, attn_implementation, dtype)}


# Attention backends that read a 4D attention mask.
MASKED_BACKENDS = ("eager", "sdpa", "flex_attention")


def causal_mask_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """A (batch, 1, length, length) boolean mask, causal inside each run of consecutive positions: a document of a
    packed row. Padding (positions 0, 0, ...) makes one-token documents that attend only to themselves."""
    first = position_ids[:, :1] - 1
    documents = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return ((documents[:, :, None] == documents[:, None, :]) & causal)[:, None]


def attention_of(model: Any) -> tuple[str | None, torch.dtype]:
    """The attention backend and dtype of `model`, under DDP/DeepSpeed wrappers (`.module`) and PEFT."""
    while getattr(model, "config", None) is None and isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None), getattr(model, "dtype", torch.float32)


def mark_documents(batch: dict[str, Any], seq_lengths: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Give a batch whose rows hold several documents what keeps them apart, whatever model reads it.

    `position_ids` restart at each document. Where transformers isolates documents from such `position_ids` (its
    packed-sequence detection in a forward without KV cache, as in training; on every attention backend:
    flash-attention's varlen kernel, and a block-diagonal mask it builds for SDPA, eager and flex), the batch carries
    them alone, as TRL's collators do, and no attention mask. Where it does not (transformers 4.x), it also carries the
    block-diagonal boolean mask, which `mask_for_model` fits to the model's backend."""
    width = batch["input_ids"].shape[1]
    batch["position_ids"] = position_ids_for(seq_lengths, width)
    if position_ids_isolate_documents():
        batch.pop("attention_mask", None)
    else:
        batch["attention_mask"] = block_causal_mask(seq_lengths, width)
    return batch


def position_ids_for(seq_lengths: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    out = torch.zeros(len(seq_lengths), width, dtype=torch.long)
    for i, lengths in enumerate(seq_lengths):
        out[i, : sum(lengths)] = torch.cat([torch.arange(n) for n in lengths])
    return out


class DataCollatorForSFT:
    """Pads rows of `input_ids` + `loss_mask` and builds `labels` (-100 where no loss is taken).

    A row may bring its own `labels` (already-prepared data, or `IterativeSFTTrainer.step(labels=...)`); they are
    used as given, and a `loss_mask` beside them still removes tokens from the loss.

    Rows may hold several packed documents (`seq_lengths`); then positions restart at each document and
    attention never crosses one (see `mark_documents`).

    With `padding_free`, the examples of an unpacked batch are first placed into as few rows as fit its longest
    example. The batch trains on the same examples with the same loss (documents stay isolated), on far
    fewer padding tokens.

    The output does not depend on the model: `mask_for_model(batch, model)` fits it to the model's attention backend
    (sftune's trainers call it). `attn_implementation` and `dtype` are accepted for code written for earlier sftune
    versions, and ignored.
    """

    def __init__(
        self,
        pad_token_id: int,
        pad_to_multiple_of: int | None = None,
        attn_implementation: str | None = None,
        dtype: torch.dtype | None = None,
        padding_free: bool = False,
    ) -> None:
        if attn_implementation is not None or dtype is not None:
            warnings.warn(
                "DataCollatorForSFT ignores attn_implementation and dtype: its batches suit any model, and "
                "sftune.data.collators.mask_for_model(batch, model) fits their masks to a model's attention backend "
                "(sftune's trainers do this). Remove these arguments.",
                FutureWarning,
                stacklevel=2,
            )
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_free = padding_free

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        features = [as_lists(f) for f in features]
        if self.padding_free and len(features) > 1 and not any("seq_lengths" in f for f in features):
            features = pack_batch(features)
        ids = [f["input_ids"] for f in features]
        masks = [f.get("loss_mask") for f in features]
        input_ids = pad_rows(ids, self.pad_token_id, self.pad_to_multiple_of)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for i, (row, mask) in enumerate(zip(ids, masks, strict=True)):
            given = features[i].get("labels")
            if given is not None and len(given) != len(row):
                raise ValueError(f"Batch row {i} has {len(given)} labels for {len(row)} input_ids; give one per token.")
            row_labels = torch.as_tensor(row if given is None else given, dtype=torch.long)
            if mask is not None:
                row_labels = row_labels.masked_fill(torch.as_tensor(mask) == 0, IGNORE_INDEX)
            labels[i, : len(row)] = row_labels
        batch = {
            "input_ids": input_ids,
            "labels": labels,
            # One count per row, so that accelerate can concatenate and slice it like any batched tensor.
            "num_tokens": torch.tensor([len(r) for r in ids], dtype=torch.long),
        }
        if any("seq_lengths" in f for f in features):
            seq_lengths = [f.get("seq_lengths") or [len(f["input_ids"])] for f in features]
            # The first token of a packed document must not be predicted from the previous document.
            for i, lengths in enumerate(seq_lengths):
                starts = torch.as_tensor(list(lengths)).cumsum(0)[:-1]
                labels[i, starts] = IGNORE_INDEX
            return mark_documents(batch, seq_lengths)
        attention = torch.zeros_like(input_ids)
        for i, row in enumerate(ids):
            attention[i, : len(row)] = 1
        batch["attention_mask"] = attention
        return batch


def as_feature(feature: Any) -> Any:
    """A collator row: a mapping as it is; a bare sequence of token ids (list, tuple, tensor) as its `input_ids`."""
    if isinstance(feature, Mapping):
        return feature
    if isinstance(feature, (list, tuple, torch.Tensor, np.ndarray)):
        return {"input_ids": feature}
    raise TypeError(
        f"A collator row must be a dict with input_ids or a list of token ids, got {type(feature).__name__}."
    )


def as_lists(feature: dict[str, Any]) -> dict[str, Any]:
    """A row whose sequences are plain lists (rows of torch datasets come as tensors)."""
    keys = ("input_ids", "loss_mask", "labels", "seq_lengths")
    out = {key: value.tolist() if isinstance(value, torch.Tensor) else value for key, value in feature.items()}
    return {key: value for key, value in out.items() if key in keys and value is not None}


def pack_batch(features: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The batch's examples in as few rows as fit its longest example (best fit decreasing), with boundaries."""
    lengths = [len(f["input_ids"]) for f in features]
    rows = []
    for members in best_fit_decreasing(np.asarray(lengths), max(lengths)):
        row: dict[str, Any] = {
            "input_ids": [t for i in members for t in features[i]["input_ids"]],
            "seq_lengths": [lengths[i] for i in members],
        }
        if any(features[i].get("loss_mask") is not None for i in members):
            row["loss_mask"] = [m for i in members for m in features[i].get("loss_mask") or [1] * lengths[i]]
        if any(features[i].get("labels") is not None for i in members):
            row["labels"] = [t for i in members for t in features[i].get("labels") or features[i]["input_ids"]]
        rows.append(row)
    return rows


class DataCollatorForCompletionOnlyLM:
    """Train only on what follows `response_template` (and, with `instruction_template`, only on the responses
    of a multi-turn text, up to the next instruction).

    Templates may be strings or lists of token ids. A string template is also searched for as it tokenizes after
    a newline or a space, so the context-dependent tokenization the TRL docs warn about (Llama-2's
    "### Assistant:") is found without hand-made token ids. A row where the template is not found is left out of
    the loss entirely, with a warning: the collator never trains silently on the prompt.

    Rows are padded on the tokenizer's `padding_side`. With `padding_free=True` the examples share rows instead
    (as `DataCollatorForSFT` packs them): positions restart at each example and a block-diagonal attention mask
    keeps examples from attending to each other.
    """

    def __init__(
        self,
        response_template: str | list[int],
        instruction_template: str | list[int] | None = None,
        *args: Any,
        tokenizer: PreTrainedTokenizerBase | None = None,
        mlm: bool = False,
        ignore_index: int = IGNORE_INDEX,
        pad_to_multiple_of: int | None = None,
        padding_free: bool = False,
        return_tensors: str = "pt",
        **kwargs: Any,
    ) -> None:
        if tokenizer is None and args:
            tokenizer, *args = args
        unknown = set(kwargs) - set(LANGUAGE_MODELING_KWARGS)
        if args or unknown:
            given = sorted(unknown) if unknown else f"{len(args)} extra positional arguments"
            raise TypeError(
                f"DataCollatorForCompletionOnlyLM got unexpected arguments {given}. It takes response_template, "
                "instruction_template, tokenizer, mlm, ignore_index, pad_to_multiple_of, padding_free and "
                f"return_tensors (and ignores {list(LANGUAGE_MODELING_KWARGS)})."
            )
        if tokenizer is None:
            raise ValueError("DataCollatorForCompletionOnlyLM needs the tokenizer: pass tokenizer=...")
        if mlm:
            raise ValueError("DataCollatorForCompletionOnlyLM is for causal language modelling; mlm must be False.")
        if return_tensors != "pt":
            raise ValueError(f"DataCollatorForCompletionOnlyLM returns PyTorch tensors only, not {return_tensors!r}.")
        self.tokenizer = tokenizer
        self.response_template = response_template
        self.instruction_template = instruction_template
        self.response_candidates = template_candidates(response_template, tokenizer)
        self.instruction_candidates = (
            template_candidates(instruction_template, tokenizer) if instruction_template is not None else None
        )
        self.ignore_index = ignore_index
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_free = padding_free

    def __call__(self, features: list[Any]) -> dict[str, torch.Tensor]:
        # Rows as dicts, or bare lists of token ids (a `DataCollatorForLanguageModeling` takes both).
        ids = [as_lists(as_feature(f))["input_ids"] for f in features]
        # Padding is known by position, so any id pads; the tokenizer may get its pad token only later.
        pad_id = next((t for t in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id) if t is not None), 0)
        targets = []
        for i, row in enumerate(ids):
            target = [self.ignore_index] * len(row)
            for start, end in self.trainable_spans(row, i):
                target[start:end] = row[start:end]
            targets.append(target)
        if self.padding_free:
            collate = DataCollatorForSFT(pad_id, self.pad_to_multiple_of, padding_free=True)
            batch = collate([{"input_ids": row, "labels": target} for row, target in zip(ids, targets, strict=True)])
            batch.pop("num_tokens")
            batch["labels"] = batch["labels"].masked_fill(batch["labels"] == IGNORE_INDEX, self.ignore_index)
            if position_ids_isolate_documents():  # as TRL's padding-free batches: no attention mask
                batch.pop("attention_mask", None)
            return batch
        side = getattr(self.tokenizer, "padding_side", "right")
        input_ids = pad_rows(ids, pad_id, self.pad_to_multiple_of, side)
        labels = pad_rows(targets, self.ignore_index, self.pad_to_multiple_of, side)
        attention = pad_rows([[1] * len(row) for row in ids], 0, self.pad_to_multiple_of, side)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}

    def torch_call(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """`DataCollatorForLanguageModeling`'s name for the PyTorch collation."""
        return self(features)

    def trainable_spans(self, row: list[int], index: int) -> list[tuple[int, int]]:
        responses = find_all(row, self.response_candidates)
        if not responses:
            self._warn_missing("response", self.response_template, row, index)
            return []
        if self.instruction_candidates is None:
            start, length = responses[0]
            return [(start + length, len(row))]
        instructions = find_all(row, self.instruction_candidates)
        if not instructions:
            self._warn_missing("instruction", self.instruction_template, row, index)
            return []
        spans = []
        for start, length in responses:
            begin = start + length
            end = min((s for s, _ in instructions if s >= begin), default=len(row))
            spans.append((begin, end))
        return spans

    def _warn_missing(self, which: str, template: Any, row: list[int], index: int) -> None:
        preview = self.tokenizer.decode(row[:60])
        warnings.warn(
            f"Could not find the {which} template {template!r} in batch row {index} (starts with {preview!r}). "
            "This row is left out of the loss. Check the template's spelling and spacing, or pass its token ids "
            "as they appear in context.",
            stacklevel=3,
        )


def template_candidates(template: str | list[int], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Token sequences a template may appear as: as given, and as it tokenizes after a newline or a space
    (without the context's own tokens, or together with them when the context merges into the first token)."""
    if isinstance(template, (list, tuple)):
        return [list(template)]
    candidates = [tokenizer.encode(template, add_special_tokens=False)]
    for context in ("\n", " ", "\n\n"):
        context_ids = tokenizer.encode(context, add_special_tokens=False)
        with_context = tokenizer.encode(context + template, add_special_tokens=False)
        if with_context[: len(context_ids)] == context_ids:
            candidates.append(with_context[len(context_ids) :])
        else:
            candidates.append(with_context)
    unique: list[list[int]] = []
    for candidate in sorted(candidates, key=len, reverse=True):
        if candidate and candidate not in unique:
            unique.append(candidate)
    return unique


def find_all(row: list[int], candidates: list[list[int]]) -> list[tuple[int, int]]:
    """(start, length) of every non-overlapping occurrence of any candidate, in order."""
    found = []
    i = 0
    while i < len(row):
        for candidate in candidates:
            if row[i : i + len(candidate)] == candidate:
                found.append((i, len(candidate)))
                i += len(candidate)
                break
        else:
            i += 1
    return found


class DataCollatorForLanguageModeling:
    """TRL 0.16-0.18's collator for already tokenized rows (`trl.trainer.sft_trainer.DataCollatorForLanguageModeling`):
    pads `input_ids` with `pad_token_id` on the right, labels are the input ids (-100 on padding), and with
    `completion_only_loss` the tokens whose `completion_mask` (or `assistant_masks`) is 0 leave the loss.

    With `padding_free=True` all rows of the batch are concatenated into one, `position_ids` restart at each row (or
    follow the rows' `seq_lengths` for packed rows) and the first token of each document is not a target; see
    `mark_documents` for what keeps the documents apart on each attention backend.
    """

    def __init__(
        self,
        pad_token_id: int,
        completion_only_loss: bool = True,
        padding_free: bool = False,
        pad_to_multiple_of: int | None = None,
        return_position_ids: bool = True,
        return_tensors: str = "pt",
    ) -> None:
        if return_tensors != "pt":
            raise ValueError(f"DataCollatorForLanguageModeling returns PyTorch tensors only, not {return_tensors!r}.")
        self.pad_token_id = pad_token_id
        self.completion_only_loss = completion_only_loss
        self.padding_free = padding_free
        self.pad_to_multiple_of = pad_to_multiple_of
        self.return_position_ids = return_position_ids
        self.return_tensors = return_tensors

    def __call__(self, examples: list[Any], return_tensors: str | None = None) -> dict[str, torch.Tensor]:
        return self.torch_call(examples)

    def torch_call(self, examples: list[Any]) -> dict[str, torch.Tensor]:
        rows = [as_feature(example) for example in examples]
        ids = [_int_list(row["input_ids"]) for row in rows]
        labels = [list(row_ids) for row_ids in ids]
        for name, applies in (("completion_mask", self.completion_only_loss), ("assistant_masks", True)):
            if applies and name in rows[0]:
                for i, row in enumerate(rows):
                    mask = _int_list(row[name])
                    if len(mask) != len(ids[i]):
                        raise ValueError(f"Batch row {i} has {len(mask)} {name} entries for {len(ids[i])} input_ids.")
                    labels[i] = [t if m else IGNORE_INDEX for t, m in zip(labels[i], mask, strict=True)]
        seq_lengths = [_int_list(row.get("seq_lengths") or [len(row_ids)]) for row, row_ids in zip(rows, ids)]
        if self.padding_free:
            ids, labels = [[t for row in ids for t in row]], [[t for row in labels for t in row]]
            seq_lengths = [[n for lengths in seq_lengths for n in lengths]]
        batch = {
            "input_ids": pad_rows(ids, self.pad_token_id, self.pad_to_multiple_of),
            "labels": pad_rows(labels, IGNORE_INDEX, self.pad_to_multiple_of),
        }
        width = batch["input_ids"].shape[1]
        positions = position_ids_for(seq_lengths, width)
        if self.padding_free or any(len(lengths) > 1 for lengths in seq_lengths):
            batch["labels"][positions == 0] = IGNORE_INDEX  # a document's first token is not predicted across rows
            return mark_documents(batch, seq_lengths)
        batch["attention_mask"] = pad_rows([[1] * len(row) for row in ids], 0, self.pad_to_multiple_of)
        if self.return_position_ids:
            batch["position_ids"] = positions
        return batch


def _int_list(values: Any) -> list[int]:
    return values.tolist() if isinstance(values, (torch.Tensor, np.ndarray)) else list(values)
