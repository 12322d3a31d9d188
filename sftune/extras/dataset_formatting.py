"""TRL's `trl.extras.dataset_formatting`: a formatting function chosen from a dataset's columns.

sftune's trainers read these formats themselves (`sftune.data.formats`); this module serves code that builds the
text with these functions explicitly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import PreTrainedTokenizerBase

from ..data import render


def conversations_formatting_function(tokenizer: PreTrainedTokenizerBase, messages_field: str = "messages") -> Callable:
    """A formatting function rendering the `messages_field` conversation(s) with the tokenizer's chat template."""

    def format_rows(examples: dict[str, Any]) -> str | list[str]:
        value = examples[messages_field]
        if value and isinstance(value[0], list):  # a batch of conversations
            return [_chat_text(tokenizer, conversation) for conversation in value]
        return _chat_text(tokenizer, value)

    return format_rows


def instructions_formatting_function(tokenizer: PreTrainedTokenizerBase) -> Callable:
    """A formatting function rendering `prompt`/`completion` as a user turn and an assistant turn."""

    def render(prompt: str, completion: str) -> str:
        turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return _chat_text(tokenizer, turns)

    def format_rows(examples: dict[str, Any]) -> str | list[str]:
        if isinstance(examples["prompt"], list):
            return [render(p, c) for p, c in zip(examples["prompt"], examples["completion"], strict=True)]
        return render(examples["prompt"], examples["completion"])

    return format_rows


def get_formatting_func_from_dataset(dataset: Any, tokenizer: PreTrainedTokenizerBase) -> Callable | None:
    """The formatting function for a dataset of conversations (`messages` or `conversations` of role/content
    dicts) or of `prompt`/`completion` strings; None for any other dataset."""
    features = getattr(dataset, "features", None) or {}
    for field in ("messages", "conversations"):
        feature = features.get(field)
        inner = getattr(feature, "feature", feature[0] if isinstance(feature, list) and feature else None)
        if isinstance(inner, dict) and {"role", "content"} <= set(inner):
            return conversations_formatting_function(tokenizer, field)
    if {"prompt", "completion"} <= set(features):
        kinds = {getattr(features[name], "dtype", None) for name in ("prompt", "completion")}
        if kinds == {"string"}:
            return instructions_formatting_function(tokenizer)
    return None


__all__ = [
    "conversations_formatting_function",
    "get_formatting_func_from_dataset",
    "instructions_formatting_function",
]


def _chat_text(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> str:
    # The template's text, as `apply_chat_template(tokenize=False)` gives it, from the one renderer.
    return render.render(tokenizer, messages)
