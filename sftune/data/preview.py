"""Show users what their rows become: the exact tokens the model sees, with the trained ones marked."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from ..models import load_tokenizer
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


def preview_rows(
    model: str,
    dataset_name: str,
    rows: int = 2,
    config: str | None = None,
    color: str = "auto",
) -> list[dict[str, Any]]:
    """Print the first `rows` rows of a dataset as sftune will train on them, and return them."""
    recipe = yaml.safe_load(Path(config).read_text()) if config else {}
    tokenizer = load_tokenizer(model)
    options = TokenizeOptions(
        max_length=recipe.get("max_length") or recipe.get("max_seq_length") or min(tokenizer.model_max_length, 1024),
        text_field=recipe.get("dataset_text_field", "text"),
        completion_only_loss=recipe.get("completion_only_loss"),
        assistant_only_loss=bool(recipe.get("assistant_only_loss", False)),
    )
    data = load_any_dataset(dataset_name)
    data = data.select(range(min(rows, len(data))))
    prepared = prepare_dataset(data, tokenizer, options, name="preview")
    use_color = color == "always" or (color == "auto" and sys.stdout.isatty())
    shown = []
    for i, row in enumerate(prepared):
        trained = sum(row["loss_mask"])
        print(f"--- row {i}: {len(row['input_ids'])} tokens, {trained} trained ---")
        print(render_row(tokenizer, row["input_ids"], row["loss_mask"], use_color))
        shown.append(row)
    legend = "green = trained, dim = context only" if use_color else "[[ ]] = trained"
    print(f"({legend})")
    return shown
