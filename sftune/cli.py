"""The `sftune` command line.

    sftune sft --config recipe.yaml [--any_SFTConfig_or_ModelConfig_field value ...]
    sftune eval --model PATH --dataset test.jsonl
    sftune preview --model PATH --dataset train.jsonl [--config recipe.yaml] [--any_SFTConfig_field value ...]
    sftune iterate --config recipe.yaml [--resume] [--any_recipe_field value ...]

Every field of SFTConfig, ModelConfig and ScriptArguments is a flag; a YAML file gives defaults and the command
line overrides it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data.files import check_data_file, load_any_dataset, root_cause
from .data.preview import preview_rows
from .errors import (
    CheckpointSaveError,
    DatasetFormatError,
    NonFiniteTrainingError,
    NonFiniteWeightsError,
    TrainingInterrupted,
    UsageError,
)

logger = logging.getLogger("sftune")


@dataclass
class ScriptArguments:
    """What to train on, and what to do after training."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Local .jsonl/.json/.csv/.parquet file, saved dataset dir, or datasets name."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on, if it exists."})
    eval_dataset_name: str | None = field(default=None, metadata={"help": "Separate file or name to evaluate on."})
    merge_adapters: bool = field(
        default=True,
        metadata={
            "help": "With PEFT, also save a merged full model in output_dir (adapters go to output_dir/adapter)."
        },
    )
    plot_loss: bool = field(default=True, metadata={"help": "Write the loss curve to output_dir/loss.png."})


# --------------------------------------------------------------------------------------------------------------
# Argument parsing
# --------------------------------------------------------------------------------------------------------------


def parse_sft_args(argv: list[str]) -> tuple[ScriptArguments, Any, Any]:
    """(ScriptArguments, SFTConfig, ModelConfig) from an optional --config YAML and command-line overrides."""
    from transformers import HfArgumentParser

    from .config import SFTConfig
    from .models import ModelConfig

    parser = HfArgumentParser((ScriptArguments, SFTConfig, ModelConfig), prog="sftune sft", allow_abbrev=False)
    parser.error = _usage_error  # argparse would print the usage of every flag first; one line is enough
    parser.add_argument("--config", type=str, default=None, help="YAML file of defaults for any flag.")
    config_path = _pop_config_path(argv)
    if config_path:
        values = read_yaml_recipe(config_path)
        _set_recipe_env(values, config_path)
        actions = {action.dest: action for action in parser._actions}
        unknown = sorted(set(values) - set(actions))
        if unknown:
            raise UsageError(f"{config_path}: unknown keys {unknown}. Run `sftune sft --help` for the fields.")
        parser.set_defaults(**{k: _yaml_to_flag_value(actions[k], k, v, config_path) for k, v in values.items()})
        # A required flag given by the YAML file is no longer required on the command line.
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    # The --config flag itself (already consumed) comes back as an extra namespace; keep the three dataclasses.
    try:
        *parsed, extra = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    except (ValueError, TypeError) as err:  # a field's own validation (SFTConfig.__post_init__, ...)
        raise UsageError(str(err)) from err
    script_args, sft_args, model_args = parsed[:3]
    if extra:
        raise UsageError(f"Unknown arguments: {extra}. Run `sftune sft --help` for the fields.")
    return script_args, sft_args, model_args


def read_yaml_recipe(path: str) -> dict[str, Any]:
    from .scripts.utils import read_recipe

    try:
        return read_recipe(path)
    except ValueError as err:
        raise UsageError(str(err)) from err


def _set_recipe_env(values: dict[str, Any], path: str) -> None:
    """A TRL recipe's `env:` section sets environment variables, as `TrlParser` does."""
    from .scripts.utils import set_env_from_recipe

    try:
        set_env_from_recipe(values, path)
    except ValueError as err:
        raise UsageError(str(err)) from err


def _pop_config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
            del argv[i : i + 2]
            return path
        if arg.startswith("--config="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def _yaml_to_flag_value(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """A YAML value as the flag's parsed value, checked as the command line would check it."""
    if isinstance(value, dict):  # dict-valued fields (model_init_kwargs, ...) travel as JSON strings
        return json.dumps(value)
    if action.nargs in ("+", "*"):
        return [
            _convert_yaml_value(action, key, item, path) for item in (value if isinstance(value, list) else [value])
        ]
    if isinstance(value, list):
        raise UsageError(f"{path}: {key} takes a single value, got the list {value!r}.")
    return _convert_yaml_value(action, key, value, path)


def _convert_yaml_value(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    if value is None or action.type is None:
        return value
    expected = getattr(action.type, "__name__", "a value")
    try:
        if action.type is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        converted = action.type(value)
    except Exception as err:
        expected = "true or false" if expected == "string_to_bool" else f"{expected}"
        raise UsageError(f"{path}: {key} must be {expected}, got {value!r}.") from err
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(str(choice) for choice in action.choices)
        raise UsageError(f"{path}: {key} must be one of {choices}; got {value!r}.")
    return converted


def _usage_error(message: str) -> None:
    raise UsageError(f"{message}. Run `sftune sft --help` for the fields.")


def load_model_for_cli(name: str, kwargs: dict[str, Any]) -> Any:
    """`load_model` with the user's mistakes (no such folder, a file, no network) as one-line errors."""
    from .models import load_model

    path = Path(name).expanduser()
    if path.is_file():
        raise UsageError(f"--model_name_or_path {name} is a file; give the folder holding config.json and the weights.")
    if path.is_dir() and not (path / "config.json").is_file():
        raise UsageError(f"--model_name_or_path {name} has no config.json; give a folder saved by save_pretrained.")
    if not path.exists() and name.startswith((".", "/", "~")):
        raise UsageError(f"Model folder {name} not found.")
    try:
        return load_model(str(path) if path.exists() else name, kwargs)
    except (OSError, ValueError) as err:
        where = "" if path.exists() else " It is not a local folder, and downloading it by name failed."
        raise UsageError(f"Could not load the model {name!r}:{where} {root_cause(err)}") from err


# --------------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------------


def run_sft(argv: list[str]) -> dict[str, Any]:
    """Train as the arguments say; print and return a summary."""
    from .engines import start_deepspeed_communication
    from .models import get_peft_config
    from .trainers.checkpoints import resolve_resume_checkpoint
    from .trainers.sft import SFTTrainer

    script_args, sft_args, model_args = parse_sft_args(argv)
    if not model_args.model_name_or_path:
        raise UsageError("Give the model: --model_name_or_path PATH_OR_ID (or model_name_or_path in the YAML).")
    if not script_args.dataset_name:
        raise UsageError("Give the data: --dataset_name FILE_OR_NAME (or dataset_name in the YAML).")
    resume = sft_args.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "false"):
        resume = resume.lower() == "true"
    try:
        resume = resolve_resume_checkpoint(resume, sft_args.output_dir)
    except ValueError as err:
        raise UsageError(str(err)) from err
    train = load_any_dataset(script_args.dataset_name, script_args.dataset_config, script_args.dataset_train_split)
    evaluation = None
    if script_args.eval_dataset_name:
        evaluation = load_any_dataset(
            script_args.eval_dataset_name,
            script_args.dataset_config,
            script_args.dataset_test_split,
        )
    kwargs = {
        **model_args.model_init_kwargs(sft_args.gradient_checkpointing),
        **(sft_args.model_init_kwargs or {}),
    }
    start_deepspeed_communication(sft_args)  # before a ZeRO-3 model is built
    model = load_model_for_cli(model_args.model_name_or_path, kwargs)
    sft_args.model_init_kwargs = None
    try:
        trainer = SFTTrainer(
            model=model,
            args=sft_args,
            train_dataset=train,
            eval_dataset=evaluation,
            peft_config=get_peft_config(model_args),
        )
    except (DatasetFormatError, ValueError, TypeError) as err:
        raise UsageError(str(err)) from err
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    output_dir = Path(sft_args.output_dir)
    save_trained_model(trainer, output_dir, script_args.merge_adapters)
    tokens = trainer.num_tokens_trained()  # summed over processes: every rank takes part
    if not trainer.is_world_process_zero():
        return {}
    losses = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    summary = {
        "tokens_trained": tokens,
        "tokens_per_second": round(tokens / seconds, 1),
        "train_seconds": round(seconds, 1),
        "steps": trainer.state.global_step,
        "precision": "bf16 mixed" if sft_args.bf16 else "fp16 mixed" if sft_args.fp16 else "float32",
        "final_loss": losses[-1][1] if losses else result.training_loss,
        "saved_to": str(output_dir),
    }
    if trainer.skipped_nonfinite_steps:
        summary["skipped_nonfinite_steps"] = trainer.skipped_nonfinite_steps
    if script_args.plot_loss and losses:
        summary["loss_plot"] = str(plot_loss_curve(losses, output_dir / "loss.png"))
    print_summary(summary)
    return summary


def save_trained_model(trainer: Any, output_dir: Path, merge_adapters: bool) -> None:
    """Save so that plain `AutoModelForCausalLM.from_pretrained(output_dir)` loads the fine-tuned model.

    Every process calls this (saving may gather shards); only the main process writes."""
    model = trainer.model
    if hasattr(model, "merge_and_unload") and merge_adapters:
        trainer.save_model(str(output_dir / "adapter"))
        merged = model.merge_and_unload()
        trainer.model = merged
        if trainer.is_world_process_zero():
            merged.save_pretrained(output_dir)
            trainer.processing_class.save_pretrained(output_dir)
            from .trainers.model_card import write_model_card

            write_model_card(output_dir, trainer)
    else:
        trainer.save_model(str(output_dir))


def plot_loss_curve(losses: list[tuple[int, float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in losses], [v for _, v in losses], marker="o", markersize=3)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("sftune: training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_summary(summary: dict[str, Any]) -> None:
    width = max(len(key) for key in summary)
    print("\n== sftune: training done ==")
    for key, value in summary.items():
        print(f"  {key.ljust(width)}  {value}")


def run_eval(argv: list[str]) -> float:
    """Greedy exact-match of a model on a jsonl of {"messages": [...], "answer": ...} rows."""
    from transformers import AutoModelForCausalLM

    from . import tasks
    from .evaluate import exact_match
    from .models import load_tokenizer

    parser = argparse.ArgumentParser(prog="sftune eval", description=run_eval.__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument(
        "--dataset",
        required=True,
        help="jsonl with 'messages' (last turn = answer) and 'answer'",
    )
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--show", type=int, default=3, help="print this many replies")
    args = parser.parse_args(argv)
    if not Path(args.dataset).is_file():
        raise UsageError(f"Dataset file {args.dataset} not found.")
    check_data_file(Path(args.dataset))
    rows = [json.loads(line) for line in Path(args.dataset).read_text().splitlines() if line.strip()]
    rows = rows[: args.limit] if args.limit else rows
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model)
        tokenizer = load_tokenizer(args.model)
    except OSError as err:
        raise UsageError(f"Could not load the model {args.model!r}: {root_cause(err)}") from err
    accuracy, replies = exact_match(
        model,
        tokenizer,
        rows,
        tasks.prompt_messages,
        tasks.is_correct,
        args.max_new_tokens,
        args.batch_size,
    )
    for row, reply in list(zip(rows, replies, strict=True))[: args.show]:
        print(f"  expected {row['answer']!r:30} got {reply!r}")
    print(f"exact match: {accuracy:.1%} of {len(rows)}")
    return accuracy


def run_preview(argv: list[str]) -> list[dict[str, Any]]:
    """Show what rows become: the tokens the model sees, with the trained ones marked. A recipe (--config, and any
    `sftune sft` flag) is read exactly as `sftune sft` reads it, so the rows shown are the ones it trains."""
    parser = argparse.ArgumentParser(prog="sftune preview", description=run_preview.__doc__)
    parser.add_argument("--model", default=None, help="model or tokenizer path/id (default: the recipe's model)")
    parser.add_argument("--dataset", default=None, help="data file or name (default: the recipe's dataset_name)")
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    args, rest = parser.parse_known_args(argv)
    # --config and every other flag: `sftune sft`'s own parsing, its defaults and checks.
    script_args, sft_args, model_args = parse_sft_args(rest)
    model = args.model or model_args.model_name_or_path
    dataset = args.dataset or script_args.dataset_name
    if not model:
        raise UsageError("Give the model: --model PATH_OR_ID (or model_name_or_path in the --config recipe).")
    if not dataset:
        raise UsageError("Give the data: --dataset FILE_OR_NAME (or dataset_name in the --config recipe).")
    return preview_rows(
        model, dataset, args.rows, sft_args, args.color, script_args.dataset_config, script_args.dataset_train_split
    )


def run_iterate(argv: list[str]) -> list[dict[str, Any]]:
    """Expert iteration: sample k replies per prompt, keep those the verifier accepts, train on them, repeat.
    Every recipe field (sftune.iterate.IterateConfig) is also a flag: --rounds 5 --temperature 0.7 ..."""
    from .iterate import RecipeError, VerifierError, iterate
    from .iterate.recipe import IterateConfig

    parser = argparse.ArgumentParser(prog="sftune iterate", description=run_iterate.__doc__)
    parser.add_argument("--config", required=True, help="YAML recipe")
    parser.add_argument("--resume", action="store_true", help="continue the run in the recipe's output_dir")
    args, rest = parser.parse_known_args(argv)
    overrides = parse_field_flags(rest, IterateConfig)
    try:
        return iterate(IterateConfig.from_yaml(args.config, overrides), resume=args.resume)
    except (RecipeError, VerifierError) as err:
        raise UsageError(str(err)) from err


def parse_field_flags(argv: list[str], config_class: Any) -> dict[str, Any]:
    """`--field value` pairs for a dataclass's fields, values read as YAML (numbers, booleans, lists)."""
    import dataclasses

    import yaml

    fields = {f.name for f in dataclasses.fields(config_class)}
    values: dict[str, Any] = {}
    it = iter(argv)
    for flag in it:
        name, _, value = flag.removeprefix("--").partition("=")
        if not flag.startswith("--") or name not in fields:
            raise UsageError(f"unknown argument {flag!r}; recipe fields: {', '.join(sorted(fields))}.")
        if not value:
            value = next(it, None)
            if value is None:
                raise UsageError(f"{flag} needs a value.")
        values[name] = yaml.safe_load(value)
    return values


COMMANDS = {"sft": run_sft, "eval": run_eval, "preview": run_preview, "iterate": run_iterate}
USER_ERROR_EXIT = 2
FAILED_EXIT = 1
INTERRUPTED_EXIT = 130


def main(argv: list[str] | None = None) -> None:
    """Run a command. A user's mistake is one line on stderr and exit code 2, never a traceback
    (SFTUNE_DEBUG=1 shows it); a run that fails (NaN, full disk) exits 1, Ctrl-C 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else USER_ERROR_EXIT)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        COMMANDS[argv[0]](argv[1:])
    except Exception as err:
        if os.environ.get("SFTUNE_DEBUG"):
            raise
        if isinstance(err, (UsageError, DatasetFormatError, NonFiniteWeightsError)):
            _fail(f"sftune {argv[0]}: error: {err}", USER_ERROR_EXIT)
        if isinstance(err, (NonFiniteTrainingError, CheckpointSaveError)):
            _fail(f"sftune {argv[0]}: {err}", FAILED_EXIT)
        raise
    except TrainingInterrupted as err:
        _fail(f"sftune {argv[0]}: {err}", INTERRUPTED_EXIT)
    except KeyboardInterrupt:
        _fail(f"sftune {argv[0]}: interrupted.", INTERRUPTED_EXIT)


def _fail(message: str, code: int) -> None:
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
