"""Every exception sftune raises on purpose, in one place.

The CLI maps each to an exit code: a user's mistake (`UsageError`, `DatasetFormatError`, `NonFiniteWeightsError`)
is one line and exit 2, a run that failed (`NonFiniteTrainingError`, `CheckpointSaveError`) exit 1, and
`TrainingInterrupted` exit 130. The modules that raise them re-export them under their old import paths.
"""

from __future__ import annotations


class UsageError(Exception):
    """A mistake in the command line, the recipe or the files it names: shown as one line, exit code 2."""


class DatasetFormatError(ValueError):
    """A row of the dataset cannot be used; the message names the row, the column and the fix."""


class NonFiniteWeightsError(ValueError):
    """A model or checkpoint holds NaN or infinite weights."""


class NonFiniteTrainingError(RuntimeError):
    """The loss or the gradient norm stopped being a finite number."""


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, ...); nothing half-written was left behind."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training after saving a resumable checkpoint (`checkpoint`)."""

    def __init__(self, message: str, checkpoint: str | None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


class RenderError(ValueError):
    """A conversation's turn cannot be rendered as at inference (sftune.data.render); `turn` is its message index."""

    def __init__(self, turn: int, reason: str):
        super().__init__(reason)
        self.turn = turn


class RecipeError(ValueError):
    """A mistake in an `sftune iterate` recipe: named field, what is wrong, how to fix it."""


class VerifierError(RuntimeError):
    """A verifier raised (`sftune iterate`): names the prompt and the reply it was checking."""
