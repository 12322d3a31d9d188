"""Guards on a training run: nothing silent, nothing lost on Ctrl-C.

- `NonFiniteGuard` stops training at the first non-finite loss or gradient norm (or skips such steps);
- `InterruptHandler` turns the first Ctrl-C into "finish this step, save a checkpoint, stop";
- `interrupted_error` is the error that says where that checkpoint is and how to resume from it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

from ..config import NONFINITE_MODES
from ..errors import NonFiniteTrainingError, TrainingInterrupted
from .checkpoints import CHECKPOINT_PREFIX, newest_complete_checkpoint

logger = logging.getLogger(__name__)


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
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {mode!r}.")
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
