"""Show users what their rows become: the exact tokens the model sees, with the trained ones marked."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from ..models import load_tokenizer
from . import render
from .files import load_any_dataset
from .tokenize import TokenizeOptions, prepare_dataset

GREEN, DIM, RESET = "\033[32m", "\033[2m", "\033[0m"


def render_row(tokenizer: Any, input_ids: list[int], loss_mask: list[int], color: bool) -> str:
    """The row's exact text, trained runs green (or inside [[ ]] without colour).

    Each run is the difference of decoding the ids up to its end and up to its start, so the pieces join to
    `decode(input_ids)` exactly: decoding tokens one by one would drop SentencePiece's leading spaces and split
    multi-byte characters.
    """
    out = []
    decoded = ""
    start = 0
    for end in range(1, len(input_ids) + 1):
        if end < len(input_ids) and loss_mask[end] == loss_mask[start]:
            continue
        text = tokenizer.decode(input_ids[:end])
        piece, decoded = text[len(decoded) :], text
        if color:
            out.append((GREEN if loss_mask[start] else DIM) + piece + RESET)
        else:
            out.append(f"[[{piece}]]" if loss_mask[start] else piece)
        start = end
    return "".join(out)


def turn_lines(tokenizer: Any, example: dict[str, Any], options: TokenizeOptions) -> tuple[list[str], int]:
    """What a conversation row's assistant turns become (sftune.data.render), and how many examples it gives."""
    messages, turns = example.get("messages"), None
    if messages is None and isinstance(example.get("prompt"), list) and isinstance(example.get("completion"), list):
        messages = example["prompt"] + example["completion"]
        turns = [len(example["prompt"]) + i for i, m in enumerate(example["completion"]) if m["role"] == "assistant"]
    if not isinstance(messages, list) or not options.assistant_only_loss and turns is None:
        return [], 1
    kwargs = example.get("chat_template_kwargs") or options.chat_template_kwargs
    plan = render.conversation_plan(tokenizer, messages, turns, example.get("tools"), kwargs, options.stop_tokens)
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    lines = []
    for turn in plan.turns:
        if options.assistant_turns_as_examples:
            how = "its own example (assistant_turns_as_examples=True)"
        elif turn.in_whole:
            how = "in the whole conversation, which shows it exactly as at inference"
        else:
            how = f"its own example rendered as at inference, because {turn.reason}"
        stop = "" if turn.stopped else "; no stop token after it"
        lines.append(
            f"  message {turn.message} (assistant): context {count(turn.context)} tokens (its inference prompt), "
            f"trained {count(turn.context + turn.reply) - count(turn.context)} tokens{stop}; {how}"
        )
    if options.assistant_turns_as_examples:
        examples = len(plan.turns) or 1
    else:
        examples = int(bool(plan.whole_spans) or not plan.turns) + len(plan.separate)
    return lines, examples


def preview_rows(
    model: str,
    dataset_name: str,
    rows: int = 2,
    config: str | None = None,
    color: str = "auto",
) -> list[dict[str, Any]]:
    """Print the first `rows` rows of a dataset as sftune will train on them, and return their examples: per
    conversation turn its context, its trained tokens and which rendering was used and why; then each example's
    exact tokens with the trained ones marked."""
    recipe = yaml.safe_load(Path(config).read_text()) if config else {}
    tokenizer = load_tokenizer(model)
    options = TokenizeOptions(
        max_length=recipe.get("max_length") or recipe.get("max_seq_length") or min(tokenizer.model_max_length, 1024),
        text_field=recipe.get("dataset_text_field", "text"),
        completion_only_loss=recipe.get("completion_only_loss"),
        assistant_only_loss=bool(recipe.get("assistant_only_loss", False)),
        assistant_turns_as_examples=bool(recipe.get("assistant_turns_as_examples", False)),
        inexact_turns=recipe.get("inexact_turns", "split"),
        chat_template_kwargs=recipe.get("chat_template_kwargs"),
    )
    data = load_any_dataset(dataset_name)
    data = data.select(range(min(rows, len(data))))
    prepared = list(prepare_dataset(data, tokenizer, options, name="preview"))
    use_color = color == "always" or (color == "auto" and sys.stdout.isatty())
    cursor = 0
    for i, example in enumerate(data):
        lines, count = turn_lines(tokenizer, example, options) if "input_ids" not in example else ([], 1)
        print(f"=== row {i}: {count} example{'s' if count != 1 else ''} ===")
        for line in lines:
            print(line)
        for k, row in enumerate(prepared[cursor : cursor + count]):
            trained = sum(row["loss_mask"])
            print(f"--- row {i}, example {k}: {len(row['input_ids'])} tokens, {trained} trained ---")
            print(render_row(tokenizer, row["input_ids"], row["loss_mask"], use_color))
        cursor += count
    legend = "green = trained, dim = context only" if use_color else "[[ ]] = trained"
    print(f"({legend})")
    return prepared
