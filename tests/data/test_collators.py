"""Collators: padding never leaks into labels, EOS survives pad == eos, completion-only masks are exact."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from sftune import DataCollatorForCompletionOnlyLM
from sftune.data import collators
from sftune.data.collators import IGNORE_INDEX, DataCollatorForSFT, block_causal_mask


@pytest.fixture(scope="module")
def chatml(tiny_chatml_tokenizer_path):
    return AutoTokenizer.from_pretrained(tiny_chatml_tokenizer_path)


def test_padding_is_ignored_and_eos_kept_when_pad_equals_eos(chatml):
    eos = chatml.eos_token_id
    assert chatml.pad_token_id == eos
    rows = [{"input_ids": [7, 8, eos], "loss_mask": [0, 1, 1]}, {"input_ids": [9, eos], "loss_mask": [1, 1]}]
    batch = DataCollatorForSFT(pad_token_id=eos)(rows)
    assert batch["input_ids"].tolist() == [[7, 8, eos], [9, eos, eos]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 8, eos], [9, eos, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert int(batch["num_tokens"].sum()) == 5


@pytest.mark.parametrize("isolated_by_positions", [True, False])
def test_packed_rows_restart_positions_and_isolate_documents(monkeypatch, isolated_by_positions):
    # transformers 5 isolates documents from restarting position_ids; 4.x needs the block-diagonal mask too.
    monkeypatch.setattr(collators, "position_ids_isolate_documents", lambda: isolated_by_positions)
    rows = [{"input_ids": [1, 2, 3, 4, 5], "loss_mask": [1] * 5, "seq_lengths": [3, 2]}, {"input_ids": [6, 7],
            "loss_mask": [1, 1], "seq_lengths": [2]}]  # fmt: skip
    batch = DataCollatorForSFT(pad_token_id=0)(rows)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 0, 0]]
    # The first token of the second document is not predicted from the first document.
    assert batch["labels"].tolist() == [[1, 2, 3, IGNORE_INDEX, 5], [6, 7, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    if isolated_by_positions:
        assert "attention_mask" not in batch
        return
    mask = batch["attention_mask"][0, 0]
    assert mask.dtype == torch.bool
    assert mask[4].tolist() == [False, False, False, True, True]  # token 5 sees only its own document
    assert mask[2].tolist() == [True, True, True, False, False]


def test_old_model_keywords_are_accepted_ignored_and_flagged():
    rows = [{"input_ids": [1, 2, 3], "loss_mask": [1] * 3, "seq_lengths": [1, 2]}]
    with pytest.warns(FutureWarning, match="ignores attn_implementation and dtype"):
        old = DataCollatorForSFT(pad_token_id=0, attn_implementation="eager", dtype=torch.bfloat16)(rows)
    new = DataCollatorForSFT(pad_token_id=0)(rows)
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in new)


def test_block_causal_mask_padding_rows_are_not_empty():
    mask = block_causal_mask([[2]], width=4)[0, 0]
    assert mask.any(-1).all()  # no all-masked softmax row (NaN under SDPA)


def tokenize(tokenizer, text):
    return {"input_ids": tokenizer.encode(text, add_special_tokens=False)}


def test_completion_only_collator_masks_up_to_the_response_template(chatml):
    collator = DataCollatorForCompletionOnlyLM(" ### Answer:", tokenizer=chatml)
    text = "### Question: what is up?\n ### Answer: the sky"
    batch = collator([tokenize(chatml, text), tokenize(chatml, "short ### Answer: yes")])
    labels = batch["labels"][0]
    trained = [t for t in labels.tolist() if t != IGNORE_INDEX]
    assert chatml.decode(trained) == " the sky"
    assert (batch["labels"][1][batch["attention_mask"][1] == 0] == IGNORE_INDEX).all()


def test_completion_only_collator_accepts_token_ids(chatml):
    template_ids = chatml.encode("\n ### Answer:", add_special_tokens=False)[1:]
    collator = DataCollatorForCompletionOnlyLM(template_ids, tokenizer=chatml)
    batch = collator([tokenize(chatml, "### Question: q\n ### Answer: done")])
    trained = [t for t in batch["labels"][0].tolist() if t != IGNORE_INDEX]
    assert chatml.decode(trained) == " done"


def test_completion_only_collator_multi_turn_trains_only_responses(chatml):
    collator = DataCollatorForCompletionOnlyLM(
        response_template="### Assistant:", instruction_template="### Human:", tokenizer=chatml
    )
    text = "### Human: hi there ### Assistant: hello friend ### Human: how are you ### Assistant: fine thanks"
    batch = collator([tokenize(chatml, text)])
    labels = batch["labels"][0].tolist()
    runs, current = [], []
    for token in labels + [IGNORE_INDEX]:
        if token != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(chatml.decode(current))
            current = []
    assert runs == [" hello friend", " fine thanks"]


def test_completion_only_collator_never_trains_silently_on_the_prompt(chatml):
    collator = DataCollatorForCompletionOnlyLM("### Answer:", tokenizer=chatml)
    with pytest.warns(UserWarning, match="Could not find the response template"):
        batch = collator([tokenize(chatml, "no template in this row at all")])
    assert (batch["labels"] == IGNORE_INDEX).all()


def test_completion_only_collator_keeps_eos_when_pad_equals_eos(chatml):
    collator = DataCollatorForCompletionOnlyLM("### Answer:", tokenizer=chatml)
    row = tokenize(chatml, "q ### Answer: yes")
    row["input_ids"].append(chatml.eos_token_id)
    batch = collator([row, tokenize(chatml, "a much longer question here ### Answer: no")])
    assert batch["labels"][0, len(row["input_ids"]) - 1] == chatml.eos_token_id


def test_completion_only_collator_rejects_mlm(chatml):
    with pytest.raises(ValueError, match="mlm"):
        DataCollatorForCompletionOnlyLM("x", tokenizer=chatml, mlm=True)


def test_labels_are_long_tensors(chatml):
    batch = DataCollatorForSFT(pad_token_id=0)([{"input_ids": [1, 2], "loss_mask": [1, 1]}])
    assert batch["labels"].dtype == torch.long


def test_padding_free_puts_a_batch_in_as_few_rows_as_fit_its_longest_example():
    rows = [{"input_ids": list(range(1, 9)), "loss_mask": [1] * 8}] + [
        {"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]} for _ in range(4)
    ]
    batch = DataCollatorForSFT(pad_token_id=0, padding_free=True)(rows)
    assert batch["input_ids"].shape == (3, 8)  # 8 | 3+3 | 3+3, instead of 5 rows of 8
    assert int(batch["num_tokens"].sum()) == 20
    trained = (batch["labels"] != IGNORE_INDEX).sum()
    assert trained == 8 + 4 * 2  # every loss-mask token kept; first tokens never predicted anyway
