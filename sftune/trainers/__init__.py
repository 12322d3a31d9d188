from .sft import SFTTrainer

__all__ = ["SFTTrainer"]
