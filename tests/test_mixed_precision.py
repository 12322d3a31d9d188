"""bf16 on a machine without a GPU: bf16 autocast over fp32 master weights, no extra flag; the default where native."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments

import sftune.config
from sftune import IterativeSFTConfig, SFTConfig, SFTTrainer

ROWS = [{"prompt": f"Say {w}:", "completion": f" {w} {w} {w}"} for w in ["red", "blue", "green", "teal"] * 2]

needs_cpu_bf16 = pytest.mark.skipif(
    torch.cuda.is_available() or not sftune.config.cpu_supports_bf16(),
    reason="needs a CPU-only machine whose CPU has bf16 support (x86 AVX-512 or AMX, Arm BF16)",
)


@needs_cpu_bf16
def test_bf16_without_gpu_needs_no_extra_flag(tmp_path):
    assert SFTConfig(output_dir=str(tmp_path), bf16=True).use_cpu
    assert IterativeSFTConfig(output_dir=str(tmp_path), bf16=True).use_cpu
    assert not SFTConfig(output_dir=str(tmp_path), bf16=False).use_cpu


def test_cpu_without_bf16_gets_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sftune.config, "cpu_supports_bf16", lambda: False)
    with pytest.raises(ValueError, match="no GPU and its CPU has no bfloat16 support.*bf16=False"):
        SFTConfig(output_dir=str(tmp_path), bf16=True)


def train(tiny_llama_path, tmp_path, bf16: bool):
    args = SFTConfig(output_dir=str(tmp_path / f"bf16-{bf16}"), max_steps=3, per_device_train_batch_size=4,
                     learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", seed=0,
                     disable_tqdm=True, bf16=bf16)  # fmt: skip
    trainer = SFTTrainer(str(tiny_llama_path), args=args, train_dataset=Dataset.from_list(ROWS))
    seen = []
    mlp = trainer.model.model.layers[0].mlp.down_proj
    hook = mlp.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    trainer.train()
    hook.remove()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return trainer, set(seen), losses


@needs_cpu_bf16
def test_bf16_trains_in_mixed_precision_with_the_chunked_loss(tiny_llama_path, tmp_path):
    trainer, dtypes, losses = train(tiny_llama_path, tmp_path, bf16=True)
    assert trainer._chunked_loss is not None and trainer._chunked_loss.active  # the first-step check passed
    assert dtypes == {torch.bfloat16}  # matmuls ran under autocast, inside the model's own forward
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}  # master weights
    states = [s for s in trainer.optimizer.state.values() if "exp_avg" in s]
    assert states and {s["exp_avg"].dtype for s in states} == {torch.float32}
    _, fp32_dtypes, fp32_losses = train(tiny_llama_path, tmp_path, bf16=False)
    assert fp32_dtypes == {torch.float32}
    for got, want in zip(losses, fp32_losses, strict=True):
        assert abs(got - want) <= 0.01 * want  # the same training, to bf16 precision
    assert losses != fp32_losses  # ... but really in bf16 (transformers 4.x logs losses to 4 digits: one may agree)


def test_mfu_is_measured_against_the_peak_of_the_precision_training_runs_in():
    """Under bf16 autocast the matmuls run in bf16, so MFU must divide by the bf16 peak, not the fp32 one."""
    from types import SimpleNamespace

    from sftune.throughput import matmul_dtype, measured_matmul_flops

    model = torch.nn.Linear(2, 2)
    assert matmul_dtype(SimpleNamespace(bf16=True, fp16=False), model) == torch.bfloat16
    assert matmul_dtype(SimpleNamespace(bf16=False, fp16=True), model) == torch.float16
    assert matmul_dtype(SimpleNamespace(bf16=False, fp16=False), model) == torch.float32
    assert measured_matmul_flops("cpu", size=64, repeats=1, dtype=torch.bfloat16) > 0


def cpuinfo_has_native_bf16() -> bool:
    """From the kernel's CPU flags, independently of torch: AVX512-BF16 or AMX-BF16."""
    flags = Path("/proc/cpuinfo").read_text().split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


@pytest.mark.skipif(torch.cuda.is_available() or not Path("/proc/cpuinfo").exists(), reason="CPU-only Linux")
def test_bf16_is_the_default_where_the_cpu_has_it_natively_and_an_explicit_value_wins(tmp_path):
    native = cpuinfo_has_native_bf16()
    for config_class in (SFTConfig, IterativeSFTConfig):
        assert config_class(output_dir=str(tmp_path)).bf16 is native
        assert config_class(output_dir=str(tmp_path), bf16=False).bf16 is False
    # Plain TrainingArguments say bf16=False themselves: converted, they stay float32.
    trainer_args = sftune.config.convert_training_arguments(TrainingArguments(output_dir=str(tmp_path)), SFTConfig)
    assert trainer_args.bf16 is False
