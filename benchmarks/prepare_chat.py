"""Preparation speed of multi-turn conversations (3 assistant turns each), and the token overhead of rendering turns
as at inference.

Run on one core, before (an older sftune on PYTHONPATH) and after, alternating, in the same session:

    PYTHONPATH=/path/to/old taskset -c 0 python benchmarks/prepare_chat.py --overhead-rows 0   # before
    PYTHONPATH=$PWD taskset -c 0 python benchmarks/prepare_chat.py --overhead-rows 0           # after

Prints one JSON line: which sftune ran, examples/s with assistant_only_loss True and False (SmolLM2's ChatML
template and tokenizer), and, where the code has `assistant_turns_as_examples`, the tokens on Qwen3 (real
vocabulary from the tests' fixtures) with reasoning in every turn: each conversation rendered once, the default
(turns the whole rendering does not show as at inference rendered apart), and every turn apart.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

WORDS = "the a model answer question data token train loss turn reply user value city weather number list".split()


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def conversations(n: int, seed: int = 0, reasoning: bool = False) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        messages = [{"role": "system", "content": sentence(rng, 4, 12)}]
        for _turn in range(3):
            messages.append({"role": "user", "content": sentence(rng, 5, 30)})
            reply = {"role": "assistant", "content": " ".join(sentence(rng, 5, 25) for _ in range(rng.randint(1, 4)))}
            if reasoning:
                reply["reasoning_content"] = " ".join(sentence(rng, 8, 30) for _ in range(rng.randint(1, 3)))
            messages.append(reply)
        rows.append({"messages": messages})
    return rows


def time_prepare(tokenizer, rows: list[dict], **options) -> float:
    from datasets import Dataset

    from sftune.data.tokenize import TokenizeOptions, prepare_dataset

    data = Dataset.from_list(rows)
    start = time.perf_counter()
    prepared = prepare_dataset(data, tokenizer, TokenizeOptions(max_length=None, **options), batch_size=1000)
    elapsed = time.perf_counter() - start
    assert len(prepared) >= len(rows)
    return len(rows) / elapsed


def turn_overhead(rows: list[dict]) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from datasets import Dataset

    from sftune.data.tokenize import TokenizeOptions, prepare_dataset
    from tests import real_tokenizers

    tokenizer = real_tokenizers.load("qwen3")
    data = Dataset.from_list(rows)
    out = {}
    modes = {
        "whole_rendering": {"assistant_only_loss": False},  # each conversation rendered once: the baseline tokens
        "default": {"assistant_only_loss": True},
        "per_turn": {"assistant_only_loss": True, "assistant_turns_as_examples": True},
    }
    for mode, options in modes.items():
        prepared = prepare_dataset(data, tokenizer, TokenizeOptions(max_length=None, **options))
        out[mode] = {
            "examples": len(prepared),
            "tokens": sum(len(ids) for ids in prepared["input_ids"]),
            "trained": sum(sum(mask) for mask in prepared["loss_mask"]),
        }
    base = out["whole_rendering"]["tokens"]
    out["token_overhead_default"] = round(out["default"]["tokens"] / base, 3)
    out["token_overhead_per_turn"] = round(out["per_turn"]["tokens"] / base, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--overhead-rows", type=int, default=2_000, help="0: skip the token overhead measurement")
    args = parser.parse_args()

    import datasets
    from transformers import AutoTokenizer

    import sftune
    from sftune.data.tokenize import TokenizeOptions
    from sftune.models import smollm2_path

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    rows = conversations(args.rows)
    result = {
        "sftune": str(Path(sftune.__file__).parent),
        "rows": args.rows,
        "assistant_turns": 3,
        "examples_per_s_assistant_only": round(time_prepare(tokenizer, rows, assistant_only_loss=True), 1),
        "examples_per_s_all_tokens": round(time_prepare(tokenizer, rows, assistant_only_loss=False), 1),
    }
    if args.overhead_rows and "assistant_turns_as_examples" in TokenizeOptions.__dataclass_fields__:
        result["qwen3_reasoning_per_turn"] = turn_overhead(conversations(args.overhead_rows, 1, reasoning=True))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
