"""sftune: supervised fine-tuning of language models, with TRL's API."""

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
from .version import __version__

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
    "__version__",
    "get_kbit_device_map",
    "get_peft_config",
    "get_quantization_config",
    "init_zero_verbose",
    "setup_chat_format",
    "smollm2_path",
]
