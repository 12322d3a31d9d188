"""Batched sampling with a KV cache: the replies, as the exact token ids the model drew.

Jobs (prompt, sample index) are ordered by prompt length so a batch pads little; each prompt in a batch is
prefilled once and its cache shared by its samples; a sequence leaves the batch at its stop token. Every sample
draws its random numbers from its own seed, so which batch it lands in does not change what it may draw, and a
fixed batch plan makes a resumed run sample exactly what an uninterrupted one does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..compat import cache_argument


@dataclass(frozen=True)
class Job:
    prompt_index: int
    sample_index: int
    seed: int


@dataclass
class Sample:
    prompt_index: int
    sample_index: int
    token_ids: list[int]  # what the model drew, ending with the stop token when `stopped`
    stopped: bool


def sample_seed(*parts: Any) -> int:
    """A 63-bit seed from the run seed, round, prompt id and sample index (stable across processes)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def plan_batches(prompt_lengths: Sequence[int], jobs: Iterable[Job], batch_size: int) -> list[list[Job]]:
    """Jobs grouped into batches of similar prompt length (longest first), a prompt's samples side by side."""
    ordered = sorted(jobs, key=lambda j: (-prompt_lengths[j.prompt_index], j.prompt_index, j.sample_index))
    return [ordered[s : s + batch_size] for s in range(0, len(ordered), batch_size)]


def choose_tokens(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float, top_k: int
) -> torch.Tensor:
    """One token per row by inverse-CDF sampling with the row's own uniform number (greedy at temperature 0)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        before = probs.cumsum(-1) - probs
        probs = probs.masked_fill(before >= top_p, 0.0)
    else:
        order = None
    cdf = probs.double().cumsum(-1)
    pick = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1)).clamp_(max=probs.shape[-1] - 1)
    # Never pick a token of probability 0 (the uniform landing exactly on a flat stretch of the CDF).
    pick = torch.where(probs.gather(-1, pick) > 0, pick, probs.argmax(-1, keepdim=True))
    return (order.gather(-1, pick) if order is not None else pick).squeeze(-1)


@torch.inference_mode()
def sample_batch(
    model: Any,
    prompts: Sequence[list[int]],
    jobs: Sequence[Job],
    stop_ids: Sequence[int],
    pad_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
) -> list[Sample]:
    """Sample one reply per job (`prompts[job.prompt_index]`), all in one KV-cached batch."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    unique = list(dict.fromkeys(j.prompt_index for j in jobs))
    width = max(len(prompts[p]) for p in unique)
    ids = torch.full((len(unique), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(unique), width), dtype=torch.long)
    for row, p in enumerate(unique):  # left padding: every prompt ends at the same column
        ids[row, width - len(prompts[p]) :] = torch.tensor(prompts[p])
        mask[row, width - len(prompts[p]) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache_name, last_only = cache_argument(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                **{cache_name: DynamicCache()}, **last_only)  # fmt: skip
    # Each job's row is its prompt's row: the prompt's cache is shared by its samples.
    rows = torch.tensor([unique.index(j.prompt_index) for j in jobs], device=device)
    cache = getattr(out, cache_name)
    cache.batch_select_indices(rows)
    logits = out.logits[:, -1, :][rows]
    mask, next_position = mask[rows], positions[rows, -1] + 1
    uniforms = torch.stack(
        [torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(j.seed), dtype=torch.float64) for j in jobs]
    ).to(device)
    stop = torch.tensor(list(stop_ids), device=device)
    drawn: list[list[int]] = [[] for _ in jobs]
    stopped = [False] * len(jobs)
    active = torch.arange(len(jobs), device=device)  # job index of each row still generating
    for step in range(max_new_tokens):
        tokens = choose_tokens(logits, uniforms[active, step], temperature, top_p, top_k)
        for job, token in zip(active.tolist(), tokens.tolist(), strict=True):
            drawn[job].append(token)
        done = torch.isin(tokens, stop)
        for job in active[done].tolist():
            stopped[job] = True
        if step == max_new_tokens - 1:
            break
        keep = (~done).nonzero().squeeze(-1)
        if keep.numel() == 0:
            break
        if keep.numel() < active.numel():  # finished sequences leave the batch and the cache
            cache.batch_select_indices(keep)
            active, tokens, mask, next_position = active[keep], tokens[keep], mask[keep], next_position[keep]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        out = model(
            input_ids=tokens.unsqueeze(-1),
            attention_mask=mask,
            position_ids=next_position.unsqueeze(-1),
            use_cache=True,
            **{cache_name: cache},
        )
        cache, logits, next_position = getattr(out, cache_name), out.logits[:, -1, :], next_position + 1
    return [Sample(j.prompt_index, j.sample_index, drawn[i], stopped[i]) for i, j in enumerate(jobs)]


def sample_all(
    model: Any,
    prompts: Sequence[list[int]],
    batches: Sequence[Sequence[Job]],
    stop_ids: Sequence[int],
    pad_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    on_batch: Callable[[list[Sample]], None] | None = None,
    skip: Callable[[Sequence[Job]], bool] | None = None,
    progress: bool = True,
    desc: str = "Generating",
) -> list[Sample]:
    """Every batch of the plan in order (those `skip` says are done are passed over); `on_batch` gets each
    batch's samples as soon as they exist, to be saved before the next batch starts."""
    was_training = model.training
    model.eval()
    results: list[Sample] = []
    total = sum(len(b) for b in batches)
    bar = tqdm(total=total, desc=desc, unit="sample", disable=not progress, leave=False)
    try:
        for batch in batches:
            if skip is not None and skip(batch):
                bar.update(len(batch))
                continue
            samples = sample_batch(model, prompts, batch, stop_ids, pad_id, max_new_tokens, temperature, top_p, top_k)
            if on_batch is not None:
                on_batch(samples)
            results += samples
            bar.update(len(batch))
            bar.set_postfix(tokens=sum(len(s.token_ids) for s in results))
    finally:
        bar.close()
        model.train(was_training)
    return results
