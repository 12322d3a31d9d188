"""TRL's `trl.trainer.utils` import path."""

from ..data.collators import DataCollatorForCompletionOnlyLM
from ..data.constant_length import ConstantLengthDataset
from ..models import get_kbit_device_map, get_peft_config, get_quantization_config

__all__ = [
    "ConstantLengthDataset",
    "DataCollatorForCompletionOnlyLM",
    "get_kbit_device_map",
    "get_peft_config",
    "get_quantization_config",
]
