"""sftune vs TRL on the same SFT workload, side by side, in one run.

    python benchmarks/compare.py                          # every configuration, both implementations, then a table
    python benchmarks/compare.py --impl sftune --config packing --steps 8   # one run, one JSON line

Workload: SmolLM2-135M-Instruct, float32, CPU; a deterministic synthetic prompt/completion dataset of 20k
examples with skewed lengths (most short, a tail to ~1,000 tokens); max length 512; batch 8; a fixed number of
optimizer steps; fixed seeds; gradient checkpointing off for both. Each run is its own process (clean peak
RSS). Run it with a Python that has both sftune and trl installed (`make bench` makes `.venv-bench`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = ("no_packing", "packing", "lora", "completion_only")
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


def run_one(impl: str, config: str, steps: int, n_examples: int) -> dict:
    import datasets
    import torch
    import transformers
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftune.models import smollm2_path

    torch.manual_seed(0)
    path = str(smollm2_path())
    dataset = datasets.Dataset.from_list(synthetic_rows(n_examples))
    common = dict(
        output_dir=f"/tmp/bench-{impl}-{config}", max_steps=steps, per_device_train_batch_size=8,
        learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to="none", seed=0,
        gradient_checkpointing=False, bf16=False, max_length=512, packing=config == "packing",
        completion_only_loss=config == "completion_only", disable_tqdm=True, dataloader_num_workers=0,
    )  # fmt: skip
    if impl == "trl":
        import trl

        config_class, trainer_class, version = trl.SFTConfig, trl.SFTTrainer, trl.__version__
    else:
        import sftune

        config_class, trainer_class, version = sftune.SFTConfig, sftune.SFTTrainer, sftune.__version__
    args = config_class(**common)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    peft_config = None
    if config == "lora":
        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")

    started = time.perf_counter()
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                            peft_config=peft_config)  # fmt: skip
    prep_seconds = time.perf_counter() - started

    # The dataloader may collate batches ahead of training; count only the ones trained on, in order.
    batches: list[tuple[int, int]] = []
    collate = trainer.data_collator

    def counting_collator(features):
        batch = collate(features)
        batches.append((sum(len(f["input_ids"]) for f in features), batch["input_ids"].numel()))
        return batch

    trainer.data_collator = counting_collator
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    trained = batches[: trainer.state.global_step * args.gradient_accumulation_steps]
    counts = {"real": sum(real for real, _ in trained), "fed": sum(fed for _, fed in trained)}
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "impl": impl,
        "config": config,
        "version": version,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "steps": steps,
        "prep_seconds": round(prep_seconds, 2),
        "prep_examples": n_examples,
        "train_seconds": round(train_seconds, 2),
        "tokens": counts["real"],
        "tokens_per_second": round(counts["real"] / train_seconds, 1),
        "padding_fraction": round(1 - counts["real"] / max(counts["fed"], 1), 4),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "first_loss": round(losses[0], 4) if losses else None,
        "final_loss": round(losses[-1], 4) if losses else None,
    }


def compare(steps: int, n_examples: int, configs: list[str], out: Path | None) -> None:
    results = []
    for config in configs:
        for impl in ("sftune", "trl"):
            command = [sys.executable, __file__, "--impl", impl, "--config", config, "--steps", str(steps),
                       "--examples", str(n_examples)]  # fmt: skip
            print(f"running {impl} / {config} ...", file=sys.stderr, flush=True)
            done = subprocess.run(
                command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode or not lines:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{impl} / {config} failed")
            print(lines[-1], flush=True)
            results.append(json.loads(lines[-1]))
    if out:
        out.write_text("".join(json.dumps(r) + "\n" for r in results))
    print_table(results)


def print_table(results: list[dict]) -> None:
    by = {(r["impl"], r["config"]): r for r in results}
    print("\nsftune / TRL ratios (tokens/s: higher is better; RSS and prep time: lower is better)")
    print(f"{'config':16} {'tok/s sftune':>12} {'tok/s trl':>10} {'ratio':>6} {'pad sftune':>10} {'pad trl':>8} "
          f"{'RSS ratio':>9} {'prep ratio':>10}")  # fmt: skip
    for config in dict.fromkeys(r["config"] for r in results):
        s, t = by[("sftune", config)], by[("trl", config)]
        print(f"{config:16} {s['tokens_per_second']:12.1f} {t['tokens_per_second']:10.1f} "
              f"{s['tokens_per_second'] / t['tokens_per_second']:6.2f} {s['padding_fraction']:10.3f} "
              f"{t['padding_fraction']:8.3f} {s['peak_rss_gib'] / t['peak_rss_gib']:9.2f} "
              f"{s['prep_seconds'] / t['prep_seconds']:10.2f}")  # fmt: skip
    best_trl_packed = by.get(("trl", "packing"))
    best_sftune = max((r for r in results if r["impl"] == "sftune"), key=lambda r: r["tokens_per_second"])
    trl_unpacked = by.get(("trl", "no_packing"))
    if trl_unpacked and best_trl_packed:
        print(f"\nbest sftune ({best_sftune['config']}) vs TRL unpacked: "
              f"{best_sftune['tokens_per_second'] / trl_unpacked['tokens_per_second']:.2f}x; "
              f"vs TRL packed: {best_sftune['tokens_per_second'] / best_trl_packed['tokens_per_second']:.2f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=["sftune", "trl"])
    parser.add_argument("--config", choices=CONFIGS, default="no_packing")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON lines here")
    args = parser.parse_args()
    if args.impl:
        print(json.dumps(run_one(args.impl, args.config, args.steps, args.examples)))
    else:
        compare(args.steps, args.examples, args.configs, args.out)


if __name__ == "__main__":
    main()
