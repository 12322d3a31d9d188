"""The documented vision-language path: skip_prepare_dataset + a custom collator + remove_unused_columns=False."""

from __future__ import annotations

import warnings

import datasets
import numpy as np
import pytest
import torch
from datasets import Dataset
from PIL import Image
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from sftune import SFTConfig, SFTTrainer
from sftune.compat import TRANSFORMERS_5

TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<image> ' }}"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}{{ '\n' }}{% endfor %}"
)


def tiny_llava(tokenizer_path):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the PIL image processor is used without torchvision, on purpose
        from transformers import CLIPImageProcessor

        image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
        ),  # fmt: skip
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        ),  # fmt: skip
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
    )
    config.image_token_index = config.image_token_id  # its transformers 4.x name
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config), processor


@pytest.mark.skipif(
    not TRANSFORMERS_5,
    reason="transformers 4.x Llava counts image features differently from this tiny model's 5.x-style processor "
    "(expanded image tokens); the positional-processor path is tested on both in tests/dropin/test_version_compat.py",
)
def test_tiny_llava_trains_on_image_text_rows(tiny_chatml_tokenizer_path, tmp_path):
    model, processor = tiny_llava(tiny_chatml_tokenizer_path)
    rng = np.random.default_rng(0)
    rows = [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is this?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": colour}]},
            ],
            "images": [Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8))],
        }
        for colour in ["red", "blue", "green", "teal"]
    ]
    # datasets < 4 stores PIL images as {bytes, path} structs unless told the column holds images.
    train_dataset = Dataset.from_list(rows).cast_column("images", datasets.Sequence(datasets.Image()))

    def collate_fn(examples):
        texts = [processor.apply_chat_template(example["messages"], tokenize=False) for example in examples]
        images = [example["images"][0] for example in examples]
        batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
        batch.pop("token_type_ids", None)  # transformers 4.x processors add them and its Llava does not take them
        labels = batch["input_ids"].clone()
        labels[labels == processor.tokenizer.pad_token_id] = -100
        batch["labels"] = labels
        return batch

    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3,
                     report_to="none", save_strategy="no", disable_tqdm=True)  # fmt: skip
    args.dataset_text_field = ""  # needs a dummy field
    args.remove_unused_columns = False
    args.dataset_kwargs = {"skip_prepare_dataset": True}
    trainer = SFTTrainer(model=model, args=args, data_collator=collate_fn, train_dataset=train_dataset,
                         tokenizer=processor.tokenizer)  # fmt: skip

    def patch_embedding():
        (weight,) = [p for n, p in trainer.model.named_parameters() if n.endswith("patch_embedding.weight")]
        return weight.detach().clone()

    vision_before = patch_embedding()
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] > 0
    assert not torch.equal(vision_before, patch_embedding())  # images reached the model and were trained through
