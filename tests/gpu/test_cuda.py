"""sftune on a CUDA GPU: bf16 training, exact packing on every attention kernel, QLoRA, the MFU table.

Run in a GPU session with `pytest -m gpu` (benchmarks/gpu_session.sh); skipped where no CUDA device is visible.
The checks themselves (tests/gpu/checks.py) also run on the CPU in every test run (tests/gpu/test_checks_cpu.py).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from sftune import ModelConfig, SFTConfig, SFTTrainer, get_kbit_device_map, get_quantization_config
from sftune.compat import dtype_kwargs
from sftune.throughput import GPU_PEAK_FLOPS, peak_flops
from tests.gpu import checks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def attention_implementations() -> list[str]:
    """Every attention sftune may run on a GPU without flash-attn: SDPA, eager, and flex_attention if offered."""
    names = ["sdpa", "eager"]
    try:
        from transformers import AttentionInterface
    except ImportError:  # transformers < 4.48: no flex_attention registry
        return names
    if "flex_attention" in AttentionInterface._global_mapping:
        names.append("flex_attention")
    return names


ATTENTION = attention_implementations()
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")


def load(path, attn: str, dtype: torch.dtype):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, **dtype_kwargs(dtype)).to("cuda").eval()


# ---------------------------------------------------------------------------------------------------------------
# 1. bf16 on CUDA: exact packing and padding-free batches, the chunked loss equals the model's own
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ATTENTION)
def test_packed_and_padding_free_losses_equal_each_document_alone_in_bf16(gpu_model_path, attn):
    reference = load(gpu_model_path, attn, torch.float32)
    model = load(gpu_model_path, attn, torch.bfloat16)
    # Documents up to 700 tokens in rows of 2048, as in real training: the kernels tile them as they would there.
    documents = checks.random_documents(40, model.config.vocab_size, seed=1, high=700)
    report = checks.packing_report(model, reference, documents, max_length=2048, batch_size=8)
    checks.record("packing_bf16", model=gpu_model_path.name, attn=attn, **vars(report))
    assert report.exact, str(report)
    assert 0 < report.rounding < 0.2, str(report)  # bf16 does round; far more would mean a broken reference


@pytest.mark.parametrize("attn", ATTENTION)
@pytest.mark.parametrize("packing", [False, True], ids=["padding_free", "packed"])
def test_bf16_training_on_cuda(gpu_model_path, attn, packing, tmp_path):
    trainer, losses = checks.train_losses(
        gpu_model_path,
        tmp_path,
        max_steps=8,
        bf16=True,
        packing=packing,
        model_init_kwargs={"dtype": "bfloat16", "attn_implementation": attn},
    )
    model = trainer.model
    assert next(model.parameters()).device.type == "cuda" and model.dtype == torch.bfloat16
    assert trainer.data_collator.attn_implementation == attn
    checks.record("train_bf16", model=gpu_model_path.name, attn=attn, packing=packing, losses=losses)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses


class RecordMatmulDtype(TrainerCallback):
    """Records the output dtype of the first attention projection at every training forward."""

    def __init__(self) -> None:
        self.seen: list[torch.dtype] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, out: self.seen.append(out.dtype))


@pytest.mark.parametrize("loss_chunk_size", [1024, 0], ids=["chunked", "model_loss"])
def test_bf16_mixed_precision_runs_the_matmuls_in_bf16(gpu_model_path, loss_chunk_size, tmp_path):
    """float32 weights with bf16=True: accelerate's autocast must reach every layer on both loss paths."""
    record = RecordMatmulDtype()
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, bf16=True,
                     loss_chunk_size=loss_chunk_size, report_to="none", save_strategy="no", max_length=128,
                     disable_tqdm=True)  # fmt: skip
    trainer = SFTTrainer(str(gpu_model_path), args=args, train_dataset=checks.text_dataset(), callbacks=[record])
    assert trainer.model.dtype == torch.float32
    trainer.train()
    assert record.seen and set(record.seen) == {torch.bfloat16}, record.seen


@pytest.mark.parametrize("weights", ["bfloat16", "float32"])
def test_chunked_loss_equals_the_models_own_loss_in_bf16(gpu_model_path, weights, tmp_path):
    """Same weights, data and steps; only the loss path differs. Step 1 sees identical weights: the two differ
    only by bf16 rounding of the logits (relative 2^-8 per logit, averaged over ~hundreds of tokens), so 0.02 on
    a loss of ~7 nats is generous; later steps follow updates that differ by that rounding, hence 3%. A wrong
    normalisation, shift or mask moves the loss by far more (halving, or ~1 nat on this model)."""
    common = dict(max_steps=6, bf16=True, model_init_kwargs={"dtype": weights})
    _, chunked = checks.train_losses(gpu_model_path, tmp_path / "chunked", **common)
    _, own = checks.train_losses(gpu_model_path, tmp_path / "own", loss_chunk_size=0, **common)
    checks.record("chunked_vs_own", model=gpu_model_path.name, weights=weights, chunked=chunked, own=own)
    assert abs(chunked[0] - own[0]) <= 0.02, (chunked, own)
    torch.testing.assert_close(torch.tensor(chunked), torch.tensor(own), rtol=0.03, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# 2. QLoRA: 4-bit and 8-bit base models with LoRA adapters
# ---------------------------------------------------------------------------------------------------------------


def test_kbit_helpers_produce_working_configs():
    four = get_quantization_config(ModelConfig(load_in_4bit=True, torch_dtype="bfloat16", use_bnb_nested_quant=True))
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.bfloat16
    assert get_quantization_config(ModelConfig(load_in_8bit=True)).load_in_8bit
    assert get_quantization_config(ModelConfig()) is None
    assert get_kbit_device_map() == {"": torch.cuda.current_device()}


@needs_bnb
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_saves_and_reloads(gpu_model_path, bits, tmp_path):
    model_config = ModelConfig(
        torch_dtype="bfloat16",
        load_in_4bit=bits == 4,
        load_in_8bit=bits == 8,
        use_peft=True,
        lora_target_modules=["all-linear"],
        lora_dropout=0.0,
    )
    trainer, losses = checks.lora_run(gpu_model_path, tmp_path / "run", model_config, bf16=True)
    quantized = {type(m).__name__ for m in trainer.model.modules()} & {"Linear4bit", "Linear8bitLt"}
    assert quantized == {"Linear4bit" if bits == 4 else "Linear8bitLt"}
    checks.record("qlora", model=gpu_model_path.name, bits=bits, losses=losses)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses

    # Quantizing the same weights again gives the same codes, and the adapters are equal: the same model.
    checks.assert_adapters_save_and_reload(
        trainer, gpu_model_path, model_config, tmp_path / "adapter", torch.bfloat16, 1e-3
    )


# ---------------------------------------------------------------------------------------------------------------
# 5. The MFU table against the GPU's measured bf16 matmul rate
# ---------------------------------------------------------------------------------------------------------------


def measured_bf16_matmul_flops(size: int = 8192, repeats: int = 10) -> float:
    """Median rate of a size^3 bf16 product on random data, timed with CUDA events after warm-up."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16, generator=generator)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16, generator=generator)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * size**3 / sorted(times)[len(times) // 2]


def test_mfu_table_entry_is_the_gpus_dense_bf16_peak():
    name = torch.cuda.get_device_name()
    keys = [key for key in GPU_PEAK_FLOPS if key in name]
    table = peak_flops("cuda")
    measured = measured_bf16_matmul_flops()
    checks.record("matmul_peak", device=name, table_tflops=table / 1e12, measured_tflops=measured / 1e12,
                  ratio=measured / table)  # fmt: skip
    assert keys, f"{name!r} is not in GPU_PEAK_FLOPS: MFU would be measured against a matmul, not the datasheet"
    # The datasheet's dense peak is a ceiling no real product reaches; a large product reaches 60-90% of it
    # (H200 here: 788 of 989 TFLOP/s). Outside that band the entry is for another variant (PCIe, NVL) of the chip.
    assert 0.6 * table <= measured <= 1.02 * table, f"{name}: measured {measured / 1e12:.0f} vs {table / 1e12:.0f}"
