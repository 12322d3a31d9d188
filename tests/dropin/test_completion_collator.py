"""DataCollatorForCompletionOnlyLM: padding_free, torch_call, padding_side, unknown arguments refused."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftune import DataCollatorForCompletionOnlyLM
from sftune.compat import position_ids_isolate_documents
from sftune.data.collators import IGNORE_INDEX, mask_for_model

TEXTS = ["### Question: red? ### Answer: red red", "### Question: a b c d e f? ### Answer: yes", "### Answer: no"]


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_path):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
    tok.pad_token = tok.eos_token
    return tok


def features(tokenizer):
    return [{"input_ids": tokenizer(t)["input_ids"]} for t in TEXTS]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_free_flattens_restarts_positions_and_isolates_examples(tokenizer, tiny_llama_plain_path, attn):
    """The batch carries what keeps documents apart on this transformers: position ids alone where transformers
    isolates documents from them (5.x, as TRL's batch), plus a block mask where it does not (4.x)."""
    rows = features(tokenizer)
    padded = DataCollatorForCompletionOnlyLM("### Answer:", tokenizer=tokenizer)(rows)
    free = DataCollatorForCompletionOnlyLM("### Answer:", tokenizer=tokenizer, padding_free=True)(rows)
    total = sum(len(r["input_ids"]) for r in rows)
    assert free["input_ids"].numel() < padded["input_ids"].numel() and free["input_ids"].shape[0] < len(rows)
    assert "position_ids" in free
    if position_ids_isolate_documents():
        assert "attention_mask" not in free
    else:
        assert free["attention_mask"].dim() == 4
    assert int((free["position_ids"] == 0).sum()) >= len(rows)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_plain_path, attn_implementation=attn).eval()
    found = 0
    with torch.no_grad():
        inputs = mask_for_model({k: v for k, v in free.items() if k != "labels"}, model)
        logits = model(**inputs, use_cache=False).logits  # as in training: transformers builds no KV cache
        for row, target in zip(rows, padded["labels"], strict=True):
            ids = row["input_ids"]
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            for r in range(free["input_ids"].shape[0]):
                flat = free["input_ids"][r].tolist()
                for start in range(len(flat) - len(ids) + 1):
                    if flat[start : start + len(ids)] == ids and free["position_ids"][r, start] == 0:
                        torch.testing.assert_close(logits[r, start : start + len(ids)], alone, atol=1e-4, rtol=1e-4)
                        # labels are the padded collation's, but a document's first token is never a target
                        expected = target[: len(ids)].tolist()
                        expected[0] = IGNORE_INDEX
                        assert free["labels"][r, start : start + len(ids)].tolist() == expected
                        found += 1
                        break
                else:
                    continue
                break
    assert found == len(rows) and total <= free["input_ids"].numel()


def test_padding_side_left_and_torch_call(tokenizer):
    rows = features(tokenizer)
    collator = DataCollatorForCompletionOnlyLM("### Answer:", tokenizer=tokenizer)
    right = collator(rows)
    tokenizer.padding_side = "left"
    try:
        left = collator.torch_call(rows)
    finally:
        tokenizer.padding_side = "right"
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        assert left["input_ids"][i, -n:].tolist() == row["input_ids"]
        assert left["attention_mask"][i].tolist() == [0] * (left["input_ids"].shape[1] - n) + [1] * n
        assert left["labels"][i, -n:].tolist() == right["labels"][i, :n].tolist()


def test_unknown_keyword_arguments_are_refused(tokenizer):
    with pytest.raises(TypeError, match="padding_fre"):
        DataCollatorForCompletionOnlyLM("### Answer:", tokenizer=tokenizer, padding_fre=True)
    DataCollatorForCompletionOnlyLM("### Answer:", tokenizer=tokenizer, mlm_probability=0.15)  # TRL passed it on


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padding_free_batches_train_exactly_on_every_attention_backend(
    tokenizer, tiny_llama_plain_path, tmp_path, attn
):
    """The collator cannot know the model's attention backend; the trainer hands eager an additive mask, so the
    padding-free loss equals the padded loss (eager adds a boolean mask to the scores and would mask nothing)."""
    from datasets import Dataset

    from sftune import SFTConfig, SFTTrainer

    losses = {}
    for padding_free in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_plain_path, attn_implementation=attn)
        args = SFTConfig(output_dir=str(tmp_path / str(padding_free)), report_to="none", save_strategy="no",
                         per_device_eval_batch_size=3, dataset_kwargs={"skip_prepare_dataset": True})  # fmt: skip
        collator = DataCollatorForCompletionOnlyLM("### Answer:", tokenizer=tokenizer, padding_free=padding_free)
        trainer = SFTTrainer(model, args=args, eval_dataset=Dataset.from_list(features(tokenizer)),
                             data_collator=collator, processing_class=tokenizer)  # fmt: skip
        losses[padding_free] = trainer.evaluate()["eval_loss"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
