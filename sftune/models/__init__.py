"""Models: loading any checkpoint (`loading`), the bundled SmolLM2 (`bundled`) and TRL's `ModelConfig` (`config`).

This file only re-exports, so that `sftune.models.X` keeps working for every name it ever held."""

from .bundled import SMOLLM2_GGUF, SMOLLM2_MODULE, SMOLLM2_WHEEL, _find_smollm2_gguf, cache_dir, smollm2_path
from .config import ModelConfig, get_kbit_device_map, get_peft_config, get_quantization_config
from .loading import (
    LOCATION_KWARGS,
    MODEL_TAGS,
    NonFiniteWeightsError,
    check_finite_weights,
    check_hardware_requirements,
    default_output_dir,
    ensure_pad_token,
    is_seq2seq,
    load_model,
    load_tokenizer,
    location_kwargs,
    model_name_or_path,
    plain_copy_of_gguf_model,
    resolve_model,
    resolve_processing_class,
    tag_model,
    takes_packed_rows,
)

__all__ = [
    "LOCATION_KWARGS",
    "MODEL_TAGS",
    "SMOLLM2_GGUF",
    "SMOLLM2_MODULE",
    "SMOLLM2_WHEEL",
    "ModelConfig",
    "NonFiniteWeightsError",
    "cache_dir",
    "check_finite_weights",
    "check_hardware_requirements",
    "default_output_dir",
    "ensure_pad_token",
    "get_kbit_device_map",
    "get_peft_config",
    "get_quantization_config",
    "is_seq2seq",
    "load_model",
    "load_tokenizer",
    "location_kwargs",
    "model_name_or_path",
    "plain_copy_of_gguf_model",
    "resolve_model",
    "resolve_processing_class",
    "smollm2_path",
    "tag_model",
    "takes_packed_rows",
    "_find_smollm2_gguf",
]
