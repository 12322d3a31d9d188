"""sftune: supervised fine-tuning of language models, with TRL's API."""

__version__ = "0.1.0"

from .chat import setup_chat_format
from .config import IterativeSFTConfig, SFTConfig
from .data.collators import DataCollatorForCompletionOnlyLM, DataCollatorForSFT
from .data.constant_length import ConstantLengthDataset
from .models import (
    ModelConfig,
    get_kbit_device_map,
    get_peft_config,
    get_quantization_config,
    smollm2_path,
)
from .scripts.utils import ScriptArguments, SFTScriptArguments, TrlParser, init_zero_verbose
from .trainers.iterative import IterativeSFTTrainer
from .trainers.sft import SFTTrainer

__all__ = [
    "ConstantLengthDataset",
    "DataCollatorForCompletionOnlyLM",
    "DataCollatorForSFT",
    "IterativeSFTConfig",
    "IterativeSFTTrainer",
    "ModelConfig",
    "SFTConfig",
    "SFTScriptArguments",
    "SFTTrainer",
    "ScriptArguments",
    "TrlParser",
    "get_kbit_device_map",
    "get_peft_config",
    "get_quantization_config",
    "init_zero_verbose",
    "setup_chat_format",
    "smollm2_path",
]
