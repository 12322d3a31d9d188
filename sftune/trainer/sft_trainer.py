"""TRL's `trl.trainer.sft_trainer` import path."""

from ..config import SFTConfig
from ..data.collators import DataCollatorForCompletionOnlyLM, DataCollatorForLanguageModeling
from ..trainers.sft import SFTTrainer

__all__ = ["DataCollatorForCompletionOnlyLM", "DataCollatorForLanguageModeling", "SFTConfig", "SFTTrainer"]
