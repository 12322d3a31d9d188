"""Prompts as the model sees them at inference: the chat template's generation prompt as token ids, and the
tokens that end a reply (the template's end-of-turn and the model's EOS).

`inference_prompt_ids` and `stop_token_ids` are the only places this module renders a chat template; they move
to the shared renderer (sftune/data/chat_spans.py) once it exposes the inference prompt and stop tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

END_MARKER = "\u2063sftune-end-of-reply\u2063"


@dataclass
class Prompt:
    id: str
    messages: list[dict] | None  # chat prompt; None for a plain-text prompt
    text: str | None
    reference: Any


def inference_prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """The exact ids a model is given at inference: `apply_chat_template(..., add_generation_prompt=True)`, or the
    tokenizer's own encoding (with its special tokens) for a plain-text prompt."""
    if prompt.messages is None:
        return list(tokenizer(prompt.text)["input_ids"])
    ids = tokenizer.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers versions that return a BatchEncoding
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def stop_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """Tokens that end a reply: the generation config's EOS ids, the tokenizer's EOS, and the chat template's
    end-of-turn (the first special token the template writes after an assistant message)."""
    found: list[int] = []

    def add(value: Any) -> None:
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if token is not None and int(token) not in found:
                found.append(int(token))

    if generation_config is not None:
        add(getattr(generation_config, "eos_token_id", None))
    add(tokenizer.eos_token_id)
    end_of_turn = template_end_of_turn(tokenizer)
    if end_of_turn is not None:
        add(end_of_turn)
    if not found:
        raise ValueError("The tokenizer has no EOS token and its chat template no end-of-turn: nothing stops a reply.")
    return found


def template_end_of_turn(tokenizer: Any) -> int | None:
    """The special token the chat template writes right after an assistant reply, if any."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": END_MARKER}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:
        return None
    if END_MARKER not in text:
        return None
    after = text.split(END_MARKER, 1)[1]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    for token in ids:
        if token in special:
            return int(token)
        if tokenizer.decode([token]).strip():  # visible text before any special token: no end-of-turn token
            return None
    return None


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
