"""The `sftune` command line.

    sftune sft --config recipe.yaml [--any_SFTConfig_or_ModelConfig_field value ...]
    sftune eval --model PATH --dataset test.jsonl
    sftune preview --model PATH --dataset train.jsonl [--config recipe.yaml]

Every field of SFTConfig, ModelConfig and ScriptArguments is a flag; a YAML file gives defaults and the command
line overrides it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("sftune")

LOCAL_DATA_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}


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
    import yaml
    from transformers import HfArgumentParser

    from .config import SFTConfig
    from .models import ModelConfig

    parser = HfArgumentParser((ScriptArguments, SFTConfig, ModelConfig), prog="sftune sft")
    parser.add_argument("--config", type=str, default=None, help="YAML file of defaults for any flag.")
    config_path = _pop_config_path(argv)
    if config_path:
        values = yaml.safe_load(Path(config_path).read_text()) or {}
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SystemExit(f"{config_path}: unknown keys {unknown}. Run `sftune sft --help` for the fields.")
        parser.set_defaults(**{k: _yaml_to_flag_value(v) for k, v in values.items()})
        # A required flag given by the YAML file is no longer required on the command line.
        for action in parser._actions:
            if action.dest in values:
                action.required = False
    # The --config flag itself (already consumed) comes back as an extra namespace; keep the three dataclasses.
    *parsed, extra = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    script_args, sft_args, model_args = parsed[:3]
    if extra:
        raise SystemExit(f"Unknown arguments: {extra}. Run `sftune sft --help` for the fields.")
    return script_args, sft_args, model_args


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


def _yaml_to_flag_value(value: Any) -> Any:
    # Dict-valued fields (model_init_kwargs, dataset_kwargs, ...) travel as JSON strings through argparse.
    return json.dumps(value) if isinstance(value, dict) else value


# --------------------------------------------------------------------------------------------------------------
# Data loading
# --------------------------------------------------------------------------------------------------------------


def load_any_dataset(name: str, config: str | None = None, split: str = "train") -> Any:
    """A local file (by extension), a dataset saved with save_to_disk, or a `datasets` name."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    path = Path(name)
    if path.is_file():
        builder = LOCAL_DATA_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise SystemExit(f"{name}: unsupported file type; use one of {sorted(LOCAL_DATA_BUILDERS)}.")
        return load_dataset(builder, data_files=str(path), split="train")
    if path.is_dir() and any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json")):
        data = load_from_disk(str(path))
        return data[split] if isinstance(data, DatasetDict) else data
    return load_dataset(name, config, split=split)


# --------------------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------------------


def run_sft(argv: list[str]) -> dict[str, Any]:
    """Train as the arguments say; print and return a summary."""
    from .models import get_peft_config, load_model
    from .trainers.sft import SFTTrainer

    script_args, sft_args, model_args = parse_sft_args(argv)
    if not model_args.model_name_or_path:
        raise SystemExit("Give the model: --model_name_or_path PATH_OR_ID (or model_name_or_path in the YAML).")
    if not script_args.dataset_name:
        raise SystemExit("Give the data: --dataset_name FILE_OR_NAME (or dataset_name in the YAML).")
    train = load_any_dataset(
        script_args.dataset_name,
        script_args.dataset_config,
        script_args.dataset_train_split,
    )
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
    model = load_model(model_args.model_name_or_path, kwargs)
    sft_args.model_init_kwargs = None
    trainer = SFTTrainer(
        model=model,
        args=sft_args,
        train_dataset=train,
        eval_dataset=evaluation,
        peft_config=get_peft_config(model_args),
    )
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=sft_args.resume_from_checkpoint)
    seconds = time.perf_counter() - started
    output_dir = Path(sft_args.output_dir)
    save_trained_model(trainer, output_dir, script_args.merge_adapters)
    losses = [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    summary = {
        "tokens_trained": trainer._num_tokens["train"],
        "tokens_per_second": round(trainer._num_tokens["train"] / seconds, 1),
        "train_seconds": round(seconds, 1),
        "steps": trainer.state.global_step,
        "final_loss": losses[-1][1] if losses else result.training_loss,
        "saved_to": str(output_dir),
    }
    if script_args.plot_loss and losses:
        summary["loss_plot"] = str(plot_loss_curve(losses, output_dir / "loss.png"))
    print_summary(summary)
    return summary


def save_trained_model(trainer: Any, output_dir: Path, merge_adapters: bool) -> None:
    """Save so that plain `AutoModelForCausalLM.from_pretrained(output_dir)` loads the fine-tuned model."""
    model = trainer.model
    if hasattr(model, "merge_and_unload") and merge_adapters:
        trainer.save_model(str(output_dir / "adapter"))
        merged = model.merge_and_unload()
        merged.save_pretrained(output_dir)
        trainer.processing_class.save_pretrained(output_dir)
        trainer.model = merged
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
    rows = [json.loads(line) for line in Path(args.dataset).read_text().splitlines() if line.strip()]
    rows = rows[: args.limit] if args.limit else rows
    model = AutoModelForCausalLM.from_pretrained(args.model)
    tokenizer = load_tokenizer(args.model)
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


def run_preview(argv: list[str]) -> None:
    """Show what rows become: the tokens the model sees, with the trained ones marked."""
    from .data.preview import preview_rows

    parser = argparse.ArgumentParser(prog="sftune preview", description=run_preview.__doc__)
    parser.add_argument("--model", required=True, help="model or tokenizer path/id")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument(
        "--config",
        default=None,
        help="YAML recipe (dataset and loss options are read from it)",
    )
    parser.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    args = parser.parse_args(argv)
    preview_rows(args.model, args.dataset, args.rows, args.config, args.color)


COMMANDS = {"sft": run_sft, "eval": run_eval, "preview": run_preview}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
