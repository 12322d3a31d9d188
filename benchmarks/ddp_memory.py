"""Peak RSS per rank under 2-process DDP (gloo, CPU), with the chunked loss and with the model's own loss.

    python benchmarks/ddp_memory.py [--max-length 1024] [--steps 2] [--chunks 1024 0]

SmolLM2-135M-Instruct (vocabulary 49,152, so full logits are 0.2 GB per 1k tokens in fp32, several times that
with their softmax and gradients), packed rows of `--max-length` tokens, one row per rank per step. Each setting is
a fresh pair of processes; prints one JSON line per setting with every rank's peak RSS and the logged losses.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def train(rank: int, world: int, port: int, chunk: int, max_length: int, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))  # fmt: skip
    sys.path.insert(0, str(REPO))
    import datasets
    import torch

    from benchmarks.compare import synthetic_rows
    from sftune import SFTConfig, SFTTrainer
    from sftune.models import smollm2_path

    torch.set_num_threads(1)
    args = SFTConfig(output_dir=f"{out}/run", max_steps=steps, per_device_train_batch_size=1, packing=True,
                     max_length=max_length, learning_rate=1e-4, logging_steps=1, save_strategy="no",
                     report_to="none", seed=0, disable_tqdm=True, use_cpu=True, ddp_backend="gloo",
                     loss_chunk_size=chunk)  # fmt: skip
    trainer = SFTTrainer(str(smollm2_path()), args=args, train_dataset=datasets.Dataset.from_list(synthetic_rows(400)))
    trainer.train()
    record = {
        "rank": rank,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "chunked": trainer._chunked_loss is not None and trainer._chunked_loss.active,
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


def main() -> None:
    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 0])
    options = parser.parse_args()
    for chunk in options.chunks:
        with tempfile.TemporaryDirectory() as out, socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            mp.start_processes(train, args=(2, port, chunk, options.max_length, options.steps, out), nprocs=2,
                               start_method="spawn")  # fmt: skip
            ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
        print(json.dumps({"loss_chunk_size": chunk, "max_length": options.max_length, "ranks": ranks}), flush=True)


if __name__ == "__main__":
    main()
