"""`sftune preview --config X` shows exactly the examples `sftune sft --config X` trains, for every pipeline option.

Both commands run as users run them (their own argument parsing of the same YAML recipe); training is stopped
before its first step and its prepared `train_dataset` compared with the rows preview returns. Each recipe sets
one `TokenizeOptions` field to a non-default value, and must change the rows (else the case proves nothing)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml
from datasets import Dataset
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer, GenerationConfig

from sftune.cli import run_preview, run_sft
from sftune.data.packing import pack_dataset
from sftune.data.tokenize import TokenizeOptions
from sftune.errors import DatasetFormatError, UsageError
from sftune.trainers.sft import SFTTrainer
from tests.fixtures import build_tiny_causal_lm, build_tokenizer

# ChatML that drops past reasoning (so a past turn with <think> is not shown as at inference: inexact_turns
# matters) and takes a template keyword (`style`: chat_template_kwargs matters).
TEMPLATE = (
    "{% if style %}{{ '<|im_start|>system\n' + style + '<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% set content = message['content'] %}"
    "{% if message['role'] == 'assistant' and not loop.last %}{% set content = content.split('</think>')[-1] %}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + content + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LONG = " ".join(f"w{i}" for i in range(40))
DATA = {
    "text": [{"text": LONG}, {"text": "hello world friend"}, {"text": LONG[:60]}],
    "body": [{"body": LONG}, {"body": "hello world friend"}],
    "prompt_completion": [
        {"prompt": "what is two plus two?", "completion": " four."},
        {"prompt": "hi", "completion": " hello"},
    ],
    "chat": [
        {
            "messages": [
                {"role": "user", "content": "one plus one?"},
                {"role": "assistant", "content": "<think>easy</think>two"},
                {"role": "user", "content": "and two plus two?"},
                {"role": "assistant", "content": "four"},
            ]
        },
        {"messages": [{"role": "user", "content": "say hi"}, {"role": "assistant", "content": "hi"}]},
    ],
}
# field -> (data, recipe setting it, the recipe it is compared against to show it changes the rows)
CASES = {
    "max_length": ("text", {"max_length": 12}, {}),
    "text_field": ("body", {"dataset_text_field": "body"}, None),  # the default finds no text column
    "add_special_tokens": ("text", {"dataset_kwargs": {"add_special_tokens": False}}, {}),
    "completion_only_loss": ("prompt_completion", {"completion_only_loss": False}, {}),
    "assistant_only_loss": ("chat", {"assistant_only_loss": True}, {}),
    "truncation_mode": ("text", {"max_length": 12, "truncation_mode": "keep_end"}, {"max_length": 12}),
    "assistant_turns_as_examples": ("chat", {"assistant_turns_as_examples": True}, {}),
    # Both refuse the row, with the same message.
    "inexact_turns": ("chat", {"assistant_only_loss": True, "inexact_turns": "error"}, {"assistant_only_loss": True}),
    "chat_template_kwargs": ("chat", {"chat_template_kwargs": {"style": "be brief"}}, {}),
    "stop_tokens": ("chat", {"assistant_only_loss": True}, {"assistant_only_loss": True}),  # + generation_config
    "overlong": (
        "text",
        {"packing": True, "packing_strategy": "bfd_split", "max_length": 12},
        {"packing": True, "packing_strategy": "bfd", "max_length": 12},
    ),
}
WRAPPED = ("text", {"packing": True, "packing_strategy": "wrapped", "max_length": 12}, {"max_length": 12})


def test_every_pipeline_option_has_a_case():
    assert {field.name for field in dataclasses.fields(TokenizeOptions)} == set(CASES)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny model whose tokenizer adds BOS (add_special_tokens matters), and a copy with an explicit generation
    config whose eos_token_id is not the tokenizer's EOS (stop tokens matter)."""
    root = tmp_path_factory.mktemp("preview_model")
    tokenizer_dir = build_tokenizer(root / "tok", chat_template=TEMPLATE, eos="<|endoftext|>", pad="<pad>", bos="<s>")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    bos = tokenizer.convert_tokens_to_ids("<s>")
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tokenizer.save_pretrained(tokenizer_dir)
    plain = build_tiny_causal_lm("llama", tokenizer_dir, root / "model")
    assert AutoTokenizer.from_pretrained(plain)("a")["input_ids"][0] == bos
    explicit = build_tiny_causal_lm("llama", tokenizer_dir, root / "model_stop")
    GenerationConfig(eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>")]).save_pretrained(explicit)
    return {"plain": plain, "explicit": explicit}


def run_both(tmp_path, model_dir, data_name, settings, monkeypatch):
    """(rows preview shows, rows sft trains) for a recipe, or the error message each gives."""
    data_path = tmp_path / f"{data_name}.jsonl"
    data_path.write_text("".join(json.dumps(row) + "\n" for row in DATA[data_name]))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(model_dir),
                "dataset_name": str(data_path),
                "output_dir": str(tmp_path / "out"),
                "report_to": "none",
                **settings,
            }
        )
    )

    class Prepared(Exception):
        pass

    def stop_before_training(trainer, *args, **kwargs):
        raise Prepared(trainer)

    monkeypatch.setattr(SFTTrainer, "train", stop_before_training)
    try:
        shown = run_preview(["--config", str(recipe), "--rows", "100", "--color", "never"])
    except (DatasetFormatError, UsageError) as err:
        shown = f"error: {err}"
    try:
        run_sft(["--config", str(recipe)])
        raise AssertionError("training was not reached")
    except Prepared as stopped:
        trainer = stopped.args[0]
        trained = [dict(row) for row in trainer.train_dataset]
        if settings.get("packing") and isinstance(shown, list):
            shown = [
                dict(row)
                for row in pack_dataset(
                    Dataset.from_list(shown),
                    trainer.args.max_length,
                    trainer.args.packing_strategy,
                    seed=trainer.args.seed,
                )
            ]
    except (DatasetFormatError, UsageError) as err:
        trained = f"error: {err}"
    if isinstance(shown, list) and isinstance(trained, list):
        keys = ["input_ids", "loss_mask"]
        shown = [
            {key: row[key] for key in keys} | ({"seq_lengths": row["seq_lengths"]} if "seq_lengths" in row else {})
            for row in shown
        ]
        trained = [
            {key: row[key] for key in keys} | ({"seq_lengths": row["seq_lengths"]} if "seq_lengths" in row else {})
            for row in trained
        ]
    return shown, trained


@pytest.mark.parametrize("field", [*CASES, "wrapped_packing"])
def test_preview_shows_the_rows_sft_trains(field, model_dirs, tmp_path, monkeypatch):
    data_name, settings, baseline = WRAPPED if field == "wrapped_packing" else CASES[field]
    model_dir = model_dirs["explicit" if field == "stop_tokens" else "plain"]
    shown, trained = run_both(tmp_path, model_dir, data_name, settings, monkeypatch)
    assert shown == trained
    if baseline is not None:  # the option is in effect: without it, the rows differ
        default_model = model_dirs["plain"]
        default_shown, default_trained = run_both(tmp_path, default_model, data_name, baseline, monkeypatch)
        assert default_shown == default_trained
        assert default_trained != trained


def test_sft_trainer_takes_stop_tokens_from_the_models_explicit_generation_config(model_dirs, tmp_path):
    """A generation config set on the model (not a file beside the tokenizer) decides where trained replies end."""
    from sftune.config import SFTConfig
    from sftune.data.tokenize import prepare_dataset
    from sftune.models import load_model

    tokenizer = AutoTokenizer.from_pretrained(model_dirs["plain"].parent / "tok")  # no generation_config.json here
    data = Dataset.from_list(DATA["chat"])
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, report_to="none")

    def trained(generation_config):
        model = load_model(str(model_dirs["plain"]), {})
        if generation_config is not None:
            model.generation_config = generation_config
        return SFTTrainer(model, args=args, train_dataset=data, processing_class=tokenizer).train_dataset

    derived = trained(None)  # derived from the model config: says nothing about stop tokens
    explicit = trained(GenerationConfig(eos_token_id=[tokenizer.eos_token_id]))
    expected = prepare_dataset(
        data,
        tokenizer,
        TokenizeOptions(max_length=args.max_length, assistant_only_loss=True, stop_tokens=("<|endoftext|>",)),
    )
    assert explicit["input_ids"] == expected["input_ids"] and explicit["loss_mask"] == expected["loss_mask"]
    assert derived["loss_mask"] != explicit["loss_mask"]
