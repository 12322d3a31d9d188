"""What an expert-iteration run does: the recipe, read from YAML or built in Python, checked before any work."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RecipeError

LR_SCHEDULES = ("constant", "linear", "cosine")
TRAIN_ON = ("samples", "reference")


@dataclass
class IterateConfig:
    """Generate k replies per prompt, keep the ones the verifier accepts, train on them; repeat for `rounds`."""

    model: str
    dataset: str
    output_dir: str
    eval_dataset: str | None = None
    # Columns: `messages` (a trailing assistant turn is dropped) or `prompt` (text or messages); `id` if present.
    prompt_column: str | None = None
    reference_column: str = "answer"
    # Verifier: exact | regex | number | json | "module:function"; its options in verifier_args.
    verifier: str = "exact"
    verifier_args: dict[str, Any] = field(default_factory=dict)
    rounds: int = 3
    prompts_per_round: int | None = None  # None: every prompt each round; else a rotating window of the dataset
    samples_per_prompt: int = 4
    keep_per_prompt: int = 1  # distinct accepted replies kept per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    generation_batch_size: int = 64
    # Training, per round: epochs over that round's accepted data.
    epochs: int = 1
    batch_size: int = 8
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"  # across rounds: constant | linear | cosine (decays from round 1 to `rounds`)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    save_every_steps: int = 10  # mid-round training checkpoints, for --resume
    # LoRA (peft LoraConfig fields), or None to train every weight.
    lora: dict[str, Any] | None = None
    # Warm start: train on this many reference answers (from the end of `dataset`) before round 1. Both arms of a
    # comparison get the same warm start.
    warm_start: int = 0
    warm_start_epochs: int = 1
    # "samples": expert iteration. "reference": the plain-SFT baseline, trained on the reference answers of the same
    # prompts; with `match_tokens_from` (another run's output_dir) each round trains on as many tokens as it did.
    train_on: str = "samples"
    match_tokens_from: str | None = None
    eval_size: int | None = None
    eval_max_new_tokens: int | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise RecipeError(f"{name}: {message} (got {getattr(self, name)!r}).")

        for name in ("rounds", "samples_per_prompt", "keep_per_prompt", "max_new_tokens", "generation_batch_size",
                     "epochs", "batch_size", "save_every_steps", "warm_start_epochs"):  # fmt: skip
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "must be an integer >= 1")
        need(self.warm_start >= 0, "warm_start", "must be >= 0")
        need(self.prompts_per_round is None or self.prompts_per_round >= 1, "prompts_per_round", "must be >= 1")
        need(self.temperature >= 0, "temperature", "must be >= 0 (0 is greedy)")
        need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(self.learning_rate > 0, "learning_rate", "must be > 0")
        need(self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"must be one of {LR_SCHEDULES}")
        need(self.train_on in TRAIN_ON, "train_on", f"must be one of {TRAIN_ON}")
        need(self.keep_per_prompt <= self.samples_per_prompt, "keep_per_prompt", "cannot exceed samples_per_prompt")
        need(isinstance(self.verifier_args, dict), "verifier_args", "must be a mapping")

    def learning_rate_for(self, round_index: int) -> float:
        """The learning rate of round `round_index` (1-based) under `lr_schedule`."""
        if self.lr_schedule == "constant" or self.rounds == 1:
            return self.learning_rate
        import math

        progress = (round_index - 1) / (self.rounds - 1)
        floor = self.learning_rate * self.min_lr_ratio
        if self.lr_schedule == "linear":
            return self.learning_rate - (self.learning_rate - floor) * progress
        return floor + (self.learning_rate - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "recipe") -> IterateConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            import difflib

            hints = [difflib.get_close_matches(k, known, 1) for k in unknown]
            said = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in zip(unknown, hints))
            raise RecipeError(f"{where}: unknown field(s) {said}. Fields: {', '.join(sorted(known))}.")
        missing = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING and f.name not in values]  # fmt: skip
        if missing:
            raise RecipeError(f"{where}: missing required field(s) {', '.join(missing)}.")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> IterateConfig:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"Recipe {path} not found.")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise RecipeError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(values, dict):
            raise RecipeError(f"{path}: expected `key: value` lines.")
        # Relative paths in a recipe are relative to the directory the command runs in, like every other tool.
        return cls.from_dict({**values, **(overrides or {})}, where=str(path))
