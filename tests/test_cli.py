"""The command line: YAML + overrides, training end to end on a tiny model, eval and preview."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from sftune import tasks
from sftune.cli import UsageError, load_any_dataset, main, parse_sft_args


def write_recipe(path, text: str):
    path.write_text(text)
    return str(path)


def test_yaml_gives_defaults_and_the_command_line_wins(tmp_path):
    recipe = write_recipe(
        tmp_path / "r.yaml",
        "learning_rate: 0.001\nlora_r: 4\nuse_peft: true\nmax_length: 99\nmodel_init_kwargs: {dtype: bfloat16}\n"
        "output_dir: out\nlora_target_modules: [q_proj, v_proj]\n",
    )
    script, sft, model = parse_sft_args(["--config", recipe, "--learning_rate", "0.5", "--dataset_name", "d.jsonl"])
    assert sft.learning_rate == 0.5  # command line beats the file
    assert model.lora_r == 4 and model.use_peft and model.lora_target_modules == ["q_proj", "v_proj"]
    assert sft.max_seq_length == 99 and sft.model_init_kwargs == {"dtype": "bfloat16"}
    assert script.dataset_name == "d.jsonl"


def test_unknown_yaml_key_is_refused(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", "learning_rat: 0.1\n")
    with pytest.raises(UsageError, match="learning_rat"):
        parse_sft_args(["--config", recipe])


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_local_files_load_by_extension(tmp_path, suffix):
    from datasets import Dataset

    data = Dataset.from_list([{"text": "a b"}, {"text": "c d"}])
    path = tmp_path / f"data{suffix}"
    {".jsonl": data.to_json, ".csv": data.to_csv, ".parquet": data.to_parquet}[suffix](str(path))
    assert load_any_dataset(str(path))["text"] == ["a b", "c d"]


def test_sft_command_trains_saves_merged_model_and_summarises(tiny_llama_path, tmp_path, capsys):
    train, test = tasks.write_task_jsonl(tmp_path / "data", n_train=16, n_test=4, seed=1)
    recipe = write_recipe(
        tmp_path / "r.yaml",
        "use_peft: true\nlora_r: 4\nlora_target_modules: [all-linear]\nassistant_only_loss: true\n"
        "max_steps: 3\nper_device_train_batch_size: 4\nlogging_steps: 1\nsave_strategy: 'no'\nreport_to: none\n"
        "learning_rate: 0.001\n",
    )
    out = tmp_path / "model"
    main(["sft", "--config", recipe, "--model_name_or_path", str(tiny_llama_path), "--dataset_name", str(train),
          "--output_dir", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "tokens_trained" in printed and "final_loss" in printed and str(out) in printed
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "adapter" / "adapter_config.json").exists()
    assert not (out / "adapter_config.json").exists()  # plain transformers loads a full model from out
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in model.named_parameters())

    main(["eval", "--model", str(out), "--dataset", str(test), "--max_new_tokens", "4", "--show", "1"])
    assert "exact match:" in capsys.readouterr().out


def test_preview_marks_trained_tokens(tiny_llama_path, tmp_path, capsys):
    train, _ = tasks.write_task_jsonl(tmp_path / "data", n_train=2, n_test=1, seed=2)
    recipe = write_recipe(tmp_path / "r.yaml", "assistant_only_loss: true\n")
    main(["preview", "--model", str(tiny_llama_path), "--dataset", str(train), "--rows", "1", "--config", recipe,
          "--color", "never"])  # fmt: skip
    printed = capsys.readouterr().out
    answer = json.loads(train.read_text().splitlines()[0])["answer"]
    assert f"[[{answer}<|im_end|>]]" in printed  # never the newline after the end-of-turn token
    assert "row 0" in printed


def test_no_command_prints_usage(capsys):
    with pytest.raises(SystemExit):
        main([])
    assert "sftune sft" in capsys.readouterr().out
