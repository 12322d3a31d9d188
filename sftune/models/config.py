"""`ModelConfig` (TRL's): how to load and adapt the model, and the LoRA, quantization and device-map settings it
implies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..compat import bits_and_bytes_config
from ..config import resolve_dtype


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
