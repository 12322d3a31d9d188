"""IterativeSFTTrainer.step() throughput and peak memory on SmolLM2-135M-Instruct (CPU, fp32).

    PYTHONPATH=<checkout> .venv/bin/python benchmarks/iterative_step.py [--steps 3] [--batch 8]

Each step() call trains on `batch` texts of mixed lengths (about 10 to 200 tokens) as one mini-batch, so every
call is one optimizer step. The first call is a warm-up and is not timed. Prints one JSON line: seconds per
step(), trained tokens per second, and the process's peak resident memory (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import tempfile
import time

import sftune
from sftune import IterativeSFTConfig, IterativeSFTTrainer, smollm2_path

WORDS = "the a model learns to answer short questions about colours numbers and animals with care".split()


def mixed_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.choice([8, 30, 80, 160]))) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    config = IterativeSFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch,
                                report_to="none", logging_steps=1000, save_strategy="no", disable_tqdm=True)  # fmt: skip
    trainer = IterativeSFTTrainer(str(smollm2_path()), args=config)
    trainer.step(texts=mixed_texts(args.batch, seed=-1))  # warm-up
    seconds, tokens = 0.0, 0
    for step in range(args.steps):
        texts = mixed_texts(args.batch, seed=step)
        started = time.perf_counter()
        stats = trainer.step(texts=texts)
        seconds += time.perf_counter() - started
        tokens += stats["num_tokens"]
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"sftune": sftune.__file__, "steps": args.steps, "batch": args.batch, "tokens": tokens,
              "seconds_per_step": round(seconds / args.steps, 3), "tokens_per_second": round(tokens / seconds, 1),
              "peak_rss_mib": round(peak_mib)}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
