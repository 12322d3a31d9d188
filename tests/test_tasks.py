"""The bundled task: deterministic, exact answers, and a held-out split never seen in training."""

from __future__ import annotations

import json

from sftune import tasks


def test_splits_are_deterministic_and_disjoint():
    train, test = tasks.make_task_splits(300, 60, seed=0)
    again_train, again_test = tasks.make_task_splits(300, 60, seed=0)
    assert train == again_train and test == again_test
    prompts = lambda rows: {r["messages"][1]["content"] for r in rows}  # noqa: E731
    assert not prompts(train) & prompts(test)
    assert len(prompts(test)) == 60
    assert tasks.make_task_splits(10, 5, seed=1) != tasks.make_task_splits(10, 5, seed=0)


def test_answers_follow_the_operations():
    for example in tasks.make_task_examples(200, seed=3):
        instruction, items = example["messages"][1]["content"].split(": ")
        items = items.split(", ")
        expected = ", ".join(tasks.OPERATIONS[instruction](items))
        assert example["answer"] == expected == example["messages"][-1]["content"]
        assert tasks.prompt_messages(example) == example["messages"][:-1]


def test_exact_match_is_strict():
    assert tasks.is_correct("  sun, owl\n", "sun, owl")
    assert not tasks.is_correct("sun, owl.", "sun, owl")
    assert not tasks.is_correct("The list is: sun, owl", "sun, owl")


def test_jsonl_files(tmp_path):
    train, test = tasks.write_task_jsonl(tmp_path, n_train=5, n_test=3, seed=0)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    assert len(rows) == 5 and {"messages", "answer"} <= set(rows[0])
    assert len(test.read_text().splitlines()) == 3
