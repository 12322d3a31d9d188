"""Dataset formats: detect which one a dataset is in, validate its rows, and render each row as segments.

A *segment* is a piece of the final training text and whether the loss may be taken on it:
`[("<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n", False), ("Hello!<|im_end|>", True), ("\\n", False)]`.
A row's segments concatenate to its text, which is tokenized as one string (sftune.data.tokenize); the segments
only say which characters are trained. Every format becomes segments, so all formats share one masking mechanism.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import DatasetFormatError
from . import render

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


@dataclass(frozen=True)
class ChatOptions:
    """How conversations become examples (sftune.data.render defines what a turn trains)."""

    assistant_only: bool = True  # False: the whole rendering is trained
    every_turn: bool = False  # assistant_turns_as_examples: each assistant turn its own example
    inexact_turns: str = "split"  # turns the whole rendering does not show as at inference: "split" or "error"
    template_kwargs: dict | None = None  # e.g. {"enable_thinking": False}, passed to the chat template
    stops: tuple[str, ...] | None = None  # stop tokens (default: render.stop_tokens(tokenizer))


class TurnStats:
    """What the conversations of one batch became: turns rendered apart from the whole and why (bit per reason)."""

    REASONS = (render.PROMPT_DIFFERS, render.REPLY_DIFFERS, render.PREFILL, render.NO_STOP)

    def __init__(self) -> None:
        self.apart_turns = 0
        self.reasons = 0

    def record(self, turns: list[render.Turn]) -> None:
        for turn in turns:
            if turn.reason:
                self.apart_turns += 1
                self.reasons |= 1 << self.REASONS.index(turn.reason)
            if not turn.stopped:  # recorded, not a reason to render apart
                self.reasons |= 1 << self.REASONS.index(render.NO_STOP)

    @classmethod
    def describe(cls, bits: int) -> list[str]:
        return [reason for i, reason in enumerate(cls.REASONS) if bits >> i & 1]


def prompt_completion_segments(
    prompt: Any,
    completion: Any,
    row: int,
    tokenizer: Any,
    tools: list | None = None,
    chat: ChatOptions | None = None,
    stats: TurnStats | None = None,
) -> list[Segments]:
    """Loss-eligible completion after a prompt; both strings, or both lists of chat messages. Returns examples.

    Strings: `[(prompt, False), (completion, True)]`; sftune.data.tokenize keeps the prompt's own tokens and
    tokenizes the completion in context. Messages: the conversation `prompt + completion` trains the completion's
    assistant turns exactly as a conversation trains its turns (`conversation_examples`): each reply in its
    inference prompt.
    """
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion:
            raise DatasetFormatError(f"Row {row}, column 'completion' is empty. Remove rows without a completion.")
        return [[(prompt, False), (completion, True)]]
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
        return conversation_examples(
            messages, row, tokenizer, tools, chat, turns=turns, column="completion", stats=stats
        )
    raise DatasetFormatError(
        f"Row {row}: 'prompt' and 'completion' must both be strings or both be lists of messages; got "
        f"{type(prompt).__name__} and {type(completion).__name__}."
    )


def conversation_examples(
    messages: Any,
    row: int,
    tokenizer: Any,
    tools: list | None = None,
    chat: ChatOptions | None = None,
    turns: list[int] | None = None,
    column: str = "messages",
    stats: TurnStats | None = None,
) -> list[Segments]:
    """The examples a conversation becomes, each as segments, under sftune.data.render's definition.

    Usually one: the whole rendering (its tokens are `apply_chat_template(tokenize=True)`), training every reply
    where it sits. Turns the whole rendering does not show as at inference become their own examples
    (`inference prompt + reply`), unless `chat.inexact_turns == "error"`, which refuses them naming the row, the
    turn and why. `chat.every_turn` makes each assistant turn its own example; `chat.assistant_only=False`
    trains the whole rendering. `turns` picks which assistant messages to train (default: all).
    """
    chat = chat or ChatOptions()
    validate_messages(messages, row, column)
    if not chat.assistant_only and not chat.every_turn:
        return [[(render_chat(tokenizer, messages, row, tools=tools, template_kwargs=chat.template_kwargs), True)]]
    require_chat_template(tokenizer, row)
    try:
        plan = render.conversation_plan(tokenizer, messages, turns, tools, chat.template_kwargs, chat.stops)
    except render.RenderError as error:
        raise DatasetFormatError(
            f"Row {row}, column '{column}', message {error.turn} (assistant): {error}, so the reply the model must "
            "generate cannot be found. Set assistant_only_loss=False to train on the whole conversation (its "
            "tokens stay exact), or drop this row (dataset.filter(...))."
        ) from None
    except Exception as error:  # the template's own raise_exception, e.g. roles that must alternate
        raise template_refused(row, error) from None
    whole = plan.whole
    if stats is not None:
        stats.record(plan.turns)
    if not plan.turns:
        return [[(whole, False)]]  # nothing to train in this row; a dataset of only such rows is refused
    if chat.every_turn:
        return [[(turn.context, False), (turn.reply, True)] for turn in plan.turns]
    if plan.separate and chat.inexact_turns == "error":
        turn = plan.separate[0]
        raise DatasetFormatError(
            f"Row {row}, column '{column}', message {turn.message} (assistant): {turn.reason}, so training on the "
            "whole conversation would train this reply in a context (or form) the model never sees at inference. "
            "Set inexact_turns='split' (the default) to train such turns as their own examples rendered as at "
            "inference, or assistant_turns_as_examples=True to make every turn its own example."
        )
    examples: list[Segments] = []
    if plan.whole_spans:
        segments: Segments = []
        cursor = 0
        for start, end in plan.whole_spans:
            segments += [(whole[cursor:start], False), (whole[start:end], True)]
            cursor = end
        segments.append((whole[cursor : plan.whole_end], False))
        examples.append([(text, trainable) for text, trainable in segments if text])
    examples += [[(turn.context, False), (turn.reply, True)] for turn in plan.separate]
    return examples


def render_chat(
    tokenizer: Any,
    messages: list[dict],
    row: int,
    add_generation_prompt: bool = False,
    tools: list | None = None,
    template_kwargs: dict | None = None,
) -> str:
    require_chat_template(tokenizer, row)
    try:
        return render.render(tokenizer, messages, tools, add_generation_prompt, **(template_kwargs or {}))
    except Exception as error:  # the template's own raise_exception, e.g. roles that must alternate
        raise template_refused(row, error) from None


def require_chat_template(tokenizer: Any, row: int) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DatasetFormatError(
            f"Row {row} is a conversation, but the tokenizer has no chat template. Set tokenizer.chat_template, "
            "or call sftune.setup_chat_format(model, tokenizer) to add ChatML."
        )


def template_refused(row: int, error: Exception) -> DatasetFormatError:
    return DatasetFormatError(
        f"Row {row}: the chat template refused this conversation: {error}. Fix the row to fit the template "
        "(or drop it with dataset.filter(...)), or use a template that accepts it."
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
