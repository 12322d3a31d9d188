"""Causal-LM loss without the full (tokens x vocabulary) logits.

The model body gives hidden states; only positions that have a label go through the output layer, in chunks
whose logits are recomputed in the backward pass instead of stored. The result equals the usual cross-entropy
(sum over labelled tokens / their count) to float precision, for a fraction of the memory, and skips the
output layer for prompt and padding tokens entirely.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


def _chunk_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor):
    logits = F.linear(hidden, weight, bias)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # a stable softmax over the vocabulary needs at least float32
    loss = F.cross_entropy(logits, labels, reduction="sum")
    with torch.no_grad():
        correct = (logits.argmax(-1) == labels).sum()
    return loss, correct


def chunked_cross_entropy(
    hidden: torch.Tensor,
    head: torch.nn.Linear,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy of `head(hidden)` against `labels` (both (batch, seq, ...), labels unshifted).

    Returns (loss, number of labelled tokens, number predicted correctly). The loss is summed over labelled
    tokens and divided by `num_items_in_batch` when given (token average over an accumulated batch), else by
    the count here.
    """
    shifted = labels[:, 1:]
    keep = shifted != IGNORE_INDEX
    selected = hidden[:, :-1][keep]
    targets = shifted[keep]
    count = targets.numel()
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    for start in range(0, count, chunk_size):
        piece = slice(start, start + chunk_size)
        loss, right = checkpoint(
            _chunk_loss, selected[piece], head.weight, head.bias, targets[piece], use_reentrant=False
        )
        total = total + loss
        correct += right
    denominator = num_items_in_batch if num_items_in_batch is not None else max(count, 1)
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(total.device)
    return total / denominator, torch.tensor(count), correct


def supports_chunked_loss(model: Any) -> bool:
    """True for decoder-only LMs whose logits are a plain linear map of the last hidden state."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(causal, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return False  # logits are transformed after the output layer
    head = causal.get_output_embeddings() if hasattr(causal, "get_output_embeddings") else None
    body = getattr(causal, "base_model", None)
    return isinstance(head, torch.nn.Linear) and body is not None and body is not causal


def body_and_head(model: Any) -> tuple[torch.nn.Module, torch.nn.Linear]:
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal.base_model, causal.get_output_embeddings()
