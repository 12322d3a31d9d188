"""The catalogue of bad inputs: each one gives one clear message (naming the file, line, row or field) and, from
the command line, exit code 2 and no traceback. Add a case here for every bad input found.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from datasets import Dataset

from sftune import SFTConfig, SFTTrainer
from sftune.cli import main
from sftune.data.formats import DatasetFormatError

GOOD_ROW = '{"messages": [{"role": "user", "content": "Say red."}, {"role": "assistant", "content": "red red."}]}\n'
ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, content: str | bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


# Each case: (files to write {name: content}, argv after `sftune sft` with {tmp}/{model} filled in, expected
# fragment of the message). {data} is a good dataset file, {model} the tiny model.
CLI_CASES = {
    "missing dataset file": ({}, ["--dataset_name", "{tmp}/nope.jsonl"], "Dataset file {tmp}/nope.jsonl not found"),
    "dataset name not loadable": ({}, ["--dataset_name", "nobody/no-such-data"], "Could not load the dataset 'nobody/no-such-data'"),
    "unsupported file type": ({"d.txt": "hello"}, ["--dataset_name", "{tmp}/d.txt"], "unsupported file type"),
    "malformed jsonl": ({"d.jsonl": GOOD_ROW + GOOD_ROW + '{"messages": [\n'}, ["--dataset_name", "{tmp}/d.jsonl"], "d.jsonl: line 3 is not valid JSON"),
    "jsonl line not an object": ({"d.jsonl": GOOD_ROW + "[1, 2]\n"}, ["--dataset_name", "{tmp}/d.jsonl"], "line 2 is a JSON list"),
    "malformed json": ({"d.json": '[{"text": "a"}, {"text": }]'}, ["--dataset_name", "{tmp}/d.json"], "d.json: line 1 is not valid JSON"),
    "non-utf8 bytes": ({"d.jsonl": GOOD_ROW.encode() + b'{"text": "caf\xe9"}\n'}, ["--dataset_name", "{tmp}/d.jsonl"], f"line 2 is not UTF-8 (byte 0xe9 at byte offset {len(GOOD_ROW) + 13}"),
    "non-utf8 csv": ({"d.csv": b"text\nna\xefve\n"}, ["--dataset_name", "{tmp}/d.csv"], "d.csv: line 2 is not UTF-8"),
    "empty file": ({"d.jsonl": ""}, ["--dataset_name", "{tmp}/d.jsonl"], "d.jsonl: the file is empty"),
    "blank file": ({"d.jsonl": "\n  \n"}, ["--dataset_name", "{tmp}/d.jsonl"], "d.jsonl: the file is empty"),
    "empty csv": ({"d.csv": ""}, ["--dataset_name", "{tmp}/d.csv"], "the file is empty"),
    "json types change between rows": ({"d.jsonl": '{"prompt": "a", "completion": "b"}\n' * 3 + '{"prompt": "a", "completion": {"x": 1}}\n'}, ["--dataset_name", "{tmp}/d.jsonl"], "Row 3: 'prompt' and 'completion' must both be strings"),
    "missing model folder": ({}, ["--model_name_or_path", "{tmp}/no-model"], "Model folder {tmp}/no-model not found"),
    "model id not reachable": ({}, ["--model_name_or_path", "nobody/no-such-model"], "Could not load the model 'nobody/no-such-model'"),
    "model path is a file": ({"m.bin": "x"}, ["--model_name_or_path", "{tmp}/m.bin"], "m.bin is a file"),
    "model folder without config": ({"m/weights.bin": "x"}, ["--model_name_or_path", "{tmp}/m"], "has no config.json"),
    "no model": ({}, ["--model_name_or_path", ""], "Give the model"),
    "no dataset": ({}, ["--dataset_name", ""], "Give the data"),
    "missing config file": ({}, ["--config", "{tmp}/nope.yaml"], "Config file {tmp}/nope.yaml not found"),
    "yaml syntax error": ({"r.yaml": "learning_rate: 0.1\nmax_steps: [1, 2\n"}, ["--config", "{tmp}/r.yaml"], "r.yaml: not valid YAML (line 3"),
    "yaml not a mapping": ({"r.yaml": "- learning_rate\n"}, ["--config", "{tmp}/r.yaml"], "expected `key: value` lines, got a list"),
    "yaml unknown key": ({"r.yaml": "learning_rat: 0.1\n"}, ["--config", "{tmp}/r.yaml"], "unknown keys ['learning_rat']"),
    "yaml float of wrong type": ({"r.yaml": "learning_rate: fast\n"}, ["--config", "{tmp}/r.yaml"], "r.yaml: learning_rate must be float, got 'fast'"),
    "yaml int of wrong type": ({"r.yaml": "max_steps: 2.5\n"}, ["--config", "{tmp}/r.yaml"], "max_steps must be int, got 2.5"),
    "yaml list for a single value": ({"r.yaml": "per_device_train_batch_size: [1, 2]\n"}, ["--config", "{tmp}/r.yaml"], "per_device_train_batch_size takes a single value"),
    "yaml bool of wrong type": ({"r.yaml": "packing: maybe\n"}, ["--config", "{tmp}/r.yaml"], "packing must be true or false, got 'maybe'"),
    "yaml choice not allowed": ({"r.yaml": "lr_scheduler_type: zigzag\n"}, ["--config", "{tmp}/r.yaml"], "lr_scheduler_type must be one of"),
    "yaml non-utf8": ({"r.yaml": b"learning_rate: 0.1 # \xff\n"}, ["--config", "{tmp}/r.yaml"], "r.yaml: not UTF-8"),
    "flag of wrong type": ({}, ["--learning_rate", "abc"], "--learning_rate/--learning-rate: invalid float value: 'abc'"),
    "unknown flag": ({}, ["--learning_rat", "0.1"], "Unknown arguments: ['--learning_rat', '0.1']"),
    "negative max_seq_length": ({}, ["--max_seq_length", "-5"], "max_seq_length must be >= 1"),
    "zero max_length": ({}, ["--max_length", "0"], "max_length must be >= 1"),
    "zero gradient accumulation": ({}, ["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps must be >= 1"),
    "zero batch size": ({}, ["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be >= 1"),
    "nan learning rate": ({}, ["--learning_rate", "nan"], "learning_rate must be >= 0"),
    "negative learning rate": ({}, ["--learning_rate=-1e-4"], "learning_rate must be >= 0"),
    "zero epochs": ({}, ["--num_train_epochs", "0"], "num_train_epochs must be > 0"),
    "zero max_steps": ({}, ["--max_steps", "0"], "max_steps must be a positive number of steps"),
    "zero logging steps": ({}, ["--logging_steps", "0"], "logging_steps must be > 0"),
    "negative save steps": ({}, ["--save_steps", "-1"], "save_steps must be >= 0"),
    "beta out of range": ({}, ["--adam_beta2", "1.5"], "adam_beta2 must be >= 0 and <= 1"),
    "negative seed": ({}, ["--seed", "-3"], "seed must be >= 0"),
    "bad truncation mode": ({}, ["--truncation_mode", "middle"], "truncation_mode must be 'keep_start' or 'keep_end'"),
    "bad nonfinite mode": ({}, ["--on_nonfinite", "ignore"], "on_nonfinite must be 'stop' or 'skip'"),
    "resume with no checkpoint": ({}, ["--resume_from_checkpoint", "true"], "has no complete checkpoint to resume from"),
    "resume from missing folder": ({}, ["--resume_from_checkpoint", "{tmp}/out/checkpoint-9"], "no such checkpoint folder"),
    "data in no known format": ({"d.jsonl": '{"foo": "bar"}\n'}, ["--dataset_name", "{tmp}/d.jsonl"], "foo"),
    "message without content": ({"d.jsonl": '{"messages": [{"role": "user"}]}\n'}, ["--dataset_name", "{tmp}/d.jsonl"], "Row 0"),
    "assistant_only_loss on plain text": ({"d.jsonl": '{"text": "a b c"}\n'}, ["--dataset_name", "{tmp}/d.jsonl", "--assistant_only_loss", "true"], "assistant_only_loss=True needs conversational data"),
    "completion_only_loss on plain text": ({"d.jsonl": '{"text": "a b c"}\n'}, ["--dataset_name", "{tmp}/d.jsonl", "--completion_only_loss", "true"], "completion_only_loss=True needs 'prompt'/'completion' data"),
    "input_ids outside the vocabulary": ({"d.jsonl": '{"input_ids": [1, 2, 3]}\n{"input_ids": [4, 999999]}\n'}, ["--dataset_name", "{tmp}/d.jsonl"], "Row 1: input_ids holds 999999, outside the tokenizer's vocabulary"),
    "corrupt parquet": ({"d.parquet": "not parquet at all"}, ["--dataset_name", "{tmp}/d.parquet"], "could not read it as parquet"),
    "empty json array": ({"d.json": "[]"}, ["--dataset_name", "{tmp}/d.json"], "d.json: the file has no rows"),
    "csv with only a header": ({"d.csv": "prompt,completion\n"}, ["--dataset_name", "{tmp}/d.csv"], "d.csv: the file has no rows"),
    "missing eval file": ({}, ["--eval_dataset_name", "{tmp}/eval.jsonl"], "Dataset file {tmp}/eval.jsonl not found"),
    "negative max_grad_norm": ({}, ["--max_grad_norm=-1"], "max_grad_norm must be >= 0"),
    "model_init_kwargs not json": ({}, ["--model_init_kwargs", "{dtype: bf16"], "model_init_kwargs must be a dict or a JSON object"),
    "unknown dtype": ({}, ["--model_init_kwargs", '{"dtype": "float99"}'], "Unknown dtype 'float99'"),
    "unknown dataset_kwargs key": ({}, ["--dataset_kwargs", '{"skip_prepare": true}'], "Unknown dataset_kwargs ['skip_prepare']"),
    "prompt longer than max_seq_length": ({}, ["--max_seq_length", "4", "--assistant_only_loss", "true"], "Row 0: the prompt alone is"),
}  # fmt: skip


@pytest.fixture()
def good_data(tmp_path):
    return write(tmp_path / "good.jsonl", GOOD_ROW * 4)


def cli_argv(case_argv: list[str], tmp_path: Path, model: Path, data: str) -> list[str]:
    filled = [arg.replace("{tmp}", str(tmp_path)) for arg in case_argv]
    argv = ["sft", "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--report_to", "none"]
    if "--model_name_or_path" not in filled:
        argv += ["--model_name_or_path", str(model)]
    if "--dataset_name" not in filled:
        argv += ["--dataset_name", data]
    return argv + filled


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_cli_bad_input_gives_one_clear_message_and_exit_code_2(case, tiny_llama_path, tmp_path, good_data, capsys):
    files, argv, expected = CLI_CASES[case]
    if case == "json types change between rows" and int(datasets.__version__.split(".")[0]) < 4:
        expected = "changed from string to object in row 3"  # datasets 3's JSON reader says it first, as clearly
    for name, content in files.items():
        write(tmp_path / name, content)
    with pytest.raises(SystemExit) as exited:
        main(cli_argv(argv, tmp_path, tiny_llama_path, good_data))
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert expected.replace("{tmp}", str(tmp_path)) in err
    assert "Traceback" not in err
    message = [line for line in err.splitlines() if line.startswith("sftune sft: error:")]
    assert len(message) == 1, err


def test_nan_weights_are_refused_from_the_command_line(tiny_llama_path, tmp_path, good_data, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_llama_path, tmp_path / "bad")
    weights = tmp_path / "bad" / "model.safetensors"
    state = load_file(weights)
    state["model.norm.weight"][3] = math.nan
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(SystemExit) as exited:
        main(cli_argv(["--model_name_or_path", str(tmp_path / "bad")], tmp_path, tiny_llama_path, good_data))
    assert exited.value.code == 2
    assert "weight model.norm.weight holds 1 NaN/infinite values" in capsys.readouterr().err


def test_a_real_process_prints_no_traceback(tmp_path):
    write(tmp_path / "d.jsonl", GOOD_ROW + "{oops\n")
    command = [sys.executable, "-m", "sftune.cli", "sft", "--model_name_or_path", str(tmp_path),
               "--dataset_name", str(tmp_path / "d.jsonl"), "--output_dir", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "d.jsonl: line 2 is not valid JSON" in done.stderr and "Traceback" not in done.stderr


def test_csv_columns_are_text(tmp_path):
    from sftune.cli import load_any_dataset

    path = write(tmp_path / "d.csv", "prompt,completion\nWhat is 2+2?,4\nAnd 3+3?,6\n")
    data = load_any_dataset(path)
    assert data["completion"] == ["4", "6"]


def test_nan_during_training_exits_1_from_the_cli(tiny_llama_path, tmp_path, good_data, capsys, monkeypatch):
    from sftune.trainers.guards import NonFiniteGuard

    original = NonFiniteGuard.observe_loss
    monkeypatch.setattr(NonFiniteGuard, "observe_loss", lambda self, loss: original(self, loss * math.nan))
    with pytest.raises(SystemExit) as exited:
        main(cli_argv(["--save_strategy", "no"], tmp_path, tiny_llama_path, good_data))
    err = capsys.readouterr().err
    assert exited.value.code == 1
    assert "Training stopped at step 1: the loss is nan" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "model.safetensors").exists()  # no NaN model saved


# --------------------------------------------------------------------------------------------------------------
# The same mistakes through the Python API: a clear exception before training starts
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_seq_length", -1), ("max_length", 0), ("per_device_train_batch_size", 0), ("per_device_eval_batch_size", -2),
     ("gradient_accumulation_steps", 0), ("dataset_batch_size", 0), ("dataset_num_proc", 0), ("num_of_sequences", 0),
     ("chars_per_token", 0.0), ("learning_rate", math.inf), ("weight_decay", -0.1), ("max_grad_norm", math.nan),
     ("warmup_steps", -1), ("eval_steps", 0), ("save_total_limit", 0), ("label_smoothing_factor", 1.5),
     ("neftune_noise_alpha", -1.0), ("dataloader_num_workers", -1), ("learning_rate", "1e-4"), ("max_steps", -2)],
)  # fmt: skip
def test_config_refuses_bad_numbers_naming_the_field(field, value, tmp_path):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        SFTConfig(output_dir=str(tmp_path), **{field: value})


def test_formatting_func_that_raises_names_the_row(tiny_llama_path, tmp_path):
    data = Dataset.from_list([{"q": "a", "a": "b"}, {"q": "c", "a": "d"}, {"q": "e"}])

    def formatting_func(example):
        return example["q"] + " " + example["answer_text"] if example["a"] is None else example["q"] + example["a"]

    args = SFTConfig(output_dir=str(tmp_path), report_to="none")
    with pytest.raises(DatasetFormatError, match=r"formatting_func raised KeyError: 'answer_text' on row 2"):
        SFTTrainer(str(tiny_llama_path), args=args, train_dataset=data, formatting_func=formatting_func)


def test_tokenized_rows_without_masks_refuse_assistant_only_loss(tiny_llama_path, tmp_path):
    args = SFTConfig(output_dir=str(tmp_path), report_to="none", assistant_only_loss=True)
    with pytest.raises(DatasetFormatError, match="no 'assistant_masks' column"):
        SFTTrainer(str(tiny_llama_path), args=args, train_dataset=Dataset.from_list([{"input_ids": [1, 2]}]))


def test_completion_only_loss_on_conversations_points_to_assistant_only_loss(tiny_llama_path, tmp_path):
    import json

    args = SFTConfig(output_dir=str(tmp_path), report_to="none", completion_only_loss=True)
    data = Dataset.from_list([json.loads(GOOD_ROW)])
    with pytest.raises(DatasetFormatError, match="use assistant_only_loss=True"):
        SFTTrainer(str(tiny_llama_path), args=args, train_dataset=data)
