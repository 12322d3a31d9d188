"""use_liger=True on a CUDA GPU gives the loss training without it gives.

Its own file, run after tests/gpu/test_cuda.py: Liger patches transformers' modules globally (rotary embedding),
so every run without it comes first.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.gpu import checks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="needs liger-kernel"),
]


@pytest.mark.parametrize("loss_chunk_size", [1024, 0], ids=["chunked", "model_loss"])
def test_use_liger_gives_the_same_loss(gpu_model_path, loss_chunk_size, tmp_path):
    """Liger's Triton kernels (RMSNorm, SwiGLU, RoPE, and with the model's own loss its fused linear
    cross-entropy) compute the same functions in another order: bf16 rounding apart, as in the chunked-loss test
    (0.02 at step 1 on ~7 nats; 3% later as updates drift)."""
    common = dict(max_steps=6, bf16=True, loss_chunk_size=loss_chunk_size, model_init_kwargs={"dtype": "bfloat16"})
    _, plain = checks.train_losses(gpu_model_path, tmp_path / "plain", **common)
    trainer, liger = checks.train_losses(gpu_model_path, tmp_path / "liger", use_liger=True, **common)
    patched = {m._get_name() for m in trainer.model.modules() if m._get_name().startswith("Liger")}
    checks.record("liger", model=gpu_model_path.name, chunk=loss_chunk_size, plain=plain, liger=liger,
                  patched=sorted(patched))  # fmt: skip
    assert trainer.args.use_liger_kernel and "LigerRMSNorm" in patched, patched
    assert abs(plain[0] - liger[0]) <= 0.02, (plain, liger)
    torch.testing.assert_close(torch.tensor(liger), torch.tensor(plain), rtol=0.03, atol=0)
