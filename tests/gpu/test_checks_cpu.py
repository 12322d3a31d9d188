"""The GPU tests' checks, run now on the CPU with a tiny model: they pass where they must, and they can fail."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from sftune.compat import dtype_kwargs
from tests.gpu import checks


def load(path, attn: str, dtype: torch.dtype = torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, **dtype_kwargs(dtype)).eval()


# bf16 eager on CPU is slow and adds nothing the GPU test does not cover.
@pytest.mark.parametrize(
    "attn, dtype",
    [("sdpa", torch.float32), ("eager", torch.float32), ("sdpa", torch.bfloat16)],
    ids=["sdpa-fp32", "eager-fp32", "sdpa-bf16"],
)
def test_packed_and_padding_free_losses_equal_each_document_alone(tiny_llama_path, attn, dtype):
    reference = load(tiny_llama_path, attn)
    model = reference if dtype == torch.float32 else load(tiny_llama_path, attn, dtype)
    documents = checks.random_documents(12, reference.config.vocab_size, seed=1)
    report = checks.packing_report(model, reference, documents, max_length=128)
    assert report.exact, str(report)
    assert report.tokens > 200
    if dtype == torch.bfloat16:
        assert 0 < report.rounding < 0.05, str(report)  # bf16 does round; a tolerance of 0 would be wrong


def test_a_document_that_sees_another_fails_the_check(tiny_llama_path):
    """Negative control: packed rows with a plain attention mask (documents see earlier ones) are far outside the
    bf16 tolerance, so the check separates rounding from leaking."""
    reference = load(tiny_llama_path, "sdpa")
    model = load(tiny_llama_path, "sdpa", torch.bfloat16)
    documents = checks.random_documents(12, reference.config.vocab_size, seed=1)
    report = checks.packing_report(model, reference, documents, max_length=128)
    batch = checks.collator_for(model)(checks.pack(documents, 128))
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    leaky = checks.stacked(checks.document_losses(model, batch), documents)
    alone = checks.stacked(checks.losses_in_batches(model, [[doc] for doc in documents]), documents)
    leak = float((leaky - alone).abs().max())
    assert leak > 10 * report.tolerance, f"leak {leak:.2e} vs {report}"


def test_flex_attention_packing_is_exact_uncompiled(tiny_llama_path, monkeypatch):
    """flex_attention adds a tensor mask to the scores; run it uncompiled (its reference path: the compiled one
    crashes on CPU) to check the mask sftune gives it. A boolean mask would add 1/0 and isolate nothing.
    Documents alone run on SDPA (same weights): alone, flex would build a block mask, which is slow on CPU."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    integration = pytest.importorskip("transformers.integrations.flex_attention")
    if not hasattr(integration, "compile_friendly_flex_attention"):
        pytest.skip("this transformers calls flex_attention differently")

    def uncompiled(query, key, value, training=False, **kwargs):
        return flex.flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(integration, "compile_friendly_flex_attention", uncompiled)
    reference = load(tiny_llama_path, "sdpa")
    model = load(tiny_llama_path, "flex_attention")
    documents = checks.random_documents(8, reference.config.vocab_size, seed=2)
    alone = checks.stacked(checks.losses_in_batches(reference, [[doc] for doc in documents]), documents)
    with pytest.warns(UserWarning, match="flex_attention"):  # torch's "called without torch.compile" notice
        packed = checks.stacked(checks.losses_in_batches(model, [checks.pack(documents, 96)]), documents)
        batches = [documents[:4], documents[4:]]
        padding_free = checks.stacked(checks.losses_in_batches(model, batches, padding_free=True), documents)
    torch.testing.assert_close(packed, alone, atol=checks.FLOAT32_FLOOR, rtol=0)
    torch.testing.assert_close(padding_free, alone, atol=checks.FLOAT32_FLOOR, rtol=0)


def test_chunked_loss_equals_the_models_own_loss_in_training(tiny_llama_path, tmp_path):
    _, chunked = checks.train_losses(tiny_llama_path, tmp_path / "chunked", max_steps=2)
    _, own = checks.train_losses(tiny_llama_path, tmp_path / "own", max_steps=2, loss_chunk_size=0)
    assert len(chunked) == len(own) == 2
    torch.testing.assert_close(torch.tensor(chunked), torch.tensor(own), atol=1e-4, rtol=1e-4)


def test_lora_loss_falls_saves_and_reloads_with_the_qlora_settings(learnable_llama_path, tmp_path):
    """The QLoRA GPU test's recipe without quantization: the same steps, learning rate and checks."""
    from sftune import ModelConfig

    model_config = ModelConfig(use_peft=True, lora_target_modules=["all-linear"], lora_dropout=0.0)
    trainer, losses = checks.lora_run(learnable_llama_path, tmp_path / "run", model_config, max_steps=12)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    checks.assert_adapters_save_and_reload(
        trainer, learnable_llama_path, model_config, tmp_path / "adapter", None, 1e-5
    )
