"""Run safety: nothing lost, nothing silent.

- `NonFiniteGuard` stops training at the first non-finite loss or gradient norm (or skips such steps);
- `InterruptHandler` turns the first Ctrl-C into "finish this step, save a checkpoint, stop";
- `AtomicCheckpoints` writes each checkpoint into a staging folder and renames it into place when complete;
- `resolve_resume_checkpoint` resumes from the newest complete checkpoint and says which it skipped.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

from ..errors import CheckpointSaveError, NonFiniteTrainingError, TrainingInterrupted

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
# Checkpoints are written here first; a kill mid-save leaves only this folder, which no resume ever reads.
STAGING_DIR = ".staging"
TRAINER_STATE = "trainer_state.json"
# sftune's own counters that transformers' TrainerState has no field for.
SFTUNE_STATE = "sftune_state.json"
NONFINITE_MODES = ("stop", "skip")


# --------------------------------------------------------------------------------------------------------------
# Non-finite loss and gradients
# --------------------------------------------------------------------------------------------------------------


class NonFiniteGuard(TrainerCallback):
    """Checks each optimizer step before it is applied: raw losses (before transformers' logging filter turns
    them into the running mean) and the gradient norm. `mode="stop"` raises `NonFiniteTrainingError` and leaves
    the weights and checkpoints as they were; `mode="skip"` drops the step's gradients and counts it."""

    def __init__(
        self, mode: str = "stop", check_gradients: bool = True, deepspeed_engine: Callable[[], Any] | None = None
    ) -> None:
        if mode not in NONFINITE_MODES:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_MODES}, got {mode!r}.")
        self.mode = mode
        # Under fp16 loss scaling, overflowing gradients are routine: the scaler skips those steps itself.
        self.check_gradients = check_gradients
        # Returns the DeepSpeed engine when training under DeepSpeed (None otherwise): its gradients live in its
        # own partitioned buffers, and it has already taken (or skipped) the step when callbacks run.
        self._deepspeed_engine = deepspeed_engine or (lambda: None)
        self._held_back_schedule: Any = None
        self.skipped_steps = 0
        self._losses: list[torch.Tensor] = []

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Called with every micro-batch's raw training loss."""
        self._losses.append(loss.detach().reshape(()).float())

    def on_pre_optimizer_step(
        self, args: Any, state: Any, control: Any, model: Any = None, lr_scheduler: Any = None, **kwargs: Any
    ) -> None:
        losses, self._losses = self._losses, []
        engine = self._deepspeed_engine()
        grad_norm = self._gradient_norm(model, engine) if self.check_gradients else None
        values = losses + ([grad_norm] if grad_norm is not None else [])
        # One device sync per optimizer step, taken by every rank (each has at least its loss): the same verdict.
        device = values[0].device if values else torch.device("cpu")
        bad = (
            (~torch.isfinite(torch.stack([v.to(device) for v in values]))).any().int()
            if values
            else torch.zeros((), dtype=torch.int, device=device)
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if not bad.item():
            return
        step = state.global_step + 1
        loss_text = ", ".join(f"{v.item():g}" for v in losses) or "not computed on this process"
        norm_text = f"{grad_norm.item():g}" if grad_norm is not None else "not computed"
        applied = engine is not None and engine.was_step_applied()
        if self.mode == "skip":
            if engine is not None:
                # DeepSpeed skips a step whose gradients are not finite, and then the learning-rate schedule is held
                # back too (its own, or the Trainer's: it sees the step reported skipped); step it as under every
                # other engine, so that the run follows the same schedule.
                scheduler = engine.lr_scheduler or getattr(lr_scheduler, "scheduler", lr_scheduler)
                if not applied and scheduler is not None:
                    self._held_back_schedule = scheduler  # stepped at the step's end, after its rate is logged
                if applied:
                    logger.warning("Step %d: DeepSpeed applied it before the non-finite loss was seen.", step)
            model.zero_grad(set_to_none=True)  # the optimizer leaves parameters without gradients alone
            self.skipped_steps += 1
            logger.warning(
                "Step %d skipped: loss %s, gradient norm %s (%d non-finite steps skipped so far).",
                step,
                loss_text,
                norm_text,
                self.skipped_steps,
            )
            return
        last = newest_complete_checkpoint(args.output_dir)[0] if os.path.isdir(args.output_dir) else None
        raise NonFiniteTrainingError(
            f"Training stopped at step {step}: the loss is {loss_text} and the gradient norm is {norm_text}, not "
            "finite numbers. Likely causes: a learning rate too high (learning_rate="
            f"{args.learning_rate:g}; try lowering it or adding warmup), bad data in this step's batch, or an "
            "overflow in reduced precision (fp16: use bf16 or fp32). "
            + ("DeepSpeed applied this step before it was seen; " if applied else "This step was not applied; ")
            + (f"the last good checkpoint is {last}. " if last else "no checkpoint was saved before it. ")
            + "To skip such steps instead of stopping, set on_nonfinite='skip'."
        )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._held_back_schedule is not None:
            self._held_back_schedule.step()
            self._held_back_schedule = None

    @staticmethod
    def _gradient_norm(model: Any, engine: Any) -> torch.Tensor | None:
        """The global gradient norm, the same number on every rank; None where there are no gradients to see."""
        if engine is not None:  # DeepSpeed computed it in its step, over all ranks' partitions
            norm = engine.get_global_grad_norm()
            return None if norm is None else torch.as_tensor(float(norm))
        grads = [p.grad for p in model.parameters() if p.grad is not None] if model is not None else []
        if not grads:
            return None
        norm = torch.nn.utils.get_total_norm(grads).float()
        if isinstance(norm, DTensor):  # FSDP2: sharded gradients give a partial norm; reduce it over ranks
            norm = norm.full_tensor()
        return norm


# --------------------------------------------------------------------------------------------------------------
# Ctrl-C
# --------------------------------------------------------------------------------------------------------------


class InterruptHandler(TrainerCallback):
    """First SIGINT: finish the current optimizer step, save a checkpoint, stop. Second SIGINT: stop at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def install(self) -> None:
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            self.uninstall()
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nInterrupted: finishing the current step and saving a checkpoint. Press Ctrl-C again to quit now "
            "without saving.",
            file=sys.stderr,
            flush=True,
        )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        requested = self.requested
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Ranks may see the signal a step apart; all must stop after the same step.
            flag = torch.tensor([int(requested)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            requested = self.requested = bool(flag.item())
        if requested:
            control.should_save = True
            control.should_training_stop = True


def interrupted_error(output_dir: str, step: int) -> TrainingInterrupted:
    checkpoint = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    return TrainingInterrupted(
        f"Training interrupted at step {step}; saved a resumable checkpoint to {checkpoint}. Resume with "
        f"`--resume_from_checkpoint {checkpoint}` on the command line, or trainer.train(resume_from_checkpoint=True).",
        checkpoint,
    )


# --------------------------------------------------------------------------------------------------------------
# Atomic checkpoints
# --------------------------------------------------------------------------------------------------------------


class AtomicCheckpoints:
    """Mixin for a `transformers.Trainer`: `checkpoint-N` appears only once complete (staged, then renamed).

    A save that fails (disk full, ...) removes its staging folder and raises `CheckpointSaveError` naming the
    cause and the place. Subclasses may define `_checkpoint_extra_state()` -> dict, saved as sftune_state.json.
    """

    _staging_run_dir: str | None = None

    def _get_output_dir(self, trial: Any) -> str:
        return self._staging_run_dir or super()._get_output_dir(trial)

    def _load_rng_state(self, checkpoint: Any) -> None:
        from ..compat import numpy_safe_globals

        with numpy_safe_globals():  # transformers 4.4x loads the numpy RNG state with torch's weights_only default
            super()._load_rng_state(checkpoint)

    def _save_checkpoint(self, model: Any, trial: Any, *args: Any, **kwargs: Any) -> None:
        # *args/**kwargs: transformers 4.x passes `metrics` too.
        run_dir = super()._get_output_dir(trial)
        name = f"{CHECKPOINT_PREFIX}{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING_DIR)
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        main = self.args.should_save
        if main:
            shutil.rmtree(staged, ignore_errors=True)  # left over from a run killed mid-save
            os.makedirs(staging_root, exist_ok=True)
        self.accelerator.wait_for_everyone()
        self._staging_run_dir = staging_root
        try:
            super()._save_checkpoint(model, trial, *args, **kwargs)
            if main:
                extra = getattr(self, "_checkpoint_extra_state", None)
                if extra is not None:
                    Path(staged, SFTUNE_STATE).write_text(json.dumps(extra()))
                self._point_best_checkpoint_at(run_dir, staged)
        except BaseException as err:
            if main:
                shutil.rmtree(staged, ignore_errors=True)
                _remove_if_empty(staging_root)
            if is_disk_full(err):
                free = shutil.disk_usage(run_dir).free
                raise CheckpointSaveError(
                    f"The disk is full: could not save {name} to {run_dir} ({free / 2**20:.0f} MiB free). The "
                    "partial checkpoint was removed. Free some space, point output_dir at a larger disk, or keep "
                    "fewer checkpoints (save_total_limit)."
                ) from err
            raise
        finally:
            self._staging_run_dir = None
        self.accelerator.wait_for_everyone()
        if main:
            publish(staged, final)
            _remove_if_empty(staging_root)
            _rotate(self, run_dir)
        self.accelerator.wait_for_everyone()

    def _point_best_checkpoint_at(self, run_dir: str, staged: str) -> None:
        # transformers looked for the best checkpoint in the staging folder; point it at the final place.
        best_step = best_global_step(self.state)
        if not best_step:
            return
        best = os.path.join(run_dir, f"{CHECKPOINT_PREFIX}{best_step}")
        if best_step == self.state.global_step or os.path.isdir(best):
            self.state.best_model_checkpoint = best
            self.state.save_to_json(os.path.join(staged, TRAINER_STATE))


def best_global_step(state: Any) -> int | None:
    """The best checkpoint's step: `state.best_global_step` (transformers >= 4.50), else read from the folder name
    of `best_model_checkpoint`."""
    step = getattr(state, "best_global_step", None)
    if step is None and state.best_model_checkpoint:
        suffix = os.path.basename(os.path.normpath(state.best_model_checkpoint)).rsplit("-", 1)[-1]
        step = int(suffix) if suffix.isdigit() else None
    return step


def publish(staged: str, final: str) -> None:
    """Move a complete checkpoint into place; an older one of the same name is replaced, never half-deleted."""
    old = None
    if os.path.exists(final):
        old = staged + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_if_empty(folder: str) -> None:
    try:
        os.rmdir(folder)
    except OSError:  # not empty (another run's staging) or already gone
        pass


def _rotate(trainer: Any, run_dir: str) -> None:
    from ..compat import rotate_checkpoints

    rotate_checkpoints(run_dir, trainer.args.save_total_limit, trainer.state.best_model_checkpoint)


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC, or torch's zip writer's way of reporting it ("unexpected pos")."""
    for cause in (err, err.__cause__, err.__context__):
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(cause, RuntimeError) and ("unexpected pos" in str(cause) or "No space left" in str(cause)):
            return True
    return False


# --------------------------------------------------------------------------------------------------------------
# Resuming
# --------------------------------------------------------------------------------------------------------------


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """transformers writes trainer_state.json last; without it a checkpoint was cut short."""
    return Path(path, TRAINER_STATE).is_file()


def newest_complete_checkpoint(folder: str | os.PathLike) -> tuple[str | None, list[str]]:
    """(the newest complete `checkpoint-N` in `folder` or None, the incomplete ones newer than it)."""
    found = []
    for entry in Path(folder).iterdir() if Path(folder).is_dir() else []:
        suffix = entry.name.removeprefix(CHECKPOINT_PREFIX)
        if entry.name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit() and entry.is_dir():
            found.append((int(suffix), str(entry)))
    skipped = []
    for _, path in sorted(found, reverse=True):
        if is_complete_checkpoint(path):
            return path, skipped
        skipped.append(path)
    return None, skipped


def resolve_resume_checkpoint(resume: str | bool | None, output_dir: str) -> str | None:
    """`resume_from_checkpoint` as a path: True means the newest complete checkpoint in `output_dir`."""
    if resume is None or resume is False:
        return None
    if resume is True:
        path, skipped = newest_complete_checkpoint(output_dir)
        if skipped:
            logger.warning(
                "Skipping incomplete checkpoints (cut short while saving): %s. Resuming from %s.",
                ", ".join(skipped),
                path or "nothing",
            )
        if path is None:
            raise ValueError(
                f"resume_from_checkpoint=True but {output_dir} has no complete checkpoint to resume from"
                + (f" (incomplete: {', '.join(skipped)})." if skipped else ".")
                + " Train without resuming, or give the path of a checkpoint."
            )
        logger.info("Resuming from %s", path)
        return path
    path = str(resume)
    if not os.path.isdir(path):
        raise ValueError(f"resume_from_checkpoint={path!r}: no such checkpoint folder.")
    if not is_complete_checkpoint(path):
        newest = newest_complete_checkpoint(Path(path).parent)[0]
        raise ValueError(
            f"Checkpoint {path} is incomplete (no {TRAINER_STATE}: its save was cut short). "
            + (f"Resume from {newest} instead." if newest else "There is no complete checkpoint next to it.")
        )
    return path


def read_extra_state(checkpoint: str | None) -> dict[str, Any]:
    if checkpoint is None:
        return {}
    path = Path(checkpoint, SFTUNE_STATE)
    return json.loads(path.read_text()) if path.is_file() else {}
