"""Checks shared by the GPU tests (tests/gpu/test_cuda.py) and their CPU twins (tests/gpu/test_checks_cpu.py).

The same functions run on a tiny model on the CPU in every test run, and on CUDA in bf16 in a GPU session, so a
GPU session spends its time measuring, not debugging.

How packed training is judged exact in low precision. A packed or padding-free batch computes each document with
other shapes than the document alone (other matmul tiles, another reduction order), so in bf16 the two disagree
by rounding even when no document sees another. Rounding is measured, not guessed: the same documents run alone in
float32 on the same device are the reference, and `rounding` is the largest per-token distance of the low-precision
"alone" losses from it. Two low-precision results of the same exact value are each within about `rounding` of it,
so they are within 2 * rounding of each other (triangle inequality); that is the tolerance, plus a float32 floor.
A document that attends to another changes its losses by far more: the negative control in the CPU tests
measures how much on the same model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from datasets import Dataset

from sftune import DataCollatorForSFT
from sftune.data.collators import mask_for_model
from sftune.data.packing import pack_dataset

IGNORE_INDEX = -100
FLOAT32_FLOOR = 1e-4  # float32 matmuls of other shapes differ by ~1e-6 relative; losses are ~ln(vocab) < 10


def random_documents(n: int, vocab: int, seed: int = 0, low: int = 4, high: int = 60) -> list[dict[str, list[int]]]:
    """Distinct documents of random length and tokens, about 70% of their tokens trained (`loss_mask`)."""
    rng = np.random.default_rng(seed)
    documents: dict[tuple[int, ...], list[int]] = {}
    while len(documents) < n:
        length = int(rng.integers(low, high))
        ids = tuple(rng.integers(3, vocab, size=length).tolist())
        documents[ids] = (rng.random(length) > 0.3).astype(int).tolist()
    return [{"input_ids": list(ids), "loss_mask": mask} for ids, mask in documents.items()]


def pack(documents: Sequence[dict], max_length: int) -> list[dict]:
    """The documents packed by sftune's packer (best fit decreasing), as rows with `seq_lengths`."""
    return list(pack_dataset(Dataset.from_list(list(documents)), max_length, "bfd"))


def collator_for(model: Any, padding_free: bool = False) -> DataCollatorForSFT:
    """The collator SFTTrainer builds for this model (pad id 0: padding is known by position, never by id); its
    batches suit any model, and `mask_for_model` fits them to this one, as the trainers do."""
    return DataCollatorForSFT(pad_token_id=0, padding_free=padding_free)


def document_spans(batch: dict[str, torch.Tensor]) -> list[tuple[int, int, int]]:
    """(row, start, end) of every document of a collated batch: from the positions where they restart at 0,
    else (a plain padded batch) each row's attended tokens."""
    spans = []
    if "position_ids" in batch:
        for row, positions in enumerate(batch["position_ids"].tolist()):
            starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
            spans += [(row, s, e) for s, e in zip(starts[:-1], starts[1:])]
    else:
        for row, length in enumerate(batch["attention_mask"].sum(1).tolist()):
            spans.append((row, 0, int(length)))
    return spans


def document_losses(model: Any, batch: dict[str, torch.Tensor]) -> dict[tuple[int, ...], torch.Tensor]:
    """Float32 cross-entropy of every trained token (logits upcast before the softmax), per document, keyed by
    the document's tokens; padding positions come out as documents of pad ids, which no caller asks for."""
    device = next(model.parameters()).device
    inputs = mask_for_model({k: v.to(device) for k, v in batch.items() if k not in ("labels", "num_tokens")}, model)
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    labels = batch["labels"].to(device)
    # losses[r, p]: predicting token p + 1 from tokens up to p.
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    ).cpu()
    trained = (labels[:, 1:] != IGNORE_INDEX).cpu()
    out = {}
    for row, start, end in document_spans(batch):
        key = tuple(batch["input_ids"][row, start:end].tolist())
        out[key] = losses[row, start : end - 1][trained[row, start : end - 1]]
    return out


def losses_in_batches(model: Any, batches: Sequence[Sequence[dict]], padding_free: bool = False) -> dict:
    collator = collator_for(model, padding_free)
    out: dict[tuple[int, ...], torch.Tensor] = {}
    for features in batches:
        out.update(document_losses(model, collator(list(features))))
    return out


def stacked(losses: dict[tuple[int, ...], torch.Tensor], documents: Sequence[dict]) -> torch.Tensor:
    """The documents' per-token losses, in the documents' order (KeyError if a document went missing)."""
    return torch.cat([losses[tuple(doc["input_ids"])] for doc in documents])


@dataclass
class PackingReport:
    """Largest per-token loss distance of packed / padding-free batches from the documents alone, and the bound."""

    packed_error: float
    padding_free_error: float
    rounding: float
    tolerance: float
    tokens: int

    @property
    def exact(self) -> bool:
        return self.packed_error <= self.tolerance and self.padding_free_error <= self.tolerance

    def __str__(self) -> str:
        return (
            f"{self.tokens} trained tokens: packed max|d|={self.packed_error:.2e}, padding-free max|d|="
            f"{self.padding_free_error:.2e}, rounding={self.rounding:.2e}, tolerance={self.tolerance:.2e}"
        )


def packing_report(
    model: Any, reference: Any, documents: Sequence[dict], max_length: int = 128, batch_size: int = 6
) -> PackingReport:
    """Per-token losses of packed rows and of padding-free batches against each document alone.

    `model` is the model under test (any device and dtype); `reference` holds the same weights in float32 on the
    same device and sets the rounding scale (pass `model` itself when it is float32).
    """
    alone = stacked(losses_in_batches(model, [[doc] for doc in documents]), documents)
    packed = stacked(losses_in_batches(model, [pack(documents, max_length)]), documents)
    batches = [documents[i : i + batch_size] for i in range(0, len(documents), batch_size)]
    padding_free = stacked(losses_in_batches(model, batches, padding_free=True), documents)
    rounding = 0.0
    if reference is not model:
        reference_alone = stacked(losses_in_batches(reference, [[doc] for doc in documents]), documents)
        rounding = float((alone - reference_alone).abs().max())
    return PackingReport(
        packed_error=float((packed - alone).abs().max()),
        padding_free_error=float((padding_free - alone).abs().max()),
        rounding=rounding,
        tolerance=2 * rounding + FLOAT32_FLOOR,
        tokens=int(alone.numel()),
    )


# ----------------------------------------------------------------------------------------------------------------
# Training through the public API
# ----------------------------------------------------------------------------------------------------------------


def text_dataset(n: int = 64, distinct: int = 4, seed: int = 0) -> Dataset:
    """`n` rows cycling through `distinct` sentences of the tiny tokenizer's corpus: so repetitive that a working
    run's loss falls within a few steps, even for small adapters on a random model."""
    from tests.fixtures import corpus

    lines = corpus(distinct, seed=seed)[:distinct]
    return Dataset.from_list([{"text": lines[i % distinct]} for i in range(n)])


def train_losses(
    model_path: Any, output_dir: Any, dataset: Dataset | None = None, peft_config: Any = None, **overrides: Any
) -> tuple[Any, list[float]]:
    """Train with SFTTrainer (model given by path, so every call starts from the same weights) and return the
    trainer and the loss logged at every step."""
    from sftune import SFTConfig, SFTTrainer

    values: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        max_length=128,
        bf16=False,  # float32 unless a test asks for bf16 (the default would follow the machine)
    )
    values.update(overrides)
    trainer = SFTTrainer(
        str(model_path),
        args=SFTConfig(**values),
        train_dataset=dataset if dataset is not None else text_dataset(),
        peft_config=peft_config,
    )
    trainer.train()
    return trainer, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def record(name: str, **figures: Any) -> None:
    """Append a test's measured figures to $SFTUNE_GPU_FIGURES (a JSON-lines file) when set, for the report."""
    import json
    import os

    path = os.environ.get("SFTUNE_GPU_FIGURES")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"test": name, **figures}, default=str) + "\n")


def lora_run(model_path: Any, output_dir: Any, model_config: Any, **overrides: Any) -> tuple[Any, list[float]]:
    """Train LoRA adapters the way the QLoRA examples do: `ModelConfig` -> `model_init_kwargs()` (quantization
    config and device map included) and `get_peft_config`, model given by path."""
    from sftune import get_peft_config

    model_config.model_name_or_path = str(model_path)
    values: dict[str, Any] = dict(max_steps=20, learning_rate=5e-3, model_init_kwargs=model_config.model_init_kwargs())
    values.update(overrides)
    return train_losses(model_path, output_dir, peft_config=get_peft_config(model_config), **values)


def eval_loss(model: Any, batch: dict[str, torch.Tensor], autocast_dtype: torch.dtype | None = None) -> float:
    """The model's own loss on one batch, in eval mode (no dropout), under autocast when a dtype is given."""
    device = next(model.parameters()).device
    inputs = mask_for_model({k: v.to(device) for k, v in batch.items() if k != "num_tokens"}, model)
    model.eval()
    with (
        torch.no_grad(),
        torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=bool(autocast_dtype)),
    ):
        return float(model(**inputs).loss)


def reload_adapters(model_path: Any, adapter_dir: Any, model_config: Any) -> Any:
    """The base model loaded as the run loaded it, made ready as SFTTrainer makes a k-bit model ready (norms and
    head in float32), with the saved adapters: the trained model, rebuilt from disk."""
    from peft import PeftModel, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, **model_config.model_init_kwargs())
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    return PeftModel.from_pretrained(base, adapter_dir)


def assert_same_adapters(trained: Any, reloaded: Any) -> None:
    from peft import get_peft_model_state_dict

    saved, loaded = get_peft_model_state_dict(trained), get_peft_model_state_dict(reloaded)
    assert saved.keys() == loaded.keys() and saved
    for key, value in saved.items():
        torch.testing.assert_close(loaded[key].to(value.device, value.dtype), value, atol=0, rtol=0)


def assert_adapters_save_and_reload(
    trainer: Any, model_path: Any, model_config: Any, folder: Any, autocast_dtype: torch.dtype | None, rel: float
) -> None:
    """Saving writes only the adapters; reloading them on the base model gives the same adapters and the same loss
    on the training data (to `rel`), and switching them off loses what they learnt."""
    trainer.save_model(str(folder))
    assert (folder / "adapter_model.safetensors").exists()
    assert not (folder / "model.safetensors").exists()
    reloaded = reload_adapters(model_path, folder, model_config)
    assert_same_adapters(trainer.model, reloaded)
    batch = training_batch(trainer)
    trained = eval_loss(trainer.model, batch, autocast_dtype)
    assert eval_loss(reloaded, batch, autocast_dtype) == pytest.approx(trained, rel=rel)
    with reloaded.disable_adapter():
        assert eval_loss(reloaded, batch, autocast_dtype) > trained + 0.1  # the adapters learnt the data


def training_batch(trainer: Any, n: int = 4) -> dict[str, torch.Tensor]:
    """The first `n` prepared training rows, collated by the trainer's own collator (the data the adapters learnt)."""
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
