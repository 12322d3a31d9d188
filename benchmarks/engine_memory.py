"""Memory per rank under DDP, FSDP2 and DeepSpeed ZeRO-3: 2 processes (gloo, CPU), SmolLM2-135M-Instruct.

    python benchmarks/engine_memory.py [--engines ddp fsdp2 zero3] [--steps 2] [--max-length 256]

Each engine is a fresh `torchrun --nproc_per_node 2` job running 2 optimizer steps of sftune's SFTTrainer (chunked
loss, fp32, AdamW). Every rank reports:
- the bytes it holds, counted from the tensors themselves: parameters (its FSDP2 shard / ZeRO-3 partition, or the
  whole model), gradients (measured before the optimizer step; ZeRO-3's gradient partition buffer), AdamW state
  (exp_avg + exp_avg_sq, plus ZeRO-3's fp32 master partition);
- its peak RSS, its RSS after training, and the RSS before the model was loaded (the Python/torch baseline). RSS on
  CPU also counts activations, the allocator's freed-but-kept pages, the whole model each rank loads before FSDP2
  shards it, and the gathered layers and communication buckets of FSDP2/ZeRO-3.

Sharded engines should show about 1/N of DDP's parameters, gradients and optimizer state. FSDP2 on CPU goes through
the tests' shim (accelerate keeps FSDP for GPU backends only); on GPUs it is accelerate's own path.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def local_bytes(tensor) -> int:
    """Bytes this rank holds for `tensor`: its DTensor shard, its ZeRO-3 partition, or the whole tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.to_local()
    partition = getattr(tensor, "ds_tensor", None)
    if partition is not None:
        return partition.numel() * partition.element_size()
    return tensor.numel() * tensor.element_size()


def worker(engine: str, steps: int, max_length: int, out: str) -> None:
    import torch

    baseline = rss_gib()
    import datasets
    from transformers import TrainerCallback

    from benchmarks.compare import synthetic_rows
    from sftune import SFTConfig, SFTTrainer
    from sftune.models import smollm2_path
    from tests.dist_worker import deepspeed_config, take_fsdp_path_on_cpu

    torch.set_num_threads(1)
    extra = {}
    if engine == "fsdp2":
        take_fsdp_path_on_cpu()
        extra = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2,
                                                      "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})  # fmt: skip
    elif engine.startswith("zero"):
        config = deepspeed_config(int(engine[-1]))
        # As transformers' DeepSpeed docs recommend: buckets sized from the model ("auto"), not DeepSpeed's defaults
        # of 5e8 elements (fine on a GPU cluster, a large share of RAM here).
        config["zero_optimization"].update({key: "auto" for key in (
            "reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")})  # fmt: skip
        extra = dict(deepspeed=config)
    measured: dict = {}

    class Measure(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if "grad_bytes" not in measured:
                measured["grad_bytes"] = sum(local_bytes(p.grad) for p in model.parameters() if p.grad is not None)

    args = SFTConfig(output_dir=f"{out}/run", max_steps=steps, per_device_train_batch_size=1, packing=True,
                     max_length=max_length, learning_rate=1e-4, logging_steps=1, save_strategy="no",
                     report_to="none", seed=0, disable_tqdm=True, bf16=False, **extra)  # fmt: skip
    trainer = SFTTrainer(str(smollm2_path()), args=args, train_dataset=datasets.Dataset.from_list(synthetic_rows(200)),
                         callbacks=[Measure()])  # fmt: skip
    trainer.train()
    model = trainer.model
    params = sum(local_bytes(p) for p in model.parameters())
    optimizer_bytes = 0
    if trainer.is_deepspeed_enabled:
        zero = trainer.model_wrapped.optimizer
        inner = zero.optimizer
        masters = getattr(zero, "fp32_partitioned_groups_flat", [])
        optimizer_bytes += sum(t.numel() * t.element_size() for t in masters)
        buffer = getattr(zero, "grad_partitions_flat_buffer", None)
        if buffer is not None and not measured.get("grad_bytes"):
            measured["grad_bytes"] = buffer.numel() * buffer.element_size()
    else:
        inner = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    for state in inner.state.values():
        optimizer_bytes += sum(local_bytes(v) for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0)
    rank = int(os.environ.get("RANK", 0))
    record = {
        "rank": rank,
        "params_gib": round(params / 2**30, 4),
        "grads_gib": round(measured.get("grad_bytes", 0) / 2**30, 4),
        "optimizer_state_gib": round(optimizer_bytes / 2**30, 4),
        "baseline_rss_gib": round(baseline, 3),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "rss_after_training_gib": round(rss_gib(), 3),
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", default=["ddp", "fsdp2", "zero3"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        engine, out, _ = options.worker
        worker(engine, options.steps, options.max_length, out)
        return
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for engine in options.engines:
        with tempfile.TemporaryDirectory() as out:
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                       "29650", __file__, "--steps", str(options.steps), "--max-length", str(options.max_length),
                       "--worker", engine, out, "x"]  # fmt: skip
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(json.dumps({"engine": engine, "error": done.stdout[-2000:] + done.stderr[-2000:]}), flush=True)
                continue
            ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
        print(json.dumps({"engine": engine, "processes": 2, "max_length": options.max_length, "ranks": ranks}),
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
