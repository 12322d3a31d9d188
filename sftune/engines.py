"""What sftune needs from the distributed engines accelerate runs (DDP, FSDP2, DeepSpeed ZeRO), and nothing more:
sftune brings no engine of its own.

- `start_deepspeed_communication`: ZeRO-3 builds the model partitioned (`deepspeed.zero.Init` inside
  `from_pretrained`), which needs DeepSpeed's communication up first;
- `drop_fsdp_accelerate_cannot_build`, `warn_if_fsdp_dropped`: accelerate runs FSDP only on GPU backends and
  otherwise trains DDP without a word (or, up to 1.4, fails);
- `release_process_group_at_exit`: a process that leaves its process group to interpreter teardown can abort
  after its work is done (below).
"""

from __future__ import annotations

import atexit
import gc
import os
import time
import warnings
from typing import Any

import torch


def start_deepspeed_communication(args: Any) -> None:
    """Before a ZeRO-3 model is built: start DeepSpeed's communication over the process group accelerate set up
    (on CPUs accelerate starts torch.distributed itself, over gloo, and DeepSpeed would otherwise see 1 process)."""
    config = getattr(args, "hf_deepspeed_config", None)
    if config is None or not config.is_zero3() or args.world_size <= 1:  # world_size sets the processes up
        return
    from deepspeed import comm

    if not comm.is_initialized():
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
        comm.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def fsdp_asked(args: Any) -> bool:
    """FSDP asked for by the config (`fsdp`, `fsdp_config`) or by `accelerate launch`'s config."""
    return bool(args.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def drop_fsdp_accelerate_cannot_build(args: Any) -> None:
    """Before the trainer builds its accelerator: on a machine without a GPU, accelerate up to 1.4 refuses to build
    FSDP settings at all ("no available devices found") where later versions drop FSDP and train DDP. Do what the
    later ones do, so that one script behaves the same on both (`warn_if_fsdp_dropped` then says so)."""
    if not fsdp_asked(args) or args.device.type != "cpu":
        return
    from accelerate.utils import FullyShardedDataParallelPlugin

    try:
        FullyShardedDataParallelPlugin()
    except RuntimeError:
        os.environ["ACCELERATE_USE_FSDP"] = "false"
        args.fsdp = []


def warn_if_fsdp_dropped(trainer: Any, asked: bool) -> None:
    """accelerate runs FSDP only on GPU backends and otherwise drops it without a word: say what runs instead."""
    args = trainer.args
    if not asked or trainer.is_fsdp_enabled or not trainer.is_world_process_zero():
        return
    engine = "DDP" if args.world_size > 1 else "one process"
    warnings.warn(
        "FSDP was asked for (fsdp / fsdp_config, or the accelerate config), but accelerate runs FSDP only on GPUs "
        f"and this run has none ({args.device}): training with {engine} instead, each process holding the whole "
        "model, its gradients and optimizer state. For sharded training on CPUs use DeepSpeed ZeRO-3 "
        "(deepspeed=ds.json, `pip install 'sftune[deepspeed]'`).",
        stacklevel=3,
    )


_release_registered = False


def release_process_group_at_exit() -> None:
    """In a distributed run, let the communication threads finish at interpreter exit while Python is still whole.

    Left to teardown, a gloo worker thread can still be freeing its last collective's tensors when Python finalizes:
    it asks for the GIL, finalization ends the thread inside a C++ destructor, and the process dies with SIGABRT
    ("terminate called without an active exception") after all its work is done; torchrun then reports the job
    failed and stops the ranks still saving (pytorch/pytorch#190489). Typically a rank other than 0 leaves right
    after `train()` while rank 0 writes the model; a script that destroys the group itself is not spared.
    """
    global _release_registered
    if _release_registered or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    _release_registered = True
    atexit.register(_finish_communication)


def _finish_communication() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # The group lives on while a DDP/FSDP wrapper or a trainer in a reference cycle holds it: collect those now, so
    # that its destructor joins its threads here rather than in finalization's own collection.
    gc.collect()
    # A thread that finished a collective may still wait for the GIL to free the tensors it held: let it have the
    # GIL now (measured: 18 of 50 two-rank gloo runs aborted without this handler, 2 of 68 without this sleep, 0 of
    # 50 with it).
    time.sleep(0.05)
