"""Show users what their rows become: the exact tokens the model sees, with the trained ones marked."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..config import SFTConfig
from ..models import load_tokenizer
from . import render
from .files import load_any_dataset
from .packing import pack_dataset
from .pipeline import explicit_generation_config, max_length, pipeline_options
from .tokenize import SOURCE_ROW, TokenizeOptions, prepare_dataset

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


def turn_lines(tokenizer: Any, example: dict[str, Any], options: TokenizeOptions) -> list[str]:
    """What a conversation row's assistant turns become (sftune.data.render)."""
    messages, turns = example.get("messages"), None
    if messages is None and isinstance(example.get("prompt"), list) and isinstance(example.get("completion"), list):
        messages = example["prompt"] + example["completion"]
        turns = [len(example["prompt"]) + i for i, m in enumerate(example["completion"]) if m["role"] == "assistant"]
    if not isinstance(messages, list) or not options.assistant_only_loss and turns is None:
        return []
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
    return lines


def generation_config_of(model: str) -> Any:
    """The generation config training would use for the model at `model` (a local folder): the one
    `from_pretrained` loads, when explicit (see `explicit_generation_config`)."""
    if not (Path(model) / "generation_config.json").is_file():
        return None
    from transformers import GenerationConfig

    try:
        loaded = GenerationConfig.from_pretrained(model)
    except (OSError, ValueError):
        return None
    return explicit_generation_config(SimpleNamespace(generation_config=loaded))


def preview_rows(
    model: str,
    dataset_name: str,
    rows: int = 2,
    args: SFTConfig | None = None,
    color: str = "auto",
    dataset_config: str | None = None,
    split: str = "train",
) -> list[dict[str, Any]]:
    """Print the first `rows` rows of a dataset as SFTTrainer with `args` trains them, and return their examples:
    per conversation turn its context, its trained tokens and which rendering was used and why; then each example's
    exact tokens with the trained ones marked.

    The examples are those training makes (`sftune.data.pipeline`: the same options, the same max_length default,
    the same generation config). With `args.packing` they are the examples before packing (split or kept whole
    as packing needs); how they are then packed is said at the end. `sftune preview --config X` parses X as
    `sftune sft --config X` does."""
    args = args if args is not None else SFTConfig(output_dir="sftune-preview", report_to="none")
    tokenizer = load_tokenizer(model)
    options = pipeline_options(args, tokenizer, args.packing, generation_config_of(model))
    data = load_any_dataset(dataset_name, dataset_config, split)
    data = data.select(range(min(rows, len(data))))
    made = prepare_dataset(data, tokenizer, options, batch_size=args.dataset_batch_size, name="preview",
                           keep_source_rows=True)  # fmt: skip
    sources = made[SOURCE_ROW]
    prepared = list(made.remove_columns([SOURCE_ROW]))
    use_color = color == "always" or (color == "auto" and sys.stdout.isatty())
    for i, example in enumerate(data):
        lines = turn_lines(tokenizer, example, options) if "input_ids" not in example else []
        examples = [row for row, source in zip(prepared, sources, strict=True) if source == i]
        print(f"=== row {i}: {len(examples)} example{'s' if len(examples) != 1 else ''} ===")
        for line in lines:
            print(line)
        for k, row in enumerate(examples):
            trained = sum(row["loss_mask"])
            print(f"--- row {i}, example {k}: {len(row['input_ids'])} tokens, {trained} trained ---")
            print(render_row(tokenizer, row["input_ids"], row["loss_mask"], use_color))
    legend = "green = trained, dim = context only" if use_color else "[[ ]] = trained"
    print(f"({legend})")
    if args.packing:
        print(packing_summary(prepared, args, tokenizer))
    return prepared


def packing_summary(examples: list[dict[str, Any]], args: SFTConfig, tokenizer: Any) -> str:
    """What packing (args.packing) then makes of the examples shown."""
    from datasets import Dataset

    limit = max_length(args, tokenizer)
    packed = pack_dataset(
        Dataset.from_list([{"input_ids": e["input_ids"], "loss_mask": e["loss_mask"]} for e in examples]),
        limit,
        args.packing_strategy,
        seed=args.seed,
    )
    how = (
        "concatenated and cut into blocks"
        if args.packing_strategy == "wrapped"
        else "placed whole into rows, each attending only to itself"
    )
    return (
        f"(packing=True, packing_strategy={args.packing_strategy}: these {len(examples)} examples are {how} of at "
        f"most {limit} tokens: {len(packed)} rows here; training packs the whole dataset the same way)"
    )
