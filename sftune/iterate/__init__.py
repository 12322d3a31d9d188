"""Expert iteration (rejection-sampling fine-tuning): sample k replies per prompt, keep those a verifier accepts,
train on the exact tokens the model drew, repeat. `sftune iterate --config recipe.yaml [--resume]`."""

from .loop import Example, Run, iterate
from .prompts import Prompt, inference_prompt_ids, stop_token_ids
from .recipe import IterateConfig, RecipeError
from .sampling import sample_all, sample_batch
from .verifiers import VerifierError, make_verifier

__all__ = ["Example", "IterateConfig", "Prompt", "RecipeError", "Run", "VerifierError", "inference_prompt_ids",
           "iterate", "make_verifier", "sample_all", "sample_batch", "stop_token_ids"]  # fmt: skip
