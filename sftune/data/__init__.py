"""Dataset preparation: formats -> segments -> tokens + loss mask -> (packing) -> collation."""

from .collators import DataCollatorForCompletionOnlyLM, DataCollatorForSFT
from .packing import best_fit_decreasing, pack_dataset
from .tokenize import TokenizeOptions, prepare_dataset

__all__ = [
    "DataCollatorForCompletionOnlyLM",
    "DataCollatorForSFT",
    "TokenizeOptions",
    "best_fit_decreasing",
    "pack_dataset",
    "prepare_dataset",
]
