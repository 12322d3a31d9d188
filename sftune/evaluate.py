"""Greedy generation and exact-match accuracy on held-out conversations."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .data import render


@torch.inference_mode()
def generate_replies(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[list[dict] | str],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    progress: bool = True,
    **generate_kwargs: Any,
) -> list[str]:
    """The model's greedy reply to each conversation (batched, left-padded; the prompt is not returned)."""
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    generate_kwargs.setdefault("do_sample", False)
    replies: list[str] = []
    # Longest prompts first so each batch pads little; answers are put back in input order.
    order = sorted(range(len(conversations)), key=lambda i: -len(str(conversations[i])))
    try:
        batches = range(0, len(order), batch_size)
        for start in tqdm(batches, desc="Generating", disable=not progress, leave=False):
            chunk = [conversations[i] for i in order[start : start + batch_size]]
            # Chat prompts carry their own special tokens; plain-text prompts get the tokenizer's.
            plain_text = all(isinstance(c, str) for c in chunk)
            prompts = [c if isinstance(c, str) else render.inference_prompt(tokenizer, c) for c in chunk]
            inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=plain_text)
            if "token_type_ids" not in inspect.signature(model.forward).parameters:
                inputs.pop("token_type_ids", None)  # some tokenizers add them; transformers 4.x generate refuses them
            inputs = inputs.to(model.device)
            outputs = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                **generate_kwargs,
            )
            new_tokens = outputs[:, inputs["input_ids"].shape[1] :]
            replies += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    by_input_order = [""] * len(order)
    for reply, index in zip(replies, order, strict=True):
        by_input_order[index] = reply
    return by_input_order


def exact_match(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[dict],
    prompt_of: Callable[[dict], list[dict]],
    is_correct: Callable[[str, str], bool],
    max_new_tokens: int = 32,
    batch_size: int = 32,
) -> tuple[float, list[str]]:
    """Fraction of `examples` whose greedy reply `is_correct` against `example["answer"]`, and the replies."""
    replies = generate_replies(model, tokenizer, [prompt_of(e) for e in examples], max_new_tokens, batch_size)
    correct = sum(is_correct(reply, example["answer"]) for reply, example in zip(replies, examples, strict=True))
    return correct / max(len(examples), 1), replies
