"""Collators do not know the model; `mask_for_model` alone fits a batch to the model's attention backend and dtype."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM

from sftune import IterativeSFTConfig, IterativeSFTTrainer, SFTConfig, SFTTrainer
from sftune.compat import dtype_kwargs
from sftune.data import collators
from sftune.data.collators import DataCollatorForSFT, mask_for_model

PACKED = [
    {"input_ids": [5, 9, 14, 22, 31, 40, 7, 8], "loss_mask": [1] * 8, "seq_lengths": [3, 5]},
    {"input_ids": [11, 12, 13, 50, 51, 52, 53], "loss_mask": [1] * 7, "seq_lengths": [2, 4, 1]},
    {"input_ids": [60, 61, 62], "loss_mask": [1] * 3, "seq_lengths": [3]},
]
PLAIN = [{"input_ids": [5, 9, 14, 22, 31], "loss_mask": [0, 1, 1, 1, 1]}, {"input_ids": [6, 7], "loss_mask": [1, 1]},
         {"input_ids": [8, 9, 10], "loss_mask": [1, 1, 1]}]  # fmt: skip


def documents(rows):
    for row in rows:
        start = 0
        for length in row["seq_lengths"]:
            yield row["input_ids"][start : start + length]
            start += length


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("isolated_by_positions", [True, False])  # transformers 5's collator output, and 4.x's
def test_each_packed_document_gets_the_logits_it_has_alone(tiny_llama_path, monkeypatch, attn, isolated_by_positions):
    monkeypatch.setattr(collators, "position_ids_isolate_documents", lambda: isolated_by_positions)
    # The model as loaded: use_cache=True by default, so transformers' own packed-sequence detection is off.
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, attn_implementation=attn,
                                                 **dtype_kwargs(torch.float32)).eval()  # fmt: skip
    assert model.config.use_cache
    batch = DataCollatorForSFT(pad_token_id=0)(PACKED)
    inputs = mask_for_model({k: v for k, v in batch.items() if k not in ("labels", "num_tokens")}, model)
    if attn == "eager":  # an additive mask in the model's dtype: booleans would add 1/0 and mask nothing
        assert inputs["attention_mask"].dtype == torch.float32
    with torch.no_grad():
        logits = model(**inputs).logits
        alone = [model(input_ids=torch.tensor([doc])).logits[0] for doc in documents(PACKED)]
    got = []
    for row, packed in zip(PACKED, logits, strict=True):
        start = 0
        for length in row["seq_lengths"]:
            got.append(packed[start : start + length])
            start += length
    for a, b in zip(got, alone, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


class FakeModel(torch.nn.Module):
    def __init__(self, attn: str) -> None:
        super().__init__()
        self.config = type("Config", (), {"_attn_implementation": attn})()
        self.dtype = torch.bfloat16


def test_flash_attention_gets_position_ids_and_no_mask(monkeypatch):
    monkeypatch.setattr(collators, "position_ids_isolate_documents", lambda: False)  # a 4D mask from the collator
    batch = DataCollatorForSFT(pad_token_id=0)(PACKED)
    assert batch["attention_mask"].dim() == 4
    flash = mask_for_model(batch, FakeModel("flash_attention_2"))
    assert "attention_mask" not in flash and torch.equal(flash["position_ids"], batch["position_ids"])
    monkeypatch.setattr(collators, "position_ids_isolate_documents", lambda: True)
    positions_only = DataCollatorForSFT(pad_token_id=0)(PACKED)
    assert mask_for_model(positions_only, FakeModel("flash_attention_2")).keys() == positions_only.keys()


def test_wrapped_models_are_seen_through():
    """DDP and DeepSpeed wrap the model in `.module`: the backend and dtype are the wrapped model's."""
    wrapper = torch.nn.Module()
    wrapper.module = FakeModel("eager")
    inputs = mask_for_model({"input_ids": torch.ones(1, 3, dtype=torch.long),
                             "position_ids": torch.tensor([[0, 1, 0]])}, wrapper)  # fmt: skip
    mask = inputs["attention_mask"][0, 0]
    assert mask.dtype == torch.bfloat16
    assert mask[2].tolist() == [torch.finfo(torch.bfloat16).min, torch.finfo(torch.bfloat16).min, 0.0]


def test_padding_masks_pass_unchanged():
    batch = DataCollatorForSFT(pad_token_id=0)(PLAIN)
    fitted = mask_for_model(batch, FakeModel("eager"))
    assert fitted["attention_mask"] is batch["attention_mask"]


def test_collator_output_is_the_same_whatever_model_it_meets(tiny_llama_path, tmp_path):
    batches = []
    for attn, dtype in (("eager", torch.float32), ("sdpa", torch.bfloat16)):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, attn_implementation=attn, **dtype_kwargs(dtype))
        args = SFTConfig(output_dir=str(tmp_path / attn), report_to="none", max_seq_length=32, bf16=False)
        sft = SFTTrainer(model, args=args, train_dataset=Dataset.from_list([{"text": "a b c"}] * 2))
        iterative = IterativeSFTTrainer(model, args=IterativeSFTConfig(output_dir=str(tmp_path / f"i{attn}"),
                                                                       report_to="none"))  # fmt: skip
        batches.append([collate(rows) for collate in (sft.data_collator, iterative.data_collator)
                        for rows in (PACKED, PLAIN)])  # fmt: skip
    for a, b in zip(*batches, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
