"""TRL's `trl.trainer` import path: the trainers, configs, collators and helpers, re-exported."""

from ..config import IterativeSFTConfig, SFTConfig
from ..data.collators import DataCollatorForCompletionOnlyLM
from ..data.constant_length import ConstantLengthDataset
from ..models import ModelConfig, get_kbit_device_map, get_peft_config, get_quantization_config
from ..trainers.iterative import IterativeSFTTrainer
from ..trainers.sft import SFTTrainer

__all__ = [
    "ConstantLengthDataset",
    "DataCollatorForCompletionOnlyLM",
    "IterativeSFTConfig",
    "IterativeSFTTrainer",
    "ModelConfig",
    "SFTConfig",
    "SFTTrainer",
    "get_kbit_device_map",
    "get_peft_config",
    "get_quantization_config",
]
