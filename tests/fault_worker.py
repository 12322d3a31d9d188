"""A small SFT run for fault tests, as a script (so that it can be killed) and as functions (so that it can be
compared with in-process runs).

    python -m tests.fault_worker MODEL OUTPUT_DIR [--resume] [--slow_save SECONDS] [--weights FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from sftune import SFTConfig, SFTTrainer  # noqa: E402

WORDS = ["red", "blue", "green", "amber", "violet", "teal", "gold", "pink", "one", "two", "three", "four"]
ROWS = [
    {"messages": [{"role": "user", "content": f"Say {w} {v}."}, {"role": "assistant", "content": f"{v} {w}."}]}
    for w in WORDS
    for v in WORDS[:4]
]
MAX_STEPS = 6
SAVE_STEPS = 2


def fault_config(output_dir: str, **overrides) -> SFTConfig:
    values = dict(
        output_dir=output_dir,
        max_steps=MAX_STEPS,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        report_to="none",
        max_seq_length=64,
        disable_tqdm=True,
        seed=7,
    )
    values.update(overrides)
    return SFTConfig(**values)


def make_trainer(
    model_path: str, output_dir: str, callbacks: list | None = None, peft_config=None, **overrides
) -> SFTTrainer:
    args = fault_config(output_dir, **overrides)
    data = Dataset.from_list(ROWS)
    return SFTTrainer(model_path, args=args, train_dataset=data, callbacks=callbacks, peft_config=peft_config)


def slow_down_saves(seconds: float) -> None:
    """Stretch each checkpoint save: weights and optimizer are written, then a pause before the trainer state."""
    from transformers import Trainer

    original = Trainer._save_optimizer_and_scheduler

    def slow(self, output_dir):
        original(self, output_dir)
        print(f"SAVING {output_dir}", flush=True)
        time.sleep(seconds)

    Trainer._save_optimizer_and_scheduler = slow


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("output_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--slow_save", type=float, default=0.0)
    parser.add_argument("--weights", default=None, help="save the final state dict here")
    args = parser.parse_args(argv)
    if args.slow_save:
        slow_down_saves(args.slow_save)
    trainer = make_trainer(args.model, args.output_dir)
    trainer.train(resume_from_checkpoint=True if args.resume else None)
    if args.weights:
        torch.save(trainer.model.state_dict(), args.weights)
    print("DONE", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
