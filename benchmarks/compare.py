"""sftune vs TRL on the same SFT workload, side by side: repeated runs, medians and spread.

    python benchmarks/compare.py                      # every configuration and precision, 3 repeats, then a table
    python benchmarks/compare.py --configs packing --precisions fp32 bf16 --impls sftune --seconds 0 --max-steps 50
    python benchmarks/compare.py --impl sftune --config packing --precision bf16 --max-steps 2   # one run, one line
    python benchmarks/compare.py --smoke              # a few seconds per run: checks the harness, not the speed

Workload: SmolLM2-135M-Instruct, float32 master weights, CPU; a deterministic synthetic prompt/completion dataset of
20k examples with skewed lengths (most short, a tail to ~1,000 tokens); max length 512; batch 8; fixed seeds;
gradient checkpointing off for both. Precision `bf16` is `bf16=True` (TRL also gets `use_cpu=True`, which it needs
on a machine without a GPU; sftune does not). Configuration `iterative` is sftune's `IterativeSFTTrainer.step()`
(TRL 1.16 has no IterativeSFTTrainer): 8 prompt/completion pairs per call, one optimizer step each.

Each run is its own process (clean peak RSS) and trains until it has trained for `--seconds` (checked at the end of
each optimizer step) or `--max-steps`, whichever comes first. Repeats alternate the order of the implementations
(sftune, trl / trl, sftune / ...) so that a drift in the machine's speed hits both. The table shows medians over
the repeats, the spread as (max - min) / median, and the loss of every run at the last step all runs of that
configuration reached. Run it with a Python that has both sftune and trl installed (`make bench` makes
`.venv-bench`); the sftune next to this script is the one imported.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = ("no_packing", "packing", "lora", "completion_only", "iterative")
PRECISIONS = ("fp32", "bf16")
IMPLS = ("sftune", "trl")
WORDS = (
    "the of and to in is was for on that with by as at from his her an which or be are this had not but "
    "they have one were all their we can has been there more when who will into its two some time than "
    "model data train learn token batch layer weight loss value number list first last small large"
).split()


def synthetic_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompt/completion pairs; total words lognormal (median ~45 words, tail past 800)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = min(int(rng.lognormvariate(3.8, 0.9)) + 6, 900)
        prompt_words = max(2, words // 3)
        text = [rng.choice(WORDS) for _ in range(words)]
        rows.append({"prompt": " ".join(text[:prompt_words]), "completion": " " + " ".join(text[prompt_words:])})
    return rows


def run_one(impl: str, config: str, precision: str, seconds: float, max_steps: int, n_examples: int,
            torch_compile: bool = False) -> dict:  # fmt: skip
    sys.path.insert(0, str(REPO))  # this checkout's sftune, whatever the venv has installed
    import datasets
    import torch
    import transformers
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from sftune.models import smollm2_path

    torch.manual_seed(0)
    path = str(smollm2_path())
    rows = synthetic_rows(n_examples)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if config == "iterative":
        return run_iterative(model, tokenizer, rows, precision, seconds, max_steps, torch_compile)

    common = dict(
        output_dir=f"/tmp/bench-{impl}-{config}", max_steps=max_steps, per_device_train_batch_size=8,
        learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to="none", seed=0,
        gradient_checkpointing=False, bf16=precision == "bf16", max_length=512, packing=config == "packing",
        completion_only_loss=config == "completion_only", disable_tqdm=True, dataloader_num_workers=0,
        torch_compile=torch_compile,
    )  # fmt: skip
    if impl == "trl":
        import trl

        config_class, trainer_class, version = trl.SFTConfig, trl.SFTTrainer, trl.__version__
        if precision == "bf16":
            common["use_cpu"] = True  # TRL (transformers) refuses bf16 without a GPU otherwise
    else:
        import sftune

        config_class, trainer_class, version = sftune.SFTConfig, sftune.SFTTrainer, sftune.__version__
    args = config_class(**common)
    peft_config = None
    if config == "lora":
        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")

    started = time.perf_counter()
    trainer = trainer_class(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                            processing_class=tokenizer, peft_config=peft_config)  # fmt: skip
    prep_seconds = time.perf_counter() - started

    # The dataloader may collate batches ahead of training; count only the ones trained on, in order.
    batches: list[tuple[int, int]] = []
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        batches.append((sum(len(f["input_ids"]) for f in features), batch["input_ids"].numel()))
        return batch

    class StopAfter(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            if seconds and time.perf_counter() - started >= seconds:
                control.should_training_stop = True

    trainer.data_collator = counting_collator
    trainer.add_callback(StopAfter())
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    trained = batches[: trainer.state.global_step * args.gradient_accumulation_steps]
    real, fed = sum(r for r, _ in trained), sum(f for _, f in trained)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return result(impl, config, precision, version, trainer.state.global_step, prep_seconds, n_examples,
                  train_seconds, real, 1 - real / max(fed, 1), losses, torch_compile, transformers, torch)  # fmt: skip


def run_iterative(model, tokenizer, rows, precision: str, seconds: float, max_steps: int, torch_compile: bool):
    import torch
    import transformers

    import sftune
    from sftune import IterativeSFTConfig, IterativeSFTTrainer

    args = IterativeSFTConfig(output_dir="/tmp/bench-sftune-iterative", per_device_train_batch_size=8,
                              learning_rate=1e-4, logging_steps=1000, save_strategy="no", report_to="none", seed=0,
                              bf16=precision == "bf16", max_length=512, max_steps=max_steps,
                              torch_compile=torch_compile)  # fmt: skip
    started = time.perf_counter()
    trainer = IterativeSFTTrainer(model, args=args, processing_class=tokenizer)
    prep_seconds = time.perf_counter() - started
    losses, tokens, steps = [], 0, 0
    started = time.perf_counter()
    while steps < max_steps and not (seconds and time.perf_counter() - started >= seconds):
        chunk = rows[steps * 8 : steps * 8 + 8]
        stats = trainer.step(texts=[r["prompt"] + r["completion"] for r in chunk],
                             texts_labels=[r["completion"] for r in chunk])  # fmt: skip
        losses.append(stats["loss"])
        tokens += stats["num_tokens"]
        steps += stats["optimizer_steps"]
    train_seconds = time.perf_counter() - started
    return result("sftune", "iterative", precision, sftune.__version__, steps, prep_seconds, 0, train_seconds, tokens,
                  None, losses, torch_compile, transformers, torch)  # fmt: skip


def result(impl, config, precision, version, steps, prep_seconds, n_examples, train_seconds, tokens, padding,
           losses, torch_compile, transformers, torch) -> dict:  # fmt: skip
    return {
        "impl": impl,
        "config": config,
        "precision": precision,
        "torch_compile": torch_compile,
        "version": version,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "steps": steps,
        "prep_seconds": round(prep_seconds, 2),
        "prep_examples": n_examples,
        "train_seconds": round(train_seconds, 2),
        "tokens": tokens,
        "tokens_per_second": round(tokens / train_seconds, 1),
        "padding_fraction": None if padding is None else round(padding, 4),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "losses": [round(loss, 5) for loss in losses],
    }


def run_subprocess(impl: str, config: str, precision: str, options: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--impl", impl, "--config", config, "--precision", precision,
               "--seconds", str(options.seconds), "--max-steps", str(options.max_steps),
               "--examples", str(options.examples)] + (["--torch-compile"] if options.torch_compile else [])  # fmt: skip
    print(f"running {impl} / {config} / {precision} ...", file=sys.stderr, flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{impl} / {config} / {precision} failed")
    print(lines[-1], flush=True)
    return json.loads(lines[-1])


def compare(options: argparse.Namespace) -> None:
    results = []
    for config in options.configs:
        impls = ["sftune"] if config == "iterative" else list(options.impls)
        for precision in options.precisions:
            for repeat in range(options.repeats):
                for impl in impls if repeat % 2 == 0 else impls[::-1]:
                    results.append({**run_subprocess(impl, config, precision, options), "repeat": repeat})
                    if options.out:
                        options.out.write_text("".join(json.dumps(r) + "\n" for r in results))
    print_table(results)


def summarize(runs: list[dict]) -> dict:
    speeds = [r["tokens_per_second"] for r in runs]
    median = statistics.median(speeds)
    return {
        "tok_s": median,
        "spread": (max(speeds) - min(speeds)) / median if median else 0.0,
        "rss": statistics.median(r["peak_rss_gib"] for r in runs),
        "seconds": statistics.median(r["train_seconds"] for r in runs),
        "runs": len(runs),
    }


def print_table(results: list[dict]) -> None:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["config"], r["precision"], r["impl"]), []).append(r)
    print("\nMedians over repeats; spread = (max - min) / median of tokens/s; loss at the last step every run of the "
          "configuration reached")  # fmt: skip
    print(f"{'config':16} {'prec':5} {'impl':7} {'runs':>4} {'train s':>8} {'tok/s':>8} {'spread':>7} "
          f"{'RSS GiB':>8} {'step':>5} {'loss':>8}")  # fmt: skip
    common_step = {}
    for config in dict.fromkeys(r["config"] for r in results):
        common_step[config] = min(len(r["losses"]) for r in results if r["config"] == config)
    summaries = {}
    for (config, precision, impl), runs in groups.items():
        s = summaries[(config, precision, impl)] = summarize(runs)
        step = common_step[config]
        loss = s["loss"] = statistics.median(r["losses"][step - 1] for r in runs) if step else float("nan")
        short = " (< 60 s)" if s["seconds"] < 60 else ""
        print(f"{config:16} {precision:5} {impl:7} {s['runs']:4d} {s['seconds']:8.1f} {s['tok_s']:8.1f} "
              f"{s['spread']:7.1%} {s['rss']:8.2f} {step:5d} {loss:8.4f}{short}")  # fmt: skip
    print("\nRatios of medians (tokens/s: higher is better; peak RSS: lower is better)")
    for (config, precision, impl), s in summaries.items():
        if impl != "sftune":
            continue
        trl = summaries.get((config, precision, "trl"))
        fp32 = summaries.get((config, "fp32", "sftune"))
        parts = []
        if trl:
            parts.append(f"vs TRL: {s['tok_s'] / trl['tok_s']:.2f}x tok/s, {s['rss'] / trl['rss']:.2f}x RSS")
        if precision != "fp32" and fp32:
            parts.append(f"vs sftune fp32: {s['tok_s'] / fp32['tok_s']:.2f}x tok/s, {s['rss'] / fp32['rss']:.2f}x RSS, "
                         f"loss {s['loss'] / fp32['loss'] - 1:+.2%}")  # fmt: skip
        if parts:
            print(f"  sftune {config} {precision}: " + "; ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=IMPLS, help="one run in this process, printed as one JSON line")
    parser.add_argument("--config", choices=CONFIGS, default="no_packing")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=60.0, help="train at least this long (0: --max-steps)")
    parser.add_argument("--max-steps", type=int, default=50)
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--torch-compile", action="store_true", help="torch_compile=True for every run")
    parser.add_argument("--smoke", action="store_true", help="2 steps, 1 repeat, few examples: checks the harness")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON lines here (after every run)")
    options = parser.parse_args()
    if options.smoke:
        options.seconds, options.max_steps, options.repeats, options.examples = 0, 2, 1, 300
    if options.impl:
        print(json.dumps(run_one(options.impl, options.config, options.precision, options.seconds,
                                 options.max_steps, options.examples, options.torch_compile)))  # fmt: skip
    else:
        compare(options)


if __name__ == "__main__":
    main()
