"""Trained models carry the `sft` and `sftune` tags, in model.model_tags and in the saved model card."""

from __future__ import annotations

from datasets import Dataset

from sftune import IterativeSFTConfig, IterativeSFTTrainer, SFTConfig, SFTTrainer


def card_tags(path) -> list[str]:
    header = path.read_text().split("---")[1]
    return [line[2:] for line in header.splitlines() if line.startswith("- ")]


def test_sft_trainer_tags_model_and_card(tiny_llama_path, tmp_path):
    args = SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", max_seq_length=32)
    trainer = SFTTrainer(str(tiny_llama_path), args=args, train_dataset=Dataset.from_list([{"text": "hi there"}]))
    trainer.model.add_model_tags(["mine"])
    assert {"sft", "sftune"} <= set(trainer.model.model_tags)
    trainer.save_model(str(tmp_path / "saved"))
    assert {"sft", "sftune", "mine"} <= set(card_tags(tmp_path / "saved" / "README.md"))


def test_sft_trainer_tags_peft_models(tiny_llama_path, tmp_path):
    from peft import LoraConfig

    args = SFTConfig(output_dir=str(tmp_path / "out"), report_to="none", max_seq_length=32)
    trainer = SFTTrainer(str(tiny_llama_path), args=args, train_dataset=Dataset.from_list([{"text": "hi there"}]),
                         peft_config=LoraConfig(r=4, target_modules=["q_proj"]))  # fmt: skip
    assert {"sft", "sftune"} <= set(trainer.model.get_base_model().model_tags)


def test_iterative_trainer_tags_model_and_card(tiny_llama_path, tmp_path):
    trainer = IterativeSFTTrainer(str(tiny_llama_path), args=IterativeSFTConfig(str(tmp_path / "o"), report_to="none"))
    assert {"sft", "sftune"} <= set(trainer.model.model_tags)
    trainer.save_model(str(tmp_path / "saved"))
    assert {"sft", "sftune"} <= set(card_tags(tmp_path / "saved" / "README.md"))
