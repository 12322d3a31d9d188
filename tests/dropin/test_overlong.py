"""Over-long examples: split into isolated pieces (packing default) or truncated, never silently."""

from __future__ import annotations

import logging

from datasets import Dataset
from transformers import AutoTokenizer

from sftune import SFTConfig, SFTTrainer

LONG = " ".join(f"w{i}" for i in range(300))
LOG = "sftune.data.tokenize"


def config(tmp_path, **overrides) -> SFTConfig:
    values = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-3,
                  logging_steps=1, save_strategy="no", report_to="none", max_seq_length=32, disable_tqdm=True)  # fmt: skip
    values.update(overrides)
    return SFTConfig(**values)


def documents(dataset):
    for row in dataset:
        start = 0
        for length in row["seq_lengths"]:
            yield row["input_ids"][start : start + length], row["loss_mask"][start : start + length]
            start += length


def test_packing_default_splits_over_long_examples_into_isolated_pieces(tiny_llama_plain_path, tmp_path, caplog):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_plain_path)
    whole = tokenizer(LONG)["input_ids"] + [tokenizer.eos_token_id]
    assert len(whole) > 3 * 32
    args = config(tmp_path, packing=True)
    assert args.packing_strategy == "bfd_split"
    with caplog.at_level(logging.WARNING, logger=LOG):
        trainer = SFTTrainer(str(tiny_llama_plain_path), args=args,
                             train_dataset=Dataset.from_list([{"text": LONG}, {"text": "short one"}]))  # fmt: skip
    assert not [r for r in caplog.records if "Truncation" in r.getMessage()]  # nothing dropped
    short = tokenizer("short one")["input_ids"] + [tokenizer.eos_token_id]
    pieces = [ids for ids, _ in documents(trainer.train_dataset) if ids != short]
    assert all(len(ids) <= 32 for ids in pieces) and len(pieces) == -(-len(whole) // 32)
    # every token of the long example is there, in order, as separate documents (own seq_lengths entries)
    ordered = sorted(pieces, key=lambda ids: _offset(whole, ids))
    assert [t for ids in ordered for t in ids] == whole
    trainer.train()


def _offset(whole, piece):
    for start in range(0, len(whole), 32):
        if whole[start : start + len(piece)] == piece:
            return start
    raise AssertionError("piece not found in the whole example")


def test_split_pieces_of_a_conversation_keep_their_masks(tiny_llama_path, tmp_path):
    messages = [{"role": "user", "content": "Say the list."}, {"role": "assistant", "content": LONG}]
    rows = [{"messages": messages}]
    kwargs = dict(assistant_only_loss=True)
    unpacked = SFTTrainer(str(tiny_llama_path), args=config(tmp_path, max_seq_length=2000, **kwargs),
                          train_dataset=Dataset.from_list(rows)).train_dataset[0]  # fmt: skip
    packed = SFTTrainer(str(tiny_llama_path), args=config(tmp_path, packing=True, **kwargs),
                        train_dataset=Dataset.from_list(rows)).train_dataset  # fmt: skip
    pieces = sorted(documents(packed), key=lambda doc: _offset(unpacked["input_ids"], doc[0]))
    assert [t for ids, _ in pieces for t in ids] == unpacked["input_ids"]
    assert [m for _, mask in pieces for m in mask] == unpacked["loss_mask"]
    assert 0 in pieces[0][1] and all(any(mask) for _, mask in pieces[1:])  # the prompt stays masked; later pieces train


def test_truncation_is_reported_once_with_counts(tiny_llama_plain_path, tmp_path, caplog):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_plain_path)
    texts = [LONG, LONG[:200], "short one", "w1 w2"]
    lengths = [len(tokenizer(t)["input_ids"]) + 1 for t in texts]  # + EOS
    expected_tokens = sum(max(n - 32, 0) for n in lengths)
    expected_examples = sum(n > 32 for n in lengths)
    assert expected_examples == 2
    for packing, strategy in ((False, "bfd"), (True, "bfd")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOG):
            SFTTrainer(str(tiny_llama_plain_path), args=config(tmp_path, packing=packing, packing_strategy=strategy),
                       train_dataset=Dataset.from_list([{"text": t} for t in texts]))  # fmt: skip
        reports = [r.getMessage() for r in caplog.records if "Truncation" in r.getMessage()]
        assert len(reports) == 1
        assert f"dropped {expected_tokens} tokens from {expected_examples} examples" in reports[0]


def test_truncation_of_a_stream_is_reported_once(tiny_llama_plain_path, tmp_path, caplog):
    data = Dataset.from_list([{"text": LONG}, {"text": "short"}, {"text": LONG}] * 2).to_iterable_dataset()
    with caplog.at_level(logging.WARNING, logger=LOG):
        trainer = SFTTrainer(str(tiny_llama_plain_path), args=config(tmp_path, max_steps=2), train_dataset=data)
        trainer.train()
    reports = [r.getMessage() for r in caplog.records if "Truncation" in r.getMessage()]
    assert len(reports) == 1 and "the first at row 0" in reports[0]
