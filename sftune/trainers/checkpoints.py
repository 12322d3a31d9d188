"""Checkpoints: atomic saves and resuming from the newest complete one.

- `AtomicCheckpoints` writes each checkpoint into a staging folder and renames it into place when complete, then
  rotates old ones (`save_total_limit`);
- `resolve_resume_checkpoint` resumes from the newest complete checkpoint and says which it skipped;
- `read_extra_state` reads sftune's own counters saved beside transformers' trainer state.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from ..compat import best_global_step, numpy_safe_globals, read_indexed_cpu_locations, rotate_checkpoints
from ..errors import CheckpointSaveError

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
# Checkpoints are written here first; a kill mid-save leaves only this folder, which no resume ever reads.
STAGING_DIR = ".staging"
TRAINER_STATE = "trainer_state.json"
# sftune's own counters that transformers' TrainerState has no field for.
SFTUNE_STATE = "sftune_state.json"


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

    def _load_optimizer_and_scheduler(self, checkpoint: Any) -> None:
        read_indexed_cpu_locations()
        super()._load_optimizer_and_scheduler(checkpoint)

    def _load_rng_state(self, checkpoint: Any) -> None:
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
    skipped: list[str] = []
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
