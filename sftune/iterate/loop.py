"""The generate -> verify -> train loop, resumable at any point.

Layout of `output_dir`:
    recipe.json                 the recipe the run was started with (a resumed run must match it)
    state.json                  where the run is: {"round": r, "phase": "warm" | "generate" | "train" | "eval"}
    round-R/samples.jsonl       every sampled reply as it is drawn: prompt id, reply, token ids, verdict
    round-R/eval.jsonl          held-out replies and verdicts
    round-R/model/              the model (or adapter) at the end of round R, loadable with from_pretrained
    training_state.pt           trainable weights + optimizer + position, saved during and after each round
    rounds.jsonl                one summary per round (round 0: before the first round)
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..constants import IGNORE_INDEX
from ..data import render
from . import store
from .prompts import Prompt, load_prompts, prompt_ids, reply_ids
from .recipe import IterateConfig, RecipeError
from .sampling import Job, Sample, plan_batches, sample_all, sample_seed
from .verifiers import check, make_verifier

logger = logging.getLogger("sftune.iterate")


@dataclass
class Example:
    """A training example: the inference prompt's ids, then the completion's ids (trained on)."""

    prompt_ids: list[int]
    completion_ids: list[int]

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    @property
    def completion_mask(self) -> list[int]:
        return [0] * len(self.prompt_ids) + [1] * len(self.completion_ids)

    @property
    def labels(self) -> list[int]:
        return [IGNORE_INDEX] * len(self.prompt_ids) + self.completion_ids


class Run:
    """One expert-iteration run in `config.output_dir`. `run()` does what is left of it."""

    def __init__(self, config: IterateConfig, resume: bool = False, model: Any = None, tokenizer: Any = None) -> None:
        self.config = config
        self.out = Path(config.output_dir)
        self.verify = _resolve_verifier(config)  # before loading anything: a wrong name costs a second
        self._check_output_dir(resume)
        self.train_prompts = load_prompts(config.dataset, config.prompt_column, config.reference_column)
        eval_name = config.eval_dataset
        self.eval_prompts = load_prompts(eval_name, config.prompt_column, config.reference_column) if eval_name else []
        if config.eval_size:
            self.eval_prompts = self.eval_prompts[: config.eval_size]
        self._check_references()
        self.match_tokens = _read_token_targets(config) if config.train_on == "reference" else None
        self.model, self.tokenizer = model, tokenizer
        if self.model is None or self.tokenizer is None:
            self.model, self.tokenizer = _load(config, self.model, self.tokenizer)
        # What ends a reply, for sampling and for the gold replies alike: the model's generation config where it
        # names its EOS tokens, else the template's end-of-turn and the tokenizer's EOS (sftune.data.render).
        self.stops = render.stop_tokens(self.tokenizer, getattr(self.model, "generation_config", None))
        self.stop_ids = [self.tokenizer.convert_tokens_to_ids(token) for token in self.stops]
        if not self.stop_ids:
            raise RecipeError(
                f"{config.model}: no token ends a reply (no EOS in the tokenizer or generation config, and the chat "
                "template renders no end-of-turn). Set the tokenizer's eos_token."
            )
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.trainer = _make_trainer(config, self.model, self.tokenizer)
        self._prompt_ids: dict[int, list[int]] = {}
        warm = config.warm_start
        self.pool = self.train_prompts[: len(self.train_prompts) - warm] if warm else self.train_prompts
        self.warm_prompts = self.train_prompts[len(self.train_prompts) - warm :] if warm else []
        if not self.pool:
            raise RecipeError(f"warm_start={warm} uses every prompt of {config.dataset}; none is left to iterate on.")

    # ----------------------------------------------------------------------------------------------------------
    # Setup checks
    # ----------------------------------------------------------------------------------------------------------

    def _check_output_dir(self, resume: bool) -> None:
        saved = store.read_json(self.out / "recipe.json")
        if saved is None:
            self.out.mkdir(parents=True, exist_ok=True)
            store.write_json_atomic(self.out / "recipe.json", self.config.to_dict())
            store.write_json_atomic(self.out / "state.json", self._first_state())
            return
        if not resume:
            raise RecipeError(
                f"{self.out} already holds a run. Pass --resume (resume=True) to continue it, or choose a new output_dir."
            )
        mine = {k: v for k, v in self.config.to_dict().items() if k != "progress"}
        theirs = {k: v for k, v in saved.items() if k != "progress"}
        changed = sorted(k for k in mine if mine[k] != theirs.get(k))
        if changed:
            raise RecipeError(
                f"--resume: the recipe differs from the one {self.out} was started with in {', '.join(changed)}; "
                "a resumed run must use the same recipe (start a new output_dir to change it)."
            )

    def _first_state(self) -> dict[str, Any]:
        return {"round": 0, "phase": "warm" if self.config.warm_start else "eval"}

    def _check_references(self) -> None:
        for where, prompts in (("dataset", self.train_prompts), ("eval_dataset", self.eval_prompts)):
            for p in prompts:
                if p.reference is None and self.config.verifier in ("exact", "exact_match", "number"):
                    raise RecipeError(
                        f"{where} prompt {p.id!r}: no {self.config.reference_column!r} value, which verifier "
                        f"{self.config.verifier!r} compares replies to. Add it or set reference_column."
                    )

    # ----------------------------------------------------------------------------------------------------------
    # The loop
    # ----------------------------------------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        config = self.config
        state = store.read_json(self.out / "state.json")
        position = self._restore()
        if state["phase"] == "warm":
            self._train(0, self._reference_examples(self.warm_prompts), config.warm_start_epochs, position)
            self._set_state(0, "eval")
            state = {"round": 0, "phase": "eval"}
        if state["round"] == 0:
            self._finish_round(0, {"time_s": 0.0})
            state = {"round": 1, "phase": "generate"}
        for round_index in range(state["round"], config.rounds + 1):
            started = time.perf_counter()
            phase = state["phase"] if round_index == state["round"] else "generate"
            summary: dict[str, Any] = {}
            prompts = self.round_prompts(round_index)
            if config.train_on == "samples":
                if phase == "generate":
                    self._generate(round_index, prompts)
                    self._set_state(round_index, "train")
                examples, summary = self._accepted_examples(round_index, prompts)
            else:
                examples, summary = self._matched_reference_examples(round_index, prompts)
            trained = self.out / f"round-{round_index}" / "train.json"
            if phase in ("generate", "train"):
                if examples:
                    summary.update(self._train(round_index, examples, config.epochs, position))
                else:
                    why = "no reply was accepted" if config.train_on == "samples" else "no tokens to train on"
                    logger.warning("round %d: %s; skipping training this round.", round_index, why)
                    summary["skipped_training"] = True
                self._save_round_model(round_index)
                trained.parent.mkdir(parents=True, exist_ok=True)
                store.write_json_atomic(trained, summary)
                self._set_state(round_index, "eval")
            summary = {**summary, **store.read_json(trained, {})}
            summary["time_s"] = round(time.perf_counter() - started, 1)
            self._finish_round(round_index, summary)
        self._set_state(config.rounds + 1, "done")
        return store.read_jsonl(self.out / "rounds.jsonl")

    def round_prompts(self, round_index: int) -> list[Prompt]:
        """Round r's prompts: all of them, or the r-th window of `prompts_per_round` (wrapping around)."""
        n = self.config.prompts_per_round
        if n is None or n >= len(self.pool):
            return self.pool
        start = ((round_index - 1) * n) % len(self.pool)
        return [self.pool[(start + i) % len(self.pool)] for i in range(n)]

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        key = id(prompt)
        if key not in self._prompt_ids:
            self._prompt_ids[key] = prompt_ids(self.tokenizer, prompt)
        return self._prompt_ids[key]

    # ----------------------------------------------------------------------------------------------------------
    # Generation
    # ----------------------------------------------------------------------------------------------------------

    def _generate(self, round_index: int, prompts: list[Prompt]) -> None:
        config = self.config
        path = self.out / f"round-{round_index}" / "samples.jsonl"
        done = {(row["prompt_id"], row["sample_index"]) for row in store.read_jsonl(path)}
        if done:
            logger.info("round %d: resuming generation, %d samples already on disk.", round_index, len(done))
        ids = [self.prompt_ids(p) for p in prompts]
        jobs = [
            Job(i, s, sample_seed(config.seed, round_index, p.id, s))
            for i, p in enumerate(prompts)
            for s in range(config.samples_per_prompt)
        ]
        batches = plan_batches([len(x) for x in ids], jobs, config.generation_batch_size)

        def is_done(batch: Sequence[Job]) -> bool:
            return all((prompts[j.prompt_index].id, j.sample_index) in done for j in batch)

        def save(samples: list[Sample]) -> None:
            rows = [self._sample_row(prompts[s.prompt_index], s) for s in samples]
            store.append_jsonl(path, [r for r in rows if (r["prompt_id"], r["sample_index"]) not in done])

        sample_all(self.model, ids, batches, self.stop_ids, self.pad_id, config.max_new_tokens, config.temperature,
                   config.top_p, config.top_k, on_batch=save, skip=is_done, progress=config.progress,
                   desc=f"round {round_index}: sampling")  # fmt: skip

    def _sample_row(self, prompt: Prompt, sample: Sample) -> dict[str, Any]:
        reply = self.reply_text(sample)
        if not sample.stopped:
            verdict = "unfinished"  # cut at max_new_tokens: training on it would teach the model never to stop
        else:
            verdict = "accepted" if check(self.verify, reply, prompt.reference, prompt.id) else "rejected"
        return {"prompt_id": prompt.id, "sample_index": sample.sample_index, "reply": reply,
                "token_ids": sample.token_ids, "stopped": sample.stopped, "verdict": verdict}  # fmt: skip

    def reply_text(self, sample: Sample) -> str:
        ids = sample.token_ids[:-1] if sample.stopped else sample.token_ids
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _accepted_examples(self, round_index: int, prompts: list[Prompt]) -> tuple[list[Example], dict[str, Any]]:
        """The kept replies of round r: per prompt, the first `keep_per_prompt` distinct accepted ones (by sample
        index), each as the exact ids the model drew after the exact prompt it was given."""
        rows = store.read_jsonl(self.out / f"round-{round_index}" / "samples.jsonl")
        by_prompt: dict[str, list[dict]] = {}
        for row in sorted(rows, key=lambda r: r["sample_index"]):
            by_prompt.setdefault(row["prompt_id"], []).append(row)
        examples, solved = [], 0
        for prompt in prompts:
            kept: list[tuple[int, ...]] = []
            for row in by_prompt.get(prompt.id, []):
                ids = tuple(row["token_ids"])
                if row["verdict"] == "accepted" and ids not in kept and len(kept) < self.config.keep_per_prompt:
                    kept.append(ids)
            solved += bool(kept)
            examples += [Example(self.prompt_ids(prompt), list(ids)) for ids in kept]
        accepted = sum(r["verdict"] == "accepted" for r in rows)
        summary = {
            "generated": len(rows),
            "generated_tokens": sum(len(r["token_ids"]) for r in rows),
            "accepted": accepted,
            "acceptance_rate": round(accepted / max(len(rows), 1), 4),
            "unfinished": sum(r["verdict"] == "unfinished" for r in rows),
            f"pass@{self.config.samples_per_prompt}": round(solved / max(len(prompts), 1), 4),
            "kept": len(examples),
        }
        return examples, summary

    # ----------------------------------------------------------------------------------------------------------
    # Reference answers (warm start, plain-SFT baseline)
    # ----------------------------------------------------------------------------------------------------------

    def reference_example(self, prompt: Prompt) -> Example:
        """The prompt's reference answer as the model would generate it after its exact inference prompt: the reply
        the template renders for it, through the stop token (prompts.reply_ids)."""
        return Example(self.prompt_ids(prompt), reply_ids(self.tokenizer, prompt, str(prompt.reference), self.stops))

    def _reference_examples(self, prompts: list[Prompt]) -> list[Example]:
        return [self.reference_example(p) for p in prompts]

    def _matched_reference_examples(self, round_index: int, prompts: list[Prompt]) -> tuple[list[Example], dict]:
        examples = self._reference_examples(prompts)
        if self.match_tokens is None:
            return examples, {}
        target = self.match_tokens.get(round_index, 0)
        chosen: list[Example] = []
        tokens = 0
        while examples and tokens < target:  # the round's gold answers, in order (repeating if needed)
            example = examples[len(chosen) % len(examples)]
            chosen.append(example)
            tokens += len(example.completion_ids) * self.config.epochs
        return chosen, {"token_target": target}

    # ----------------------------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------------------------

    def _restore(self) -> dict[str, Any]:
        path = self.out / "training_state.pt"
        if not path.exists():
            return {"round": -1, "step": 0, "losses": []}
        saved = store.load_training_state(path, self.trainer.model, self.trainer.optimizer)
        self.trainer.state.global_step = saved["global_step"]
        logger.info("resumed weights from round %d, step %d", saved["round"], saved["step"])
        return {"round": saved["round"], "step": saved["step"], "losses": saved.get("losses", [])}

    def _train(self, round_index: int, examples: list[Example], epochs: int, position: dict) -> dict[str, Any]:
        """`epochs` passes over `examples` in batches of `batch_size`, one optimizer step each, in an order fixed
        by the seed and round; a checkpoint every `save_every_steps` steps and at the end."""
        config, trainer = self.config, self.trainer
        order: list[int] = []
        for epoch in range(epochs):
            shuffled = list(range(len(examples)))
            random.Random(sample_seed(config.seed, "order", round_index, epoch)).shuffle(shuffled)
            order += shuffled
        size = config.batch_size
        batches = [order[s : s + size] for s in range(0, len(order), size)]
        resumed = position["round"] == round_index
        first = position["step"] if resumed else 0
        learning_rate = config.learning_rate_for(max(round_index, 1))
        losses = list(position["losses"]) if resumed else []
        for step in range(first, len(batches)):
            batch = [examples[i] for i in batches[step]]
            for group in trainer.optimizer.param_groups:
                group["lr"] = learning_rate
            torch.manual_seed(sample_seed(config.seed, "dropout", round_index, step) % (1 << 62))
            result = trainer.step(input_ids=[e.input_ids for e in batch], labels=[e.labels for e in batch])
            losses.append(result["loss"])
            done = step + 1
            if done % config.save_every_steps == 0 or done == len(batches):
                self._save_training_state(round_index, done, losses)
        if first >= len(batches):  # resumed after the last step: the checkpoint is already there
            self._save_training_state(round_index, len(batches), losses)
        position.update(round=round_index, step=len(batches), losses=losses)
        return {
            "train_examples": len(examples),
            "trained_tokens": sum(len(examples[i].completion_ids) for i in order),
            "optimizer_steps": len(batches),
            "train_loss": round(sum(losses) / len(losses), 4) if losses else None,
            "learning_rate": learning_rate,
        }

    def _save_training_state(self, round_index: int, step: int, losses: list[float]) -> None:
        extra = {"round": round_index, "step": step, "global_step": self.trainer.state.global_step, "losses": losses}
        store.save_training_state(self.out / "training_state.pt", self.trainer.model, self.trainer.optimizer, extra)

    def _save_round_model(self, round_index: int) -> None:
        target = self.out / f"round-{round_index}" / "model"
        self.model.save_pretrained(target)
        self.tokenizer.save_pretrained(target)

    # ----------------------------------------------------------------------------------------------------------
    # Evaluation and reporting
    # ----------------------------------------------------------------------------------------------------------

    def evaluate(self, round_index: int) -> float | None:
        """Greedy replies to the held-out prompts, checked by the same verifier; the fraction accepted."""
        if not self.eval_prompts:
            return None
        config = self.config
        ids = [self.prompt_ids(p) for p in self.eval_prompts]
        jobs = [Job(i, 0, 0) for i in range(len(ids))]
        batches = plan_batches([len(x) for x in ids], jobs, config.generation_batch_size)
        samples = sample_all(self.model, ids, batches, self.stop_ids, self.pad_id,
                             config.eval_max_new_tokens or config.max_new_tokens, temperature=0.0,
                             progress=config.progress, desc=f"round {round_index}: held-out eval")  # fmt: skip
        path = self.out / f"round-{round_index}" / "eval.jsonl"
        path.unlink(missing_ok=True)
        rows = [self._sample_row(self.eval_prompts[s.prompt_index], s) for s in samples]
        store.append_jsonl(path, rows)
        return round(sum(r["verdict"] == "accepted" for r in rows) / len(rows), 4)

    def _finish_round(self, round_index: int, summary: dict[str, Any]) -> None:
        path = self.out / "rounds.jsonl"
        if any(r["round"] == round_index for r in store.read_jsonl(path)):
            return  # written before the interruption
        summary = {"round": round_index, **summary, "held_out": self.evaluate(round_index)}
        store.append_jsonl(path, [summary])
        logger.info(summary_line(summary, self.config.samples_per_prompt))
        print(summary_line(summary, self.config.samples_per_prompt), flush=True)
        self._set_state(round_index + 1, "generate")

    def _set_state(self, round_index: int, phase: str) -> None:
        store.write_json_atomic(self.out / "state.json", {"round": round_index, "phase": phase})


def summary_line(s: dict[str, Any], k: int) -> str:
    """round 2: generated 256 (5120 tok), accepted 97 (37.9%), pass@4 61.0%, trained 64 ex / 900 tok, held-out 42.0%, 88s"""
    parts = [f"round {s['round']}:"]
    if "generated" in s:
        parts.append(f"generated {s['generated']} ({s['generated_tokens']} tok), accepted {s['accepted']} "
                     f"({s['acceptance_rate']:.1%}), pass@{k} {s[f'pass@{k}']:.1%},")  # fmt: skip
    if s.get("skipped_training"):
        parts.append("no accepted reply: training skipped," if "generated" in s else "nothing to train: skipped,")
    elif "trained_tokens" in s:
        parts.append(f"trained {s['train_examples']} ex / {s['trained_tokens']} tok (loss {s['train_loss']}),")
    held = s.get("held_out")
    parts.append(f"held-out {held:.1%}," if held is not None else "held-out -,")
    parts.append(f"{s.get('time_s', 0):.0f}s")
    return " ".join(parts)


def _resolve_verifier(config: IterateConfig) -> Any:
    try:
        return make_verifier(config.verifier, config.verifier_args)
    except ValueError as err:
        raise RecipeError(str(err)) from err


def _read_token_targets(config: IterateConfig) -> dict[int, int] | None:
    if config.match_tokens_from is None:
        return None
    path = Path(config.match_tokens_from) / "rounds.jsonl"
    if not path.exists():
        raise RecipeError(f"match_tokens_from: {path} not found; run the expert-iteration arm first.")
    return {r["round"]: r.get("trained_tokens", 0) for r in store.read_jsonl(path) if r["round"] >= 1}


def _load(config: IterateConfig, model: Any, tokenizer: Any) -> tuple[Any, Any]:
    from ..models import load_model, load_tokenizer

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
    model = model if model is not None else load_model(config.model)
    if config.lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(config.seed)  # the adapter's random init: the same in every run of this recipe
        model = get_peft_model(model, LoraConfig(**{"task_type": "CAUSAL_LM", **config.lora}))
    return model, tokenizer


def _make_trainer(config: IterateConfig, model: Any, tokenizer: Any) -> Any:
    from ..config import IterativeSFTConfig
    from ..trainers.iterative import IterativeSFTTrainer

    args = IterativeSFTConfig(
        output_dir=str(Path(config.output_dir) / "trainer"),
        learning_rate=config.learning_rate,
        per_device_train_batch_size=config.batch_size,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to="none",
        logging_steps=10**9,
        seed=config.seed,
    )
    return IterativeSFTTrainer(model, args=args, processing_class=tokenizer)


def iterate(config: IterateConfig | dict | str | Path, resume: bool = False, **kwargs: Any) -> list[dict[str, Any]]:
    """Run (or resume) expert iteration; returns the per-round summaries. `config`: an IterateConfig, a dict of
    its fields, or a YAML recipe path. `model=`/`tokenizer=` use objects already loaded."""
    if isinstance(config, (str, Path)):
        config = IterateConfig.from_yaml(config)
    elif isinstance(config, dict):
        config = IterateConfig.from_dict(config)
    return Run(config, resume=resume, **kwargs).run()
