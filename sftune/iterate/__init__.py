"""Expert iteration (rejection-sampling fine-tuning): sample k replies per prompt, keep those a verifier accepts,
train on the exact tokens the model drew, repeat. `sftune iterate --config recipe.yaml [--resume]`."""

from .loop import Example, Run, iterate
from .prompts import Prompt, prompt_ids
from .recipe import IterateConfig, RecipeError
from .sampling import sample_all, sample_batch
from .verifiers import VerifierError, make_verifier

__all__ = ["Example", "IterateConfig", "Prompt", "RecipeError", "Run", "VerifierError", "iterate",
           "make_verifier", "prompt_ids", "sample_all", "sample_batch"]  # fmt: skip
