"""Builders for tiny offline tokenizers and models (plain functions; tests/conftest.py wraps them)."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", "<s>", "</s>", "[INST]", "[/INST]"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama-2 style: the system prompt is folded into the first user turn; assistant turns end with </s>.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '<s>[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + ' </s>' }}{% endif %}"
    "{% endfor %}"
)

WORDS = (
    "the a an one two three four five six seven eight nine ten red blue green amber violet teal gold pink "
    "what is and or plus minus times say answer question hello world friend sky how are you fine thanks "
    "be brief think number here row some words short much longer no yes done up there hi I cat dog list "
    "reverse sort first last item apple pear fig word sentence model train data token"
).split()


def corpus(n: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        words += [str(rng.randint(0, 999))]
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ",", ":", ""]))
    lines += ["### Question: ### Answer: ### Human: ### Assistant: #### User: #### Assistant:"] * 20
    lines += ["\n".join(WORDS), "0 1 2 3 4 5 6 7 8 9 10 11 12", "w" + " w".join(map(str, range(300)))]
    return lines


_TOKENIZER_CACHE: dict[str, Tokenizer] = {}


def bpe_tokenizer() -> Tokenizer:
    if "bpe" not in _TOKENIZER_CACHE:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=800, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        tokenizer.train_from_iterator(corpus(), trainer=trainer)
        _TOKENIZER_CACHE["bpe"] = tokenizer
    return _TOKENIZER_CACHE["bpe"]


def build_tokenizer(
    out_dir: Path,
    chat_template: str | None = None,
    eos: str = "<|endoftext|>",
    pad: str | None = None,
    bos: str | None = None,
) -> Path:
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe_tokenizer(), eos_token=eos, pad_token=pad, bos_token=bos, model_max_length=512
    )
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def build_tiny_causal_lm(arch: str, tokenizer_path: Path, out_dir: Path, **overrides) -> Path:
    """A random 2-layer causal LM of the given architecture ('llama' or 'qwen2'), saved with its tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_class, model_class = classes[arch]
    values = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    values.update(overrides)
    torch.manual_seed(0)
    model = model_class(config_class(**values))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)


def build_tiny_t5(tokenizer_path: Path, out_dir: Path) -> Path:
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return Path(out_dir)
