"""Generate -> filter -> train (expert iteration, rejection-sampling fine-tuning) on an IterativeSFTTrainer, in
memory: the Python-callback form of `sftune iterate` (sftune/iterate/), built on its parts.

Each round samples several replies per prompt from the current model (sftune.iterate.sampling: batched, KV-cached,
each sequence stopped at its stop token), keeps those `accept` approves, and trains on them with
`trainer.step()`: each kept reply as the exact ids the model drew after the exact inference prompt
(sftune.data.render), ending with the stop token that ended it. Replies cut at `max_new_tokens` are never offered
to `accept` (training on them would teach the model not to stop); they are counted as `unfinished`. For recipes
from a file, samples saved as they are drawn, checkpoints and `--resume`, use `sftune iterate`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .constants import IGNORE_INDEX
from .data import render
from .iterate.prompts import Prompt as IteratePrompt
from .iterate.prompts import prompt_ids, reply_ids
from .iterate.sampling import Job, plan_batches, sample_all, sample_seed

Prompt = list[dict] | str


@dataclass
class RoundResult:
    round: int
    generated: int
    accepted: int
    train_loss: float | None
    metric: float | None
    unfinished: int = 0  # replies cut at max_new_tokens (never accepted)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.generated, 1)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "acceptance_rate": round(self.acceptance_rate, 4)}


def as_prompt(index: int, prompt: Prompt) -> IteratePrompt:
    if isinstance(prompt, str):
        return IteratePrompt(str(index), None, prompt, None)
    return IteratePrompt(str(index), [dict(m) for m in prompt], None, None)


def training_example(
    tokenizer: Any, prompt: Prompt, reply: str, generation_config: Any = None
) -> tuple[list[int], list[int]]:
    """Token ids of a reply written as text (a gold answer) after `prompt`, and labels that train the reply only:
    the exact inference prompt, then the reply as the template renders it through its stop token
    (sftune.iterate.prompts.reply_ids, the same rule as SFTTrainer's; `generation_config`: the model's, whose EOS
    tokens end replies where it names them)."""
    as_iterate = as_prompt(0, prompt)
    ids = prompt_ids(tokenizer, as_iterate)
    completion = reply_ids(tokenizer, as_iterate, reply, render.stop_tokens(tokenizer, generation_config))
    return ids + completion, [IGNORE_INDEX] * len(ids) + completion


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
    tokenizer, model = trainer.tokenizer, trainer.model
    stop_ids = render.stop_token_ids(tokenizer, getattr(model, "generation_config", None))
    if not stop_ids:
        raise ValueError("No token ends a reply: the tokenizer has no EOS and its chat template no end-of-turn.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    ids = [prompt_ids(tokenizer, as_prompt(i, p)) for i, p in enumerate(prompts)]
    seed = getattr(getattr(trainer, "args", None), "seed", 0)
    results = [RoundResult(0, 0, 0, None, evaluate(model) if evaluate else None)]
    if on_round:
        on_round(results[0])
    for round_index in range(1, rounds + 1):
        jobs = [
            Job(i, s, sample_seed(seed, "generate_filter_train", round_index, i, s))
            for i in range(len(prompts))
            for s in range(samples_per_prompt)
        ]
        batches = plan_batches([len(x) for x in ids], jobs, generation_batch_size)
        samples = sample_all(model, ids, batches, stop_ids, pad_id, max_new_tokens, temperature, top_p,
                             progress=False)  # fmt: skip
        kept: dict[int, list[list[int]]] = {}
        texts: dict[int, set[str]] = {}
        unfinished = 0
        for sample in sorted(samples, key=lambda s: (s.prompt_index, s.sample_index)):
            if not sample.stopped:
                unfinished += 1
                continue
            reply = tokenizer.decode(sample.token_ids[:-1], skip_special_tokens=True).strip()
            chosen, seen = kept.setdefault(sample.prompt_index, []), texts.setdefault(sample.prompt_index, set())
            if len(chosen) < max_accepted_per_prompt and reply not in seen and accept(sample.prompt_index, reply):
                chosen.append(sample.token_ids)
                seen.add(reply)
        pairs = [(ids[i], drawn) for i, chosen in kept.items() for drawn in chosen]
        loss = None
        if pairs:
            loss = trainer.step(
                input_ids=[prompt + reply for prompt, reply in pairs],
                labels=[[IGNORE_INDEX] * len(prompt) + reply for prompt, reply in pairs],
            )["loss"]
        result = RoundResult(round_index, len(samples), len(pairs), loss, evaluate(model) if evaluate else None,
                             unfinished)  # fmt: skip
        results.append(result)
        if on_round:
            on_round(result)
    return results
