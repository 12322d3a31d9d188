"""Generate -> filter -> train (expert iteration, rejection-sampling fine-tuning) on an IterativeSFTTrainer.

Each round samples several replies per prompt from the current model, keeps those `accept` approves, and
trains on them with `trainer.step()`. Models improve when accepted replies are better than their average
reply, which `accept` guarantees for tasks with a checkable answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .data.collators import IGNORE_INDEX
from .evaluate import generate_replies

Prompt = list[dict] | str


@dataclass
class RoundResult:
    round: int
    generated: int
    accepted: int
    train_loss: float | None
    metric: float | None

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.generated, 1)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "acceptance_rate": round(self.acceptance_rate, 4)}


def render_prompt(tokenizer: Any, prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def training_example(tokenizer: Any, prompt: Prompt, reply: str) -> tuple[list[int], list[int]]:
    """Token ids of prompt + reply + EOS, and labels that train on the reply and EOS only."""
    prompt_ids = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=isinstance(prompt, str))["input_ids"]
    reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        reply_ids = [*reply_ids, tokenizer.eos_token_id]
    return prompt_ids + reply_ids, [IGNORE_INDEX] * len(prompt_ids) + reply_ids


def generate_filter_train(
    trainer: Any,
    prompts: Sequence[Prompt],
    accept: Callable[[int, str], bool],
    rounds: int = 3,
    samples_per_prompt: int = 4,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_accepted_per_prompt: int = 1,
    evaluate: Callable[[Any], float] | None = None,
    generation_batch_size: int = 64,
    on_round: Callable[[RoundResult], None] | None = None,
) -> list[RoundResult]:
    """Run `rounds` rounds of generate -> filter -> train and return what each round did.

    `accept(prompt_index, reply)` decides whether a sampled reply is worth training on. At most
    `max_accepted_per_prompt` distinct replies per prompt are kept, so easy prompts do not crowd out hard ones.
    `evaluate(model)`, if given, is measured before the first round (round 0) and after each round.
    """
    tokenizer = trainer.tokenizer
    model = trainer.model
    results = [RoundResult(0, 0, 0, None, evaluate(model) if evaluate else None)]
    if on_round:
        on_round(results[0])
    for round_index in range(1, rounds + 1):
        indices = [i for i in range(len(prompts)) for _ in range(samples_per_prompt)]
        replies = generate_replies(
            model,
            tokenizer,
            [prompts[i] for i in indices],
            max_new_tokens=max_new_tokens,
            batch_size=generation_batch_size,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
        )
        kept: dict[int, list[str]] = {}
        for index, reply in zip(indices, replies, strict=True):
            reply = reply.strip()
            chosen = kept.setdefault(index, [])
            if len(chosen) < max_accepted_per_prompt and reply not in chosen and accept(index, reply):
                chosen.append(reply)
        pairs = [(prompts[i], reply) for i, chosen in kept.items() for reply in chosen]
        loss = None
        if pairs:
            ids, labels = zip(*(training_example(tokenizer, prompt, reply) for prompt, reply in pairs), strict=True)
            loss = trainer.step(input_ids=list(ids), labels=list(labels))["loss"]
        result = RoundResult(round_index, len(replies), len(pairs), loss, evaluate(model) if evaluate else None)
        results.append(result)
        if on_round:
            on_round(result)
    return results
