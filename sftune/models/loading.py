"""Loading any checkpoint: by name or path, causal or seq2seq, GGUF included; its tokenizer with a pad token;
weights checked finite; GPU-only features refused where they cannot run."""

from __future__ import annotations

import importlib.util
import inspect
import os
from typing import Any, TypeVar, cast

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)

from ..compat import accept_positional_processor_call, bits_and_bytes_config, dtype_kwargs, model_init_dtype_key
from ..config import normalize_model_init_kwargs
from ..errors import NonFiniteWeightsError

# A tokenizer, or a processor (vision-language models) that wraps one; functions that take either return the same.
TokenizerOrProcessor = TypeVar("TokenizerOrProcessor", bound=PreTrainedTokenizerBase | ProcessorMixin)


def check_hardware_requirements(model_init_kwargs: dict[str, Any]) -> None:
    """Fail before loading when a GPU-only feature is asked for on a machine that cannot run it."""
    quant = model_init_kwargs.get("quantization_config")
    wants_kbit = bool(
        model_init_kwargs.get("load_in_8bit")
        or model_init_kwargs.get("load_in_4bit")
        or getattr(quant, "load_in_8bit", False)
        or getattr(quant, "load_in_4bit", False)
    )
    if wants_kbit:
        if importlib.util.find_spec("bitsandbytes") is None:
            raise RuntimeError("8-bit/4-bit loading needs bitsandbytes: `pip install 'sftune[bnb]'`.")
        if not torch.cuda.is_available():
            raise RuntimeError("8-bit/4-bit loading needs a CUDA GPU, and none is visible on this machine.")
    if model_init_kwargs.get("attn_implementation") == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise RuntimeError(
                "attn_implementation='flash_attention_2' needs the flash-attn package: `pip install 'sftune[flash]'`."
            )
        if not torch.cuda.is_available():
            raise RuntimeError("attn_implementation='flash_attention_2' needs a CUDA GPU; use 'sdpa' on this machine.")


def is_seq2seq(name_or_path: str, **config_kwargs: Any) -> bool:
    config = AutoConfig.from_pretrained(name_or_path, **config_kwargs)
    return bool(getattr(config, "is_encoder_decoder", False))


def load_model(name_or_path: str | os.PathLike, model_init_kwargs: dict[str, Any] | None = None) -> PreTrainedModel:
    """Load a causal or seq2seq LM by name or path, with `from_pretrained` keyword arguments."""
    kwargs = normalize_model_init_kwargs(model_init_kwargs)
    check_hardware_requirements(kwargs)  # before building a quantization config, which needs bitsandbytes
    # Legacy from_pretrained flags become a quantization config, as transformers now wants.
    if kwargs.get("load_in_8bit") or kwargs.get("load_in_4bit"):
        kwargs["quantization_config"] = bits_and_bytes_config(
            load_in_8bit=bool(kwargs.pop("load_in_8bit", False)),
            load_in_4bit=bool(kwargs.pop("load_in_4bit", False)),
        )
    seq2seq = is_seq2seq(str(name_or_path), **location_kwargs(kwargs))
    auto_class = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = auto_class.from_pretrained(name_or_path, **model_init_dtype_key(kwargs))
    model = plain_copy_of_gguf_model(model) if kwargs.get("gguf_file") else model
    check_finite_weights(model, str(name_or_path))
    return model


def plain_copy_of_gguf_model(gguf_model: PreTrainedModel) -> PreTrainedModel:
    """The same model without the GGUF quantizer mark.

    transformers dequantizes GGUF weights on load but keeps the model marked as quantized, so the Trainer refuses to
    train it and save_pretrained refuses to save it; a copy built from a quantizer-free config does neither."""
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    model = type(gguf_model)._from_config(config, **dtype_kwargs(gguf_model.dtype))
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    model.config._name_or_path = gguf_model.config._name_or_path
    return model


# `from_pretrained` arguments that say where and how to find a checkpoint's files: the config and tokenizer loads
# need them as much as the model load does (a GGUF file, a subfolder, a private repo's token, a revision...).
LOCATION_KWARGS = (
    "revision",
    "trust_remote_code",
    "subfolder",
    "gguf_file",
    "token",
    "use_auth_token",
    "cache_dir",
    "local_files_only",
    "force_download",
    "proxies",
)


def location_kwargs(model_init_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The part of `model_init_kwargs` that also applies to loading the config and the tokenizer."""
    return {k: v for k, v in (model_init_kwargs or {}).items() if k in LOCATION_KWARGS}


def check_finite_weights(model: torch.nn.Module, source: str) -> None:
    """Refuse weights that are NaN or infinite (saved from a diverged run): training on them only spreads NaN."""
    for name, param in model.named_parameters():
        if param.is_floating_point() and param.device.type != "meta" and not torch.isfinite(param).all():
            bad = int((~torch.isfinite(param)).sum())
            raise NonFiniteWeightsError(
                f"{source}: weight {name} holds {bad} NaN/infinite values of {param.numel()}; refusing to load it. "
                "It was probably saved from a run that diverged: use an earlier checkpoint."
            )


def load_tokenizer(name_or_path: str | os.PathLike, **kwargs: Any) -> PreTrainedTokenizerBase:
    return ensure_pad_token(AutoTokenizer.from_pretrained(name_or_path, **kwargs))


def ensure_pad_token(tokenizer: TokenizerOrProcessor) -> TokenizerOrProcessor:
    """Give a tokenizer without a pad token one (EOS, else UNK).

    Safe because sftune never derives labels from pad ids: padding is known from positions, so EOS stays in the
    loss even when pad == eos.
    """
    tok = cast(PreTrainedTokenizerBase, getattr(tokenizer, "tokenizer", tokenizer))  # processors wrap a tokenizer
    if tok.pad_token is None:
        fallback = tok.eos_token or tok.unk_token
        if fallback is None:
            raise ValueError("The tokenizer has no pad, eos or unk token; add a pad token to it before training.")
        tok.pad_token = fallback
    return tokenizer


def resolve_model(model: Any, model_init_kwargs: dict[str, Any] | None) -> tuple[Any, str | None]:
    """A trainer's `model` argument as (model instance, the id or path it came from)."""
    if isinstance(model, (str, os.PathLike)):
        return load_model(str(model), model_init_kwargs), str(model)
    if model_init_kwargs:
        raise ValueError(
            "model_init_kwargs only apply when the model is given by name or path, but a model instance was "
            "passed. Load the model with those arguments yourself, or pass its name instead."
        )
    return model, model_name_or_path(model) if model is not None else None


def resolve_processing_class(
    processing_class: PreTrainedTokenizerBase | ProcessorMixin | None,
    model_id: str | None,
    model_init_kwargs: dict[str, Any] | None = None,
) -> PreTrainedTokenizerBase | ProcessorMixin:
    """The given tokenizer/processor, else the one saved with the model (found with the model's location
    arguments: subfolder, gguf_file, revision, token...); with a pad token either way."""
    if processing_class is None:
        if model_id is None:
            raise ValueError("Cannot tell which tokenizer to load: pass processing_class=tokenizer.")
        return load_tokenizer(model_id, **location_kwargs(model_init_kwargs))
    return ensure_pad_token(accept_positional_processor_call(processing_class))


MODEL_TAGS = ("sft", "sftune")


def tag_model(model: Any) -> None:
    """Add sftune's tags to `model.model_tags` (the hub and the model card show them)."""
    targets = [model, model.get_base_model()] if hasattr(model, "get_base_model") else [model]
    for target in targets:
        if hasattr(target, "add_model_tags"):
            target.add_model_tags(list(MODEL_TAGS))


def takes_packed_rows(model: Any) -> bool:
    """Packed rows need a decoder-only model whose forward takes position ids (and so custom masks)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    return "position_ids" in inspect.signature(base.forward).parameters


def default_output_dir(model: Any, suffix: str) -> str:
    name = str(model).rstrip("/").split("/")[-1] if isinstance(model, (str, os.PathLike)) else "model"
    return f"{name}-{suffix}"


def model_name_or_path(model: Any) -> str | None:
    """The checkpoint a model instance was loaded from, if known."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(base, "config", None), "_name_or_path", None) or None
