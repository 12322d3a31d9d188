"""2-process DDP (gloo, CPU) runs the chunked loss through DDP's forward and matches 1 process.

Measured (lr 1e-3, 3 steps): losses within 5e-7 and weights within 9.1e-7 of 1 process, the same with the chunked
loss and with the model's own (chunk 0): the difference is DDP's, not the loss's.
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


def train(rank: int, world: int, port: int, model_path: str, out: str, chunk: int) -> None:
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))  # fmt: skip
    torch.set_num_threads(1)
    from sftune import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=f"{out}/run", max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // world,
                     learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", seed=0,
                     disable_tqdm=True, use_cpu=True, ddp_backend="gloo" if world > 1 else None, loss_chunk_size=chunk,
                     max_seq_length=64, bf16=False)  # fmt: skip
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
    assert max(diffs) <= 1e-6, max(diffs)
