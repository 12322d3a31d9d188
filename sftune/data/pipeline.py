"""The one mapping from a trainer's config to the data pipeline, and the preparation SFTTrainer and
`sftune preview` share: config -> `TokenizeOptions` -> `prepare_dataset` (-> `pack_dataset`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config import DEFAULT_MAX_SEQ_LENGTH_CAP, IterativeSFTConfig, SFTConfig
from . import render
from .packing import pack_dataset
from .tokenize import TokenizeOptions, prepare_dataset


def default_max_length(tokenizer: Any) -> int:
    """SFTConfig's max_length when unset: the tokenizer's own limit, capped (tokenizers often say 10^30)."""
    return min(tokenizer.model_max_length, DEFAULT_MAX_SEQ_LENGTH_CAP)


def max_length(args: SFTConfig | IterativeSFTConfig, tokenizer: Any) -> Any:
    """The longest example: `args.max_length`; unset, SFTConfig's default and IterativeSFTConfig's no limit."""
    if args.max_length is None and isinstance(args, SFTConfig):
        return default_max_length(tokenizer)
    return args.max_length


def explicit_generation_config(model: Any) -> Any:
    """The model's generation config where it was given (a `generation_config.json`, or set by the user), else None:
    one derived from the model config says nothing about which tokens end generation."""
    config = getattr(model, "generation_config", None)
    return None if config is None or getattr(config, "_from_model_config", True) else config


def pipeline_options(
    args: SFTConfig | IterativeSFTConfig,
    tokenizer: Any,
    packing: bool = False,
    generation_config: Any = None,
) -> TokenizeOptions:
    """Everything of a config that decides how a row becomes tokens, for SFTTrainer, IterativeSFTTrainer.step and
    `sftune preview` alike.

    `packing`: whether these rows are packed afterwards (`args.packing` for training data, `eval_packing` for
    evaluation data): "wrapped" packing cuts the concatenation itself, so rows stay whole; "bfd_split" splits an
    over-long row into max_length pieces instead of truncating it. Stop tokens come from `generation_config` where
    it is explicit (see `explicit_generation_config`); else the data pipeline finds them (sftune.data.render).
    """
    limit = max_length(args, tokenizer)
    stops = render.eos_ids(generation_config)
    strategy = getattr(args, "packing_strategy", None)
    dataset_options = args.dataset_options if isinstance(args, SFTConfig) else {}
    return TokenizeOptions(
        max_length=None if packing and strategy == "wrapped" else limit,
        text_field=getattr(args, "dataset_text_field", "text"),
        add_special_tokens=dataset_options.get("add_special_tokens", True),
        completion_only_loss=getattr(args, "completion_only_loss", None),
        assistant_only_loss=getattr(args, "assistant_only_loss", False),
        truncation_mode=args.truncation_mode,
        assistant_turns_as_examples=getattr(args, "assistant_turns_as_examples", False),
        inexact_turns=getattr(args, "inexact_turns", "split"),
        chat_template_kwargs=getattr(args, "chat_template_kwargs", None),
        stop_tokens=render.stop_tokens(tokenizer, generation_config) if stops else None,
        overlong="split" if packing and strategy == "bfd_split" else "truncate",
    )


def prepare_for_training(
    dataset: Any,
    tokenizer: Any,
    args: SFTConfig,
    packing: bool,
    name: str,
    formatting_func: Callable | None = None,
    generation_config: Any = None,
) -> Any:
    """A `datasets` dataset as SFTTrainer trains it: tokenized with `pipeline_options`, then packed if asked."""
    options = pipeline_options(args, tokenizer, packing, generation_config)
    dataset = prepare_dataset(
        dataset, tokenizer, options, formatting_func, args.dataset_num_proc, args.dataset_batch_size, name
    )
    if packing:
        dataset = pack_dataset(dataset, max_length(args, tokenizer), args.packing_strategy, seed=args.seed)
    return dataset
