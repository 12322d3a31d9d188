"""A ShareGPT `conversations` column (from/value; human/gpt/system/tool) trains like the same `messages`."""

from __future__ import annotations

import pytest
from datasets import Dataset

from sftune import SFTConfig, SFTTrainer
from sftune.data.formats import DatasetFormatError

SHAREGPT = [
    {"from": "system", "value": "Be brief."},
    {"from": "human", "value": "Say red."},
    {"from": "gpt", "value": "red red"},
    {"from": "tool", "value": "42"},
    {"from": "gpt", "value": "done"},
]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say red."},
    {"role": "assistant", "content": "red red"},
    {"role": "tool", "content": "42"},
    {"role": "assistant", "content": "done"},
]


def prepared(path, tmp_path, rows, **overrides):
    args = SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", max_seq_length=128, **overrides)
    return SFTTrainer(str(path), args=args, train_dataset=Dataset.from_list(rows)).train_dataset


@pytest.mark.parametrize("assistant_only_loss", [False, True])
def test_sharegpt_conversations_equal_the_messages(tiny_llama_path, tmp_path, assistant_only_loss):
    ours = prepared(tiny_llama_path, tmp_path, [{"conversations": SHAREGPT}], assistant_only_loss=assistant_only_loss)
    reference = prepared(tiny_llama_path, tmp_path, [{"messages": MESSAGES}], assistant_only_loss=assistant_only_loss)
    assert ours[0] == reference[0]


def test_unknown_speaker_names_the_row_and_turn(tiny_llama_path, tmp_path):
    bad = [{"conversations": [{"from": "narrator", "value": "Once"}]}]
    with pytest.raises(DatasetFormatError, match=r"Row 0, column 'conversations', turn 0: unknown speaker 'narrator'"):
        prepared(tiny_llama_path, tmp_path, bad)
