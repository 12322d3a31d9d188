"""kill -9 during training, then resume: does the resumed run end with exactly the uninterrupted run's weights?

    python -m benchmarks.kill_during_save --trials 20 --timing slow     # killed inside a (slowed) checkpoint save
    python -m benchmarks.kill_during_save --trials 20 --timing random   # killed at a random moment

Each trial runs tests/fault_worker.py (a tiny Llama, 6 steps, checkpoints every 2) in a subprocess, SIGKILLs it,
resumes with resume_from_checkpoint=True in a fresh subprocess, and compares the final weights bit for bit.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SLOW_SAVE_SECONDS = 2.0


def worker(model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tests.fault_worker", str(model), str(out), *extra]


def build_model(folder: Path) -> Path:
    from tests.fixtures import CHATML_TEMPLATE, build_tiny_causal_lm, build_tokenizer

    tokenizer = build_tokenizer(folder / "tok", chat_template=CHATML_TEMPLATE, eos="<|im_end|>", pad="<|im_end|>")
    return build_tiny_causal_lm("llama", tokenizer, folder / "model")


def kill_run(model: Path, out: Path, timing: str, rng: random.Random, run_seconds: float) -> dict:
    if timing == "slow":
        command = worker(model, out, "--slow_save", str(SLOW_SAVE_SECONDS))
        target_save, delay = rng.randint(1, 2), rng.uniform(0.0, SLOW_SAVE_SECONDS * 0.9)
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        saves = 0
        for line in process.stdout:
            if line.startswith("SAVING"):
                saves += 1
                if saves == target_save:
                    time.sleep(delay)
                    break
        process.send_signal(signal.SIGKILL)
    else:
        process = subprocess.Popen(worker(model, out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.3, 1.0) * run_seconds)
        process.send_signal(signal.SIGKILL)
    process.wait()
    staged = sorted(p.name for p in (out / ".staging").glob("checkpoint-*")) if (out / ".staging").is_dir() else []
    return {
        "killed": process.returncode == -signal.SIGKILL,
        "checkpoints": sorted(p.name for p in out.glob("checkpoint-*")),
        "staged_at_kill": staged,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--timing", choices=["slow", "random"], default="slow")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="kill-during-save-"))
    model = build_model(work)
    started = time.perf_counter()
    subprocess.run(worker(model, work / "reference", "--weights", str(work / "reference.pt")), cwd=ROOT, check=True,
                   capture_output=True)  # fmt: skip
    run_seconds = time.perf_counter() - started
    reference = torch.load(work / "reference.pt")
    results = []
    for trial in range(args.trials):
        out = work / f"trial{trial}"
        record = kill_run(model, out, args.timing, rng, run_seconds)
        resume = ["--resume"] if any((p / "trainer_state.json").exists() for p in out.glob("checkpoint-*")) else []
        done = subprocess.run(worker(model, out, *resume, "--weights", str(out / "final.pt")), cwd=ROOT,
                              capture_output=True, text=True)  # fmt: skip
        record["resumed"] = done.returncode == 0
        if done.returncode == 0:
            final = torch.load(out / "final.pt")
            record["exact"] = all(torch.equal(final[k], reference[k]) for k in reference)
        else:
            record["exact"] = False
            record["error"] = done.stderr.strip().splitlines()[-1:]
        print(json.dumps({"trial": trial, **record}), flush=True)
        results.append(record)
        shutil.rmtree(out, ignore_errors=True)
    mid_save = sum(bool(r["staged_at_kill"]) for r in results)
    exact = sum(r["exact"] for r in results)
    print(
        f"timing={args.timing}: {len(results)} trials, {mid_save} killed with a checkpoint half-written, "
        f"{sum(r['resumed'] for r in results)} resumed, {exact} of {len(results)} bit-exact with the uninterrupted run"
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
