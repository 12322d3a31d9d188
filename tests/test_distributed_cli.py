"""`torchrun` on CPU: one job over gloo, saved and summarised once, with token counts summed over processes."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_bad_inputs import GOOD_ROW, write

ROOT = Path(__file__).resolve().parents[1]
ROWS = [GOOD_ROW.replace("red", word) for word in ["red", "blue", "green", "amber", "violet", "teal", "gold", "pink"]]


def run_cli(launcher: list[str], model: Path, data: str, out: Path, batch_size: int, *flags: str) -> str:
    command = launcher + ["-m", "sftune.cli", "sft", "--model_name_or_path", str(model), "--dataset_name", data,
                          "--output_dir", str(out), "--num_train_epochs", "1", "--per_device_train_batch_size",
                          str(batch_size), "--save_strategy", "no", "--report_to", "none", "--plot_loss", "false",
                          "--logging_steps", "1", "--disable_tqdm", "true", *flags]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def summary_value(stdout: str, key: str) -> str:
    return re.search(rf"^\s+{key}\s+(\S+)", stdout, re.MULTILINE).group(1)


def test_torchrun_on_cpu_trains_one_job_and_summarises_once(tiny_llama_path, tmp_path):
    data = write(tmp_path / "d.jsonl", "".join(ROWS))
    single = run_cli([sys.executable], tiny_llama_path, data, tmp_path / "one", batch_size=4)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    double = run_cli(torchrun, tiny_llama_path, data, tmp_path / "two", batch_size=2)
    assert double.count("training done") == 1  # rank 0 only
    assert summary_value(double, "steps") == summary_value(single, "steps") == "2"  # one job, global batch 4
    assert summary_value(double, "tokens_trained") == summary_value(single, "tokens_trained")  # summed over ranks
    assert (tmp_path / "two" / "model.safetensors").is_file()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_torchrun_with_deepspeed_zero3_saves_a_model_plain_transformers_loads(tiny_llama_path, tmp_path):
    """`sftune sft --deepspeed ds.json` (ZeRO-3, no stage3_gather_16bit_weights_on_model_save): the model is built
    partitioned, trained as one job, and saved whole, as 1 process saves it."""
    from transformers import AutoModelForCausalLM

    data = write(tmp_path / "d.jsonl", "".join(ROWS))
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_batch_size": "auto",
                                  "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}))  # fmt: skip
    flags = ["--bf16", "false", "--learning_rate", "1e-3"]
    single = run_cli([sys.executable], tiny_llama_path, data, tmp_path / "one", 4, *flags)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518"]
    zero3 = run_cli(torchrun, tiny_llama_path, data, tmp_path / "two", 2, *flags, "--deepspeed", str(config))
    assert summary_value(zero3, "steps") == summary_value(single, "steps") == "2"
    assert summary_value(zero3, "tokens_trained") == summary_value(single, "tokens_trained")
    one = AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    two = AutoModelForCausalLM.from_pretrained(tmp_path / "two").state_dict()
    assert one.keys() == two.keys()
    # The tolerance of tests/test_engines.py (derived there); a step of lr 1e-3 moves weights by up to 1e-3.
    assert max((one[k] - two[k]).abs().max().item() for k in one) <= 2e-5
    assert (
        max(
            (one[k] - AutoModelForCausalLM.from_pretrained(tiny_llama_path).state_dict()[k]).abs().max().item()
            for k in one
        )
        > 0
    )  # fmt: skip  (it trained)
