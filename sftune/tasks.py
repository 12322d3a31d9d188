"""The bundled task: list transformations with exact answers, generated deterministically from a seed.

"Reverse the list: fig, owl, sun" -> "sun, owl, fig". The operations need copying and reordering, not knowledge,
so a small model can learn them in minutes; the base SmolLM2 model answers in chatty prose and scores ~0%
exact match. Standard library only.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SYSTEM = "Transform the list. Reply with the list only."
WORDS = (
    "apple bird cake door fish goat hat ink jam kite lamp moon nest owl pen queen rain sun tree van "
    "wolf box cup dog egg fox gum hill ice jar key leaf map net oak pig rug sock toy vase"
).split()


def _reverse(items: list[str]) -> list[str]:
    return items[::-1]


def _swap_ends(items: list[str]) -> list[str]:
    return [items[-1], *items[1:-1], items[0]]


def _rotate_left(items: list[str]) -> list[str]:
    return [*items[1:], items[0]]


OPERATIONS = {
    "Reverse the list": _reverse,
    "Swap the first and last items": _swap_ends,
    "Move the first item to the end": _rotate_left,
}


def make_example(rng: random.Random) -> dict:
    """One example: a random operation applied to 3-5 distinct words drawn with `rng`."""
    instruction = rng.choice(sorted(OPERATIONS))
    items = rng.sample(WORDS, rng.randint(3, 5))
    answer = ", ".join(OPERATIONS[instruction](items))
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"{instruction}: {', '.join(items)}"},
        {"role": "assistant", "content": answer},
    ]
    return {"messages": messages, "answer": answer}


def make_task_examples(n: int, seed: int) -> list[dict]:
    """`n` examples (possibly repeating prompts) from a seeded generator."""
    rng = random.Random(seed)
    return [make_example(rng) for _ in range(n)]


def make_task_splits(n_train: int = 400, n_test: int = 100, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and test splits with distinct prompts: no test prompt is ever seen in training.

    The test split is drawn first, so it does not depend on `n_train`; every prompt is checked against all
    prompts drawn before it (test and train), so neither split repeats a prompt either.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: list[list[dict]] = [[], []]
    for split, size in ((1, n_test), (0, n_train)):
        while len(splits[split]) < size:
            example = make_example(rng)
            prompt = example["messages"][1]["content"]
            if prompt not in seen:
                seen.add(prompt)
                splits[split].append(example)
    return splits[0], splits[1]


def prompt_messages(example: dict) -> list[dict]:
    """What the model is given at evaluation time: everything but the final assistant turn."""
    return [m for m in example["messages"] if m["role"] != "assistant"]


def normalize_answer(text: str) -> str:
    """The text with surrounding whitespace removed (the only normalisation exact match allows)."""
    return text.strip()


def is_correct(generated: str, answer: str) -> bool:
    """Exact match after stripping surrounding whitespace; nothing looser."""
    return normalize_answer(generated) == normalize_answer(answer)


def write_task_jsonl(directory: str | Path, n_train: int = 400, n_test: int = 100, seed: int = 0) -> tuple[Path, Path]:
    """Write train.jsonl and test.jsonl ({"messages": [...], "answer": ...} per line) and return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in zip(("train", "test"), make_task_splits(n_train, n_test, seed), strict=True):
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths.append(path)
    return paths[0], paths[1]


# --------------------------------------------------------------------------------------------------------------
# A second task: multi-step arithmetic with a numeric answer (checked by the number it ends with)
# --------------------------------------------------------------------------------------------------------------

ARITHMETIC_SYSTEM = "Solve the problem. End your reply with the final number."


def make_arithmetic_example(rng: random.Random) -> dict:
    """`a + b - c`, `a * b + c` or `(a + b) * c` with small operands: two steps, one integer answer."""
    a, b, c = rng.randint(2, 20), rng.randint(2, 20), rng.randint(2, 9)
    form = rng.randrange(3)
    if form == 0:
        question, value = f"What is {a} + {b} - {c}?", a + b - c
    elif form == 1:
        question, value = f"What is {a % 10 + 2} * {c} + {b}?", (a % 10 + 2) * c + b
    else:
        question, value = f"What is ({a} + {b}) * {c % 4 + 2}?", (a + b) * (c % 4 + 2)
    messages = [
        {"role": "system", "content": ARITHMETIC_SYSTEM},
        {"role": "user", "content": question},
        {"role": "assistant", "content": str(value)},
    ]
    return {"messages": messages, "answer": str(value)}


def make_small_arithmetic_example(rng: random.Random) -> dict:
    """Three single-digit operands, two steps: `a + b + c`, `a + b - c` or `a - b + c` (never negative)."""
    a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
    form = rng.randrange(3)
    if form == 2 and a < b:
        a, b = b, a
    if form == 1 and a + b < c:
        c = rng.randint(1, a + b)
    question, value = [
        (f"What is {a} + {b} + {c}?", a + b + c),
        (f"What is {a} + {b} - {c}?", a + b - c),
        (f"What is {a} - {b} + {c}?", a - b + c),
    ][form]
    messages = [
        {"role": "system", "content": ARITHMETIC_SYSTEM},
        {"role": "user", "content": question},
        {"role": "assistant", "content": str(value)},
    ]
    return {"messages": messages, "answer": str(value)}


def make_arithmetic_splits(
    n_train: int = 400, n_test: int = 100, seed: int = 0, small: bool = False
) -> tuple[list[dict], list[dict]]:
    """Train and test splits of distinct arithmetic questions (test drawn first, as in `make_task_splits`);
    `small`: single-digit operands."""
    make_arithmetic = make_small_arithmetic_example if small else make_arithmetic_example
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: list[list[dict]] = [[], []]
    for split, size in ((1, n_test), (0, n_train)):
        while len(splits[split]) < size:
            example = make_arithmetic(rng)
            if example["messages"][1]["content"] not in seen:
                seen.add(example["messages"][1]["content"])
                splits[split].append(example)
    return splits[0], splits[1]


def write_arithmetic_jsonl(
    directory: str | Path, n_train: int = 400, n_test: int = 100, seed: int = 0, small: bool = False
) -> tuple[Path, Path]:
    """Write the arithmetic task's train.jsonl and test.jsonl and return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in zip(("train", "test"), make_arithmetic_splits(n_train, n_test, seed, small), strict=True):
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths.append(path)
    return paths[0], paths[1]


# --------------------------------------------------------------------------------------------------------------
# A JSON variant of the bundled task: the same transformations, answered as a JSON array (checked as JSON)
# --------------------------------------------------------------------------------------------------------------

JSON_SYSTEM = "Transform the list. Reply with a JSON array of strings only."


def make_json_list_example(rng: random.Random) -> dict:
    """`Reverse the list: fig, owl, sun` -> `["sun", "owl", "fig"]`: right when it parses to the same array."""
    instruction = rng.choice(sorted(OPERATIONS))
    items = rng.sample(WORDS, rng.randint(3, 5))
    answer = json.dumps(OPERATIONS[instruction](items))
    messages = [
        {"role": "system", "content": JSON_SYSTEM},
        {"role": "user", "content": f"{instruction}: {', '.join(items)}"},
        {"role": "assistant", "content": answer},
    ]
    return {"messages": messages, "answer": answer}


def write_json_list_jsonl(
    directory: str | Path, n_train: int = 400, n_test: int = 100, seed: int = 0
) -> tuple[Path, Path]:
    """Write the JSON list task's train.jsonl and test.jsonl (distinct prompts, test drawn first)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: list[list[dict]] = [[], []]
    for split, size in ((1, n_test), (0, n_train)):
        while len(splits[split]) < size:
            example = make_json_list_example(rng)
            if example["messages"][1]["content"] not in seen:
                seen.add(example["messages"][1]["content"])
                splits[split].append(example)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in zip(("train", "test"), (splits[0], splits[1]), strict=True):
        path = directory / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths.append(path)
    return paths[0], paths[1]
