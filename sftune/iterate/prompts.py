"""Prompts from a dataset, and their ids as the model sees them at inference (rendered by sftune.data.render)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..data import render


@dataclass
class Prompt:
    id: str
    messages: list[dict] | None  # chat prompt; None for a plain-text prompt
    text: str | None
    reference: Any


def prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """The exact ids a model is given at inference: the chat template's inference prompt (sftune.data.render, the
    one definition training uses too), or the tokenizer's own encoding (with its special tokens) for plain text."""
    if prompt.messages is None:
        return list(tokenizer(prompt.text)["input_ids"])
    return [int(i) for i in render.inference_prompt_ids(tokenizer, prompt.messages)]


def reply_ids(tokenizer: Any, prompt: Prompt, reply: str, stops: tuple[str, ...]) -> list[int]:
    """A reply written as text (a gold answer) as the model would generate it after `prompt_ids(prompt)`: for a
    chat prompt, the reply the template renders for `{"role": "assistant", "content": reply}` after the inference
    prompt, through its stop token (sftune.data.render.turn_replies, as SFTTrainer trains it); for plain text, its
    tokens and the first stop token."""
    if prompt.messages is None:
        ends = [tokenizer.convert_tokens_to_ids(token) for token in stops[:1]]
        return [*tokenizer(reply, add_special_tokens=False)["input_ids"], *ends]
    messages = [*prompt.messages, {"role": "assistant", "content": reply}]
    turn = render.turn_replies(tokenizer, messages, [len(prompt.messages)], stops=stops)[0]
    ids = prompt_ids(tokenizer, prompt)
    whole = tokenizer(turn.context + turn.reply, add_special_tokens=False)["input_ids"]
    if whole[: len(ids)] == ids:
        return [int(i) for i in whole[len(ids) :]]
    # The reply's first characters merge with the prompt's last token: the model, given the exact prompt,
    # generates them as tokens of their own.
    return [int(i) for i in tokenizer(turn.reply, add_special_tokens=False)["input_ids"]]


def rows_to_prompts(rows: list[dict], prompt_column: str | None, reference_column: str, where: str) -> list[Prompt]:
    """Prompts from dataset rows: `messages` (a final assistant turn is the reference if there is no reference
    column) or a `prompt` column (text or messages). Errors name the row."""
    prompts = []
    for index, row in enumerate(rows):
        column = prompt_column or ("messages" if "messages" in row else "prompt" if "prompt" in row else None)
        if column is None or column not in row:
            raise ValueError(
                f"{where} row {index}: no {prompt_column or 'messages or prompt'!r} column (columns: "
                f"{sorted(row)}). Give `messages` or `prompt`, or set prompt_column."
            )
        value = row[column]
        reference = row.get(reference_column)
        if isinstance(value, str):
            prompt = Prompt(str(row.get("id", index)), None, value, reference)
        elif isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
            messages = [dict(m) for m in value]
            if messages[-1]["role"] == "assistant":
                last = messages.pop()
                if reference is None:
                    reference = last.get("content")
            if not messages:
                raise ValueError(f"{where} row {index}: {column!r} holds only an assistant turn; nothing to prompt.")
            prompt = Prompt(str(row.get("id", index)), messages, None, reference)
        else:
            raise ValueError(f"{where} row {index}: {column!r} must be text or a list of {{role, content}} messages.")
        prompts.append(prompt)
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: the `id` column repeats values; prompt ids must be unique.")
    return prompts


def load_prompts(name: str, prompt_column: str | None, reference_column: str) -> list[Prompt]:
    from ..data.files import load_any_dataset

    data = load_any_dataset(name)
    return rows_to_prompts([dict(r) for r in data], prompt_column, reference_column, name)
