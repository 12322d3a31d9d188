from .iterative import IterativeSFTTrainer
from .sft import SFTTrainer

__all__ = ["IterativeSFTTrainer", "SFTTrainer"]
