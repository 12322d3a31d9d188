"""`torchrun` on CPU: one job over gloo, saved and summarised once, with token counts summed over processes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.test_bad_inputs import GOOD_ROW, write

ROOT = Path(__file__).resolve().parents[1]
ROWS = [GOOD_ROW.replace("red", word) for word in ["red", "blue", "green", "amber", "violet", "teal", "gold", "pink"]]


def run_cli(launcher: list[str], model: Path, data: str, out: Path, batch_size: int) -> str:
    command = launcher + ["-m", "sftune.cli", "sft", "--model_name_or_path", str(model), "--dataset_name", data,
                          "--output_dir", str(out), "--num_train_epochs", "1", "--per_device_train_batch_size",
                          str(batch_size), "--save_strategy", "no", "--report_to", "none", "--plot_loss", "false",
                          "--logging_steps", "1", "--disable_tqdm", "true"]  # fmt: skip
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
