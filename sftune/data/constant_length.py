"""ConstantLengthDataset: TRL's original packing, kept for code written against it.

It concatenates examples (EOS between them) and cuts the stream into fixed-length blocks, so an example may
attend to the ones before it in its block. `SFTConfig(packing=True)` uses sftune's exact packing instead
(`sftune.data.packing`); use this class only when you want that original behaviour.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset
from transformers import PreTrainedTokenizerBase


def is_token_ids(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 1 and not value.is_floating_point()
    return isinstance(value, (list, tuple)) and all(isinstance(t, int) for t in value)


class ConstantLengthDataset(IterableDataset):
    """Yields `{"input_ids", "labels"}` blocks of exactly `seq_length` tokens from a dataset of texts (or of token
    ids, when `formatting_func` returns them: those are used as they are).

    Texts are read `num_of_sequences * seq_length * chars_per_token` characters at a time, tokenized, joined
    with `eos_token_id` (when `append_concat_token`), cut into blocks (the remainder of each buffer is dropped)
    and, with `shuffle`, shuffled within the buffer. With `infinite=True` the dataset restarts when exhausted.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        dataset: Any,
        dataset_text_field: str | None = None,
        formatting_func: Callable[[dict], str] | None = None,
        infinite: bool = False,
        seq_length: int = 1024,
        num_of_sequences: int = 1024,
        chars_per_token: float = 3.6,
        eos_token_id: int = 0,
        shuffle: bool = True,
        append_concat_token: bool = True,
        add_special_tokens: bool = True,
    ) -> None:
        if dataset_text_field is None and formatting_func is None:
            raise ValueError("ConstantLengthDataset needs dataset_text_field or formatting_func to find the text.")
        self.tokenizer = tokenizer
        self.dataset = dataset
        self.formatting_func = formatting_func or (lambda example: example[dataset_text_field])
        self.infinite = infinite
        self.seq_length = seq_length
        self.chars_per_token = chars_per_token
        self.max_buffer_size = int(seq_length * chars_per_token * num_of_sequences)
        self.concat_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else eos_token_id
        self.shuffle = shuffle
        self.append_concat_token = append_concat_token
        self.add_special_tokens = add_special_tokens

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        iterator = iter(self.dataset)
        more = True
        while more:
            buffer: list[Any] = []
            size = 0.0  # characters, or token ids times chars_per_token
            while size < self.max_buffer_size:
                try:
                    text = self.formatting_func(next(iterator))
                except StopIteration:
                    if not self.infinite:
                        more = False
                        break
                    warnings.warn("ConstantLengthDataset: the dataset is exhausted; starting over.", stacklevel=2)
                    iterator = iter(self.dataset)
                    continue
                if isinstance(text, str):
                    size += len(text)
                elif is_token_ids(text):  # already tokenized by formatting_func
                    text = [int(t) for t in text]
                    size += len(text) * self.chars_per_token
                else:
                    raise ValueError(
                        "formatting_func must return the example's text (a string) or its token ids (a list of "
                        f"ints), got {type(text).__name__}."
                    )
                buffer.append(text)
            if not buffer:
                return
            texts = [text for text in buffer if isinstance(text, str)]
            encoded = iter(
                self.tokenizer(texts, add_special_tokens=self.add_special_tokens, truncation=False)["input_ids"]
                if texts
                else []
            )
            tokenized = [next(encoded) if isinstance(text, str) else text for text in buffer]
            stream: list[int] = []
            for ids in tokenized:
                stream += ids + ([self.concat_token_id] if self.append_concat_token else [])
            blocks = [
                stream[i : i + self.seq_length]
                for i in range(0, len(stream), self.seq_length)
                if len(stream) - i >= self.seq_length
            ]
            if self.shuffle:
                random.shuffle(blocks)
            for block in blocks:
                ids = torch.tensor(block, dtype=torch.long)
                yield {"input_ids": ids, "labels": ids.clone()}
