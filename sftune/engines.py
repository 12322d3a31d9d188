"""What sftune needs from the distributed engines accelerate runs (DDP, FSDP2, DeepSpeed ZeRO), and nothing more:
sftune brings no engine of its own.

- `start_deepspeed_communication`: ZeRO-3 builds the model partitioned (`deepspeed.zero.Init` inside
  `from_pretrained`), which needs DeepSpeed's communication up first;
- `warn_if_fsdp_dropped`: accelerate runs FSDP only on GPU backends and otherwise trains DDP without a word.
"""

from __future__ import annotations

import os
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


def warn_if_fsdp_dropped(trainer: Any) -> None:
    """accelerate runs FSDP only on GPU backends and otherwise drops it without a word: say what runs instead."""
    args = trainer.args
    from_launcher = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"  # `accelerate launch`'s config
    if not (args.fsdp or from_launcher) or trainer.is_fsdp_enabled or not trainer.is_world_process_zero():
        return
    engine = "DDP" if args.world_size > 1 else "one process"
    warnings.warn(
        "FSDP was asked for (fsdp / fsdp_config, or the accelerate config), but accelerate runs FSDP only on GPUs "
        f"and this run has none ({args.device}): training with {engine} instead, each process holding the whole "
        "model, its gradients and optimizer state. For sharded training on CPUs use DeepSpeed ZeRO-3 "
        "(deepspeed=ds.json, `pip install 'sftune[deepspeed]'`).",
        stacklevel=3,
    )
