"""One small SFT run under a chosen engine, launched by `torchrun` (or plain python for 1 process).

    torchrun --nproc_per_node 2 tests/dist_worker.py MODEL OUT --engine fsdp2 [--resume] [--interrupt_at 2]
        [--nan_at 3 --nan_rank 1] [--on_nonfinite skip] [--head_unit] [--packing] [--steps 4]

Rank 0 writes OUT/result.json: the logged losses, learning rates and token accuracies, the engine that actually ran,
whether the chunked loss was used, and how the run ended. Unless interrupted, the final model is saved with
`save_model()` to OUT/final, which the tests load with plain `from_pretrained` (the weights compared with 1 process).

`--engine fsdp2` on CPU needs accelerate to take its FSDP path, which it keeps for GPU backends only; the shim for
that lives here, in the tests, not in sftune.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

WORDS = ["red", "blue", "green", "amber", "violet", "teal", "gold", "pink"]
# Rows of different lengths, some with their trained tokens late: ranks disagree on what their batches hold.
ROWS = [
    {"messages": [{"role": "user", "content": f"Say {w} {n}." + " please" * (3 * (n % 3))},
                  {"role": "assistant", "content": f"{w} " * n}]}
    for n, w in enumerate(WORDS * 2, start=1)
]  # fmt: skip
GLOBAL_BATCH = 4


def deepspeed_config(stage: int) -> dict:
    return {
        "zero_optimization": {"stage": stage},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }


def take_fsdp_path_on_cpu() -> None:
    """Test shim: accelerate drops an FSDP plugin unless the backend is a GPU's; torch's FSDP2 runs on CPU over
    gloo, so make accelerate keep the plugin it was given."""
    from accelerate.state import AcceleratorState, DistributedType, PartialState

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init


class Poison(TrainerCallback):
    """Makes the loss of one rank's micro-batches NaN during one optimizer step (1-based)."""

    def __init__(self, model, step: int, rank: int) -> None:
        self.step, self.active = step, False
        if int(os.environ.get("RANK", 0)) == rank:
            model.get_input_embeddings().register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        return output * float("nan") if self.active else output

    def on_step_begin(self, args, state, control, **kwargs):
        self.active = state.global_step + 1 == self.step


class CtrlC(TrainerCallback):
    """Sends SIGINT to rank 0 alone during one step: every rank must stop after that same step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step and int(os.environ.get("RANK", 0)) == 0:
            os.kill(os.getpid(), signal.SIGINT)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--engine", default="ddp", choices=["ddp", "fsdp2", "zero2", "zero3"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--interrupt_at", type=int, default=0)
    parser.add_argument("--nan_at", type=int, default=0)
    parser.add_argument("--nan_rank", type=int, default=0)
    parser.add_argument("--on_nonfinite", default="stop")
    parser.add_argument("--head_unit", action="store_true", help="FSDP2: the output layer is its own shard unit")
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--no_shim", action="store_true", help="FSDP2: leave accelerate as it is (DDP on CPU)")
    parser.add_argument("--state_dict_type", default="SHARDED_STATE_DICT")
    parser.add_argument("--check_tokens", type=int, default=0, help="the last rank's first-step check window")
    options = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # launched in the background: SIGINT ignored
    world = int(os.environ.get("WORLD_SIZE", 1))
    torch.set_num_threads(1)

    from sftune import SFTConfig, SFTTrainer
    from sftune.errors import NonFiniteTrainingError, TrainingInterrupted

    check_windows = record_check_windows(options.check_tokens)

    engine = {}
    if world > 1 and options.engine == "fsdp2":
        if not options.no_shim:
            take_fsdp_path_on_cpu()
        wrap = ["LlamaDecoderLayer"] + (["Linear"] if options.head_unit else [])
        fsdp_config = {"transformer_layer_cls_to_wrap": wrap, "state_dict_type": options.state_dict_type}
        if not options.no_shim:  # FSDP2 where it runs; left out, accelerate's choice on every version (then dropped)
            fsdp_config["fsdp_version"] = 2
        engine = dict(fsdp="full_shard", fsdp_config=fsdp_config)
    elif world > 1 and options.engine.startswith("zero"):
        engine = dict(deepspeed=deepspeed_config(int(options.engine[-1])))
    args = SFTConfig(output_dir=f"{options.out}/run", max_steps=options.steps, learning_rate=1e-3,
                     per_device_train_batch_size=GLOBAL_BATCH // world, logging_steps=1, save_strategy="steps",
                     save_steps=2, report_to="none", seed=0, disable_tqdm=True, max_seq_length=64, bf16=False,
                     packing=options.packing, on_nonfinite=options.on_nonfinite, lr_scheduler_type="linear",
                     **engine)  # fmt: skip
    trainer = SFTTrainer(options.model, args=args, train_dataset=Dataset.from_list(ROWS))
    if options.nan_at:
        trainer.add_callback(Poison(trainer.model, options.nan_at, options.nan_rank))
    if options.interrupt_at:
        trainer.add_callback(CtrlC(options.interrupt_at))
    ended = "done"
    try:
        trainer.train(resume_from_checkpoint=True if options.resume else None)
    except TrainingInterrupted:
        ended = "interrupted"
    except NonFiniteTrainingError:
        ended = "nonfinite"
    if ended == "done":
        trainer.save_model(f"{options.out}/final")
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, check_windows)
        check_windows = gathered
    if trainer.is_world_process_zero():
        history = [e for e in trainer.state.log_history if "loss" in e]
        state = trainer._chunked_loss
        result = {
            "ended": ended,
            "global_step": trainer.state.global_step,
            "losses": [e["loss"] for e in history],
            "learning_rates": [e["learning_rate"] for e in history],
            "accuracies": [e.get("mean_token_accuracy") for e in history],
            "num_tokens": [e.get("num_tokens") for e in history],
            "skipped": trainer.skipped_nonfinite_steps,
            "engine": engine_name(trainer),
            "chunked": state is not None and state.checked and state.active,
            "check_windows": check_windows,  # per rank: did its first batch have a trained token in the window
        }
        Path(options.out, "result.json").write_text(json.dumps(result))
    if world > 1:
        torch.distributed.destroy_process_group()


def record_check_windows(check_tokens: int) -> list:
    """Records whether this rank's batch had a trained token in the first-step check's window. `check_tokens`
    narrows the last rank's window (to 1 token: no trained token in it), so that the ranks' batches disagree."""
    from sftune import loss

    world = int(os.environ.get("WORLD_SIZE", 1))
    if check_tokens and world > 1 and int(os.environ.get("RANK", 0)) == world - 1:
        loss.CHECK_TOKENS = check_tokens
    seen: list = []
    original = loss._check_once

    def check_once(model, state, own, arguments, extra):
        seen.append(bool((arguments["labels"][:, 1 : loss.CHECK_TOKENS] != -100).any()))
        return original(model, state, own, arguments, extra)

    loss._check_once = check_once
    return seen


def engine_name(trainer) -> str:
    if trainer.is_deepspeed_enabled:
        return f"zero{trainer.accelerator.deepspeed_plugin.zero_stage}"
    if trainer.is_fsdp_enabled:
        return f"fsdp{trainer.accelerator.state.fsdp_plugin.fsdp_version}"
    if isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel):
        return "ddp"
    return "single"


if __name__ == "__main__":
    main(sys.argv[1:])
