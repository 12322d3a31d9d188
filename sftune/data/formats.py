"""Dataset formats: detect which one a dataset is in, validate its rows, and render each row as segments.

A *segment* is a piece of the final training text and whether the loss may be taken on it:
`[("<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n", False), ("Hello!<|im_end|>\\n", True)]`.
Every format becomes a list of segments; tokenization and masking (sftune.data.tokenize) work on segments only,
so all formats share one masking mechanism.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Segments = list[tuple[str, bool]]

TEXT = "text"
MESSAGES = "messages"
SHAREGPT = "conversations"  # ShareGPT's `conversations` column; converted to `messages` before use
PROMPT_COMPLETION = "prompt_completion"
FORMATTING_FUNC = "formatting_func"
TOKENIZED = "tokenized"

KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool")


class DatasetFormatError(ValueError):
    """A row of the dataset cannot be used; the message names the row, the column and the fix."""


def detect_format(column_names: Sequence[str], text_field: str | None, has_formatting_func: bool) -> str:
    """Which format a dataset with these columns is in."""
    columns = set(column_names)
    if has_formatting_func:
        return FORMATTING_FUNC
    if "input_ids" in columns:  # already tokenized: used as is, whatever other columns it keeps
        return TOKENIZED
    if "messages" in columns:
        return MESSAGES
    if "conversations" in columns:
        return SHAREGPT
    if {"prompt", "completion"} <= columns:
        return PROMPT_COMPLETION
    if text_field and text_field in columns:
        return TEXT
    raise DatasetFormatError(
        f"Cannot tell the dataset's format from its columns {sorted(columns)}. Give it one of: a "
        f"'{text_field or 'text'}' column (plain text; set dataset_text_field to use another column), a 'messages' "
        "column (conversations), 'prompt' and 'completion' columns, an 'input_ids' column (already tokenized), "
        "or pass formatting_func to build the text from your columns."
    )


# ShareGPT speaker names -> chat-template roles (names that already are roles map to themselves).
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool"}


def sharegpt_to_messages(conversation: Any, row: int) -> list[dict[str, Any]]:
    """A ShareGPT conversation (`[{"from": "human", "value": ...}, ...]`) as chat messages (`role`/`content`).

    Turns that already have `role`/`content` are kept as they are."""
    if not isinstance(conversation, list):
        raise DatasetFormatError(
            f"Row {row}, column 'conversations': expected a list of turns, got {type(conversation).__name__}."
        )
    messages = []
    for i, turn in enumerate(conversation):
        if isinstance(turn, dict) and turn.get("role") is not None:
            messages.append({"role": turn["role"], "content": turn.get("content")})
            continue
        speaker = turn.get("from") if isinstance(turn, dict) else None
        role = SHAREGPT_ROLES.get(speaker, speaker if speaker in KNOWN_ROLES else None)
        if role is None:
            raise DatasetFormatError(
                f"Row {row}, column 'conversations', turn {i}: unknown speaker {speaker!r}. ShareGPT turns need "
                f"'from' (one of {sorted(SHAREGPT_ROLES)}) and 'value'; or give 'role' and 'content'."
            )
        messages.append({"role": role, "content": turn.get("value")})
    return messages


def formatting_func_is_batched(formatting_func: Callable, first_example: dict[str, Any]) -> bool:
    """Tell the two documented shapes apart: per example (returns a str) or batched (returns a list of str)."""
    try:
        out = formatting_func(first_example)
    except Exception:  # a batched function indexing into a single example's values can raise
        out = None
    if isinstance(out, str):
        return False
    batch = {key: [value] for key, value in first_example.items()}
    out = formatting_func(batch)
    if isinstance(out, list) and len(out) == 1 and isinstance(out[0], str):
        return True
    raise DatasetFormatError(
        "formatting_func must return a string for one example, or a list of strings (one per example) for a "
        f"batch of examples; on the first row it returned {type(out).__name__}."
    )


# --------------------------------------------------------------------------------------------------------------
# Rows -> segments
# --------------------------------------------------------------------------------------------------------------


def text_segments(text: Any, row: int, column: str) -> Segments:
    if not isinstance(text, str):
        raise DatasetFormatError(
            f"Row {row}, column '{column}': expected a string, got {type(text).__name__}. "
            "Convert the column to text or pass a formatting_func."
        )
    if not text:
        raise DatasetFormatError(f"Row {row}, column '{column}' is empty. Remove empty rows from the dataset.")
    return [(text, True)]


def prompt_completion_segments(
    prompt: Any, completion: Any, row: int, tokenizer: Any, tools: list | None = None
) -> Segments:
    """Loss-eligible completion after a prompt; both strings, or both lists of chat messages."""
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion:
            raise DatasetFormatError(f"Row {row}, column 'completion' is empty. Remove rows without a completion.")
        return [(prompt, False), (completion, True)]
    if isinstance(prompt, list) and isinstance(completion, list):
        validate_messages(prompt, row, "prompt")
        validate_messages(completion, row, "completion")
        prompt_text = render_chat(tokenizer, prompt, row, add_generation_prompt=True, tools=tools)
        full = render_chat(tokenizer, prompt + completion, row, tools=tools)
        if not full.startswith(prompt_text):
            raise DatasetFormatError(
                f"Row {row}: the chat template renders the prompt differently on its own and before the completion, "
                "so the completion's tokens cannot be located. Use a template whose prompt is a prefix of the "
                "whole conversation."
            )
        return [(prompt_text, False), (full[len(prompt_text) :], True)]
    raise DatasetFormatError(
        f"Row {row}: 'prompt' and 'completion' must both be strings or both be lists of messages; got "
        f"{type(prompt).__name__} and {type(completion).__name__}."
    )


def conversation_segments(messages: Any, row: int, tokenizer: Any, tools: list | None = None) -> Segments:
    """Render a conversation and mark each assistant turn (its content and end-of-turn text) loss-eligible.

    Each assistant span runs from the end of the conversation-so-far rendered with the generation prompt to the end
    of the conversation rendered up to and including that turn. This is exact for any template whose renderings
    of a conversation's prefixes are prefixes of the whole, and it puts the boundary where inference puts it.
    """
    validate_messages(messages, row, "messages")
    full = render_chat(tokenizer, messages, row, tools=tools)
    segments: Segments = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], row, add_generation_prompt=True, tools=tools) if i else ""
        through = render_chat(tokenizer, messages[: i + 1], row, tools=tools)
        if not (full.startswith(before) and full.startswith(through) and cursor <= len(before) <= len(through)):
            raise DatasetFormatError(
                f"Row {row}, column 'messages': the chat template does not render turn {i} as a prefix of the whole "
                "conversation (templates that rewrite earlier turns, e.g. dropping past reasoning, do this), so "
                "assistant turns cannot be located exactly. Set assistant_only_loss=False, or use another template."
            )
        segments.append((full[cursor : len(before)], False))
        segments.append((full[len(before) : len(through)], True))
        cursor = len(through)
    segments.append((full[cursor:], False))
    return [(text, trainable) for text, trainable in segments if text]


def render_chat(
    tokenizer: Any,
    messages: list[dict],
    row: int,
    add_generation_prompt: bool = False,
    tools: list | None = None,
) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DatasetFormatError(
            f"Row {row} is a conversation, but the tokenizer has no chat template. Set tokenizer.chat_template, "
            "or call sftune.setup_chat_format(model, tokenizer) to add ChatML."
        )
    return tokenizer.apply_chat_template(
        messages,
        tools=tools,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def validate_messages(messages: Any, row: int, column: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DatasetFormatError(
            f"Row {row}, column '{column}': expected a non-empty list of {{'role', 'content'}} messages, got "
            f"{type(messages).__name__ if not isinstance(messages, list) else 'an empty list'}."
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DatasetFormatError(
                f"Row {row}, column '{column}', message {i}: expected a dict with 'role' and 'content', "
                f"got {type(message).__name__}."
            )
        role = message.get("role")
        if role not in KNOWN_ROLES:
            raise DatasetFormatError(
                f"Row {row}, column '{column}', message {i}: unknown role {role!r}. Use one of {list(KNOWN_ROLES)} "
                "(rename e.g. 'human' -> 'user', 'gpt'/'bot' -> 'assistant')."
            )
        content = message.get("content")
        if content is None and not message.get("tool_calls"):
            raise DatasetFormatError(
                f"Row {row}, column '{column}', message {i} ({role}): 'content' is missing. Every message needs a "
                "'content' string."
            )
        if content is not None and not isinstance(content, (str, list)):
            raise DatasetFormatError(
                f"Row {row}, column '{column}', message {i} ({role}): 'content' must be a string, got "
                f"{type(content).__name__}."
            )
