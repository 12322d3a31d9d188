"""Chat formats: give a model without one a chat template and its special tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FORMATS = {"chatml": {"bos": "<|im_start|>", "eos": "<|im_end|>", "template": CHATML_TEMPLATE}}


@dataclass
class ChatMlSpecialTokens:
    """The ChatML format's special tokens and template (what `setup_chat_format(..., "chatml")` installs)."""

    bos_token: str = "<|im_start|>"
    eos_token: str = "<|im_end|>"
    pad_token: str = "<|im_end|>"

    @property
    def system(self) -> str:
        return f"{self.bos_token}system"

    @property
    def user(self) -> str:
        return f"{self.bos_token}user"

    @property
    def assistant(self) -> str:
        return f"{self.bos_token}assistant"

    @property
    def chat_template(self) -> str:
        return CHATML_TEMPLATE


def setup_chat_format(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    format: str = "chatml",
    resize_to_multiple_of: int | None = None,
) -> tuple[Any, Any]:
    """Add a chat format's special tokens, template and bos/eos/pad to `tokenizer`, and resize `model` to match.

    Refuses a tokenizer that already has a chat template: replacing it would silently change how the model was
    taught to converse.
    """
    if format not in FORMATS:
        raise ValueError(f"Unknown chat format {format!r}; available: {sorted(FORMATS)}.")
    if getattr(tokenizer, "chat_template", None) is not None:
        raise ValueError(
            "The tokenizer already has a chat template; setup_chat_format would replace it. Keep the existing "
            "template, or set tokenizer.chat_template = None first if you really mean to replace it."
        )
    spec = FORMATS[format]
    tokenizer.add_special_tokens({"additional_special_tokens": [spec["bos"], spec["eos"]]})
    tokenizer.bos_token = spec["bos"]
    tokenizer.eos_token = spec["eos"]
    tokenizer.pad_token = spec["eos"]
    tokenizer.chat_template = spec["template"]
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=resize_to_multiple_of)
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None:
            for key, value in ids.items():
                setattr(config, key, value)
    return model, tokenizer
