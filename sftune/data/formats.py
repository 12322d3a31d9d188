"""Dataset formats: detect which one a dataset is in, validate its rows, and render each row as segments.

A *segment* is a piece of the final training text and whether the loss may be taken on it:
`[("<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n", False), ("Hello!<|im_end|>", True), ("\\n", False)]`.
A row's segments concatenate to its text, which is tokenized as one string (sftune.data.tokenize); the segments
only say which characters are trained. Every format becomes segments, so all formats share one masking mechanism.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..errors import DatasetFormatError
from . import chat_spans

Segments = list[tuple[str, bool]]

TEXT = "text"
MESSAGES = "messages"
SHAREGPT = "conversations"  # ShareGPT's `conversations` column; converted to `messages` before use
PROMPT_COMPLETION = "prompt_completion"
FORMATTING_FUNC = "formatting_func"
TOKENIZED = "tokenized"

KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool")


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
    """Loss-eligible completion after a prompt; both strings, or both lists of chat messages.

    Strings: `[(prompt, False), (completion, True)]`; sftune.data.tokenize keeps the prompt's own tokens and
    tokenizes the completion in context. Messages: the whole conversation `prompt + completion` is rendered once
    and the completion's assistant turns are located in it exactly as for conversations (see
    `conversation_segments`). A generation prompt that the whole rendering does not contain (DeepSeek-R1's
    `<think>\n`) is not added: the tokens are the template's rendering of the whole conversation, and the
    completion is the reply as rendered there, starting right after the assistant header.
    """
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion:
            raise DatasetFormatError(f"Row {row}, column 'completion' is empty. Remove rows without a completion.")
        return [(prompt, False), (completion, True)]
    if isinstance(prompt, list) and isinstance(completion, list):
        validate_messages(prompt, row, "prompt")
        validate_messages(completion, row, "completion")
        messages = prompt + completion
        turns = [len(prompt) + i for i, m in enumerate(completion) if m["role"] == "assistant"]
        if not turns:
            raise DatasetFormatError(
                f"Row {row}, column 'completion': it has no assistant message, so there is nothing to train on. "
                "Put the model's reply in the completion as {'role': 'assistant', 'content': ...}."
            )
        return conversation_segments(messages, row, tokenizer, tools=tools, turns=turns, column="completion")
    raise DatasetFormatError(
        f"Row {row}: 'prompt' and 'completion' must both be strings or both be lists of messages; got "
        f"{type(prompt).__name__} and {type(completion).__name__}."
    )


def conversation_segments(
    messages: Any,
    row: int,
    tokenizer: Any,
    tools: list | None = None,
    assistant_only: bool = True,
    turns: list[int] | None = None,
    column: str = "messages",
) -> Segments:
    """The conversation rendered once, cut into untrained text and trained assistant replies.

    The segments concatenate to `apply_chat_template(messages, tokenize=False)` and are tokenized as that one
    string (sftune.data.tokenize), so the tokens equal `apply_chat_template(tokenize=True)` for every template,
    including ones that rewrite earlier turns. Each trained reply is located in that rendering by
    sftune.data.chat_spans: from the end of the assistant header (what the template adds after it, e.g. a `<think>`
    block or a harmony channel, is the model's to generate) through its end-of-turn token(s), never the newline
    or next header after them. `turns` picks which assistant messages to train (default: all);
    `assistant_only=False` trains the whole rendering.
    """
    validate_messages(messages, row, column)
    full = render_chat(tokenizer, messages, row, tools=tools)
    if not assistant_only:
        return [(full, True)]
    try:
        spans = chat_spans.assistant_spans(tokenizer, messages, full, tools=tools, turns=turns)
    except chat_spans.SpanError as error:
        raise DatasetFormatError(
            f"Row {row}, column '{column}', message {error.turn} (assistant): {error}, so its tokens cannot be "
            "located exactly in the conversation. Set assistant_only_loss=False to train on the whole conversation "
            "(its tokens stay exact), or drop this row (dataset.filter(...))."
        ) from None
    segments: Segments = []
    cursor = 0
    for start, end in spans:
        segments.append((full[cursor:start], False))
        segments.append((full[start:end], True))
        cursor = end
    segments.append((full[cursor:], False))
    return [(text, trainable) for text, trainable in segments if text]


def conversation_turn_examples(messages: Any, row: int, tokenizer: Any, tools: list | None = None) -> list[Segments]:
    """One example per assistant turn (`assistant_turns_as_examples=True`), for reasoning models.

    Example k is the conversation up to and including assistant turn k, rendered as the template renders it at
    inference for that turn (so its reasoning is kept, where the whole-conversation rendering drops past
    reasoning), and trains only turn k. The cost is the repeated history: on 3-assistant-turn Qwen3 conversations
    with reasoning in every turn (benchmarks/prepare_chat.py, 2000 conversations) it is 2.2x the tokens of the
    whole-conversation rendering (525,541 -> 1,169,352), and 1.5x the trained tokens (past reasoning now trained).
    """
    validate_messages(messages, row, "messages")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        return [conversation_segments(messages, row, tokenizer, tools=tools)]
    return [conversation_segments(messages[: i + 1], row, tokenizer, tools=tools, turns=[i]) for i in turns]


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
    try:
        return tokenizer.apply_chat_template(
            messages,
            tools=tools,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as error:  # the template's own raise_exception, e.g. roles that must alternate
        raise DatasetFormatError(
            f"Row {row}: the chat template refused this conversation: {error}. Fix the row to fit the template "
            "(or drop it with dataset.filter(...)), or use a template that accepts it."
        ) from None


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
