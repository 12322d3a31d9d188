"""End to end on the real SmolLM2-135M-Instruct (slow: minutes on CPU; `make test SKIP_SLOW=1` leaves it out)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftune import tasks
from sftune.cli import main
from sftune.evaluate import exact_match
from sftune.models import smollm2_path

pytestmark = pytest.mark.slow


def test_smollm2_checkpoint_is_cached_and_loads_in_plain_transformers():
    path = smollm2_path()
    assert smollm2_path() == path  # the second call finds the cache
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) > 100e6
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"


def test_short_lora_run_through_the_cli_learns_the_task(tmp_path):
    torch.manual_seed(0)
    train, test_file = tasks.write_task_jsonl(tmp_path / "data", n_train=160, n_test=30, seed=0)
    out = tmp_path / "model"
    main(["sft", "--config", "examples/demo.yaml", "--model_name_or_path", str(smollm2_path()),
          "--dataset_name", str(train), "--output_dir", str(out), "--plot_loss", "false"])  # fmt: skip
    import json

    test = [json.loads(line) for line in test_file.read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    accuracy, _ = exact_match(model, tokenizer, test, tasks.prompt_messages, tasks.is_correct, max_new_tokens=24)
    assert accuracy >= 0.3, f"exact match after 20 steps: {accuracy:.0%}"
