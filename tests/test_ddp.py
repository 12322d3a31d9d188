"""2-process DDP (gloo, CPU) runs the chunked loss through DDP's forward and matches 1 process.

The point is exactness, so the model trains in float64: in float32 the two runs differ by the order of DDP's
gradient sum alone (weights 9e-7 apart on one CPU, 1.4e-6 on another), a figure that depends on the CPU's kernels.
In float64 the only float32 step left is the loss's softmax, and the bound below follows from it.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from datasets import Dataset

ROWS = [
    {"messages": [{"role": "user", "content": f"Say {w} {n}."}, {"role": "assistant", "content": f"{w} " * n}]}
    for n, w in enumerate(["red", "blue", "green", "amber", "violet", "teal", "gold", "pink"] * 2, start=1)
]
GLOBAL_BATCH = 4
STEPS = 3
LR = 1e-3
# Each Adam step moves a weight by lr * m / (sqrt(v) + eps); a gradient known to a few float32 ulps (the float32
# softmax of the loss, everything else float64) changes that by at most lr times that relative error. Over STEPS
# steps, with 64 ulps of slack for the sums over tokens: 3 * 1e-3 * 64 * 1.2e-7 = 2.3e-8, 60x below float32 DDP noise.
WEIGHT_BOUND = STEPS * LR * 64 * torch.finfo(torch.float32).eps


def train(rank: int, world: int, port: int, model_path: str, out: str, chunk: int) -> None:
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))  # fmt: skip
    torch.set_num_threads(1)
    from sftune import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=f"{out}/run", max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // world,
                     learning_rate=LR, logging_steps=1, save_strategy="no", report_to="none", seed=0,
                     disable_tqdm=True, use_cpu=True, ddp_backend="gloo" if world > 1 else None, loss_chunk_size=chunk,
                     max_seq_length=64, bf16=False, model_init_kwargs={"dtype": "float64"})  # fmt: skip
    trainer = SFTTrainer(model_path, args=args, train_dataset=Dataset.from_list(ROWS))
    trainer.train()
    if rank == 0:
        state = trainer._chunked_loss
        torch.save(
            {
                "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
                "weights": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                "ddp": isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel),
                "chunked": state is not None and state.checked and state.active,
            },
            f"{out}/result.pt",
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int, model_path, out, chunk: int) -> dict:
    out.mkdir()
    mp.start_processes(train, args=(world, free_port(), str(model_path), str(out), chunk), nprocs=world,
                       start_method="spawn")  # fmt: skip
    return torch.load(out / "result.pt")


@pytest.mark.parametrize("chunk", [1024, pytest.param(0, marks=pytest.mark.slow)])
def test_two_process_ddp_with_chunked_loss_matches_one_process(tiny_llama_path, tmp_path, chunk):
    single = run(1, tiny_llama_path, tmp_path / "one", chunk)
    ddp = run(2, tiny_llama_path, tmp_path / "two", chunk)
    assert ddp["ddp"] and not single["ddp"]
    assert ddp["chunked"] == single["chunked"] == (chunk > 0)
    assert len(ddp["losses"]) == len(single["losses"]) == STEPS
    diffs = [(ddp["weights"][k] - v).abs().max().item() for k, v in single["weights"].items()]
    for got, want in zip(ddp["losses"], single["losses"], strict=True):
        assert abs(got - want) <= 1e-6 * max(1.0, abs(want))
    assert max(diffs) <= WEIGHT_BOUND, (max(diffs), WEIGHT_BOUND)
