"""sftune iterate: exact training tokens on real chat templates, batched sampling equal to transformers' own
generate, resume after kill -9 equal to an uninterrupted run, verifiers and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sftune import tasks
from sftune.data import render
from sftune.iterate import IterateConfig, RecipeError, Run, VerifierError, iterate
from sftune.iterate.prompts import prompt_ids, rows_to_prompts
from sftune.iterate.sampling import Job, plan_batches, sample_all, sample_seed
from sftune.iterate.verifiers import extract_number, make_verifier
from sftune.models import ensure_pad_token
from tests import real_tokenizers
from tests.iterate_helpers import end_of_turn_id, smollm2_tokenizer, tiny_model

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = sorted(real_tokenizers.PAIRS)


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def user_rows(n: int) -> list[dict]:
    """Prompts without a system turn (some templates refuse one), with references."""
    train, _ = tasks.make_task_splits(n_train=n, n_test=1)
    return [{"messages": [e["messages"][1]], "answer": e["answer"]} for e in train]


@pytest.fixture(scope="module")
def smollm2():
    tokenizer = smollm2_tokenizer()
    return tokenizer, end_of_turn_id(tokenizer)


# ------------------------------------------------------------------------------------------------------------------
# Exact: trained ids = the template's inference prompt + the ids the model drew, ending with its end-of-turn
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TEMPLATES)
def test_trained_tokens_are_inference_prompt_plus_sampled_ids(name, tmp_path):
    tokenizer = ensure_pad_token(real_tokenizers.load(name))
    end = end_of_turn_id(tokenizer)
    assert end is not None, f"{name}: no end-of-turn token found after an assistant reply"
    # The template's own rendering of a finished turn puts that token right after the reply (after whitespace,
    # for templates such as llama2's that write " </s>").
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}], tokenize=False
    )
    assert text.split("Yes", 1)[1].lstrip().startswith(tokenizer.convert_ids_to_tokens(end))
    model = tiny_model(tokenizer, end)
    rows = user_rows(3)
    config = IterateConfig(model="unused", dataset=write_rows(tmp_path / "train.jsonl", rows), rounds=1,
                           output_dir=str(tmp_path / "run"), verifier="regex", verifier_args={"pattern": ""},
                           samples_per_prompt=3, keep_per_prompt=3, max_new_tokens=40, batch_size=4,
                           progress=False)  # fmt: skip
    run = Run(config, model=model, tokenizer=tokenizer)
    run._generate(1, run.round_prompts(1))
    examples, _ = run._accepted_examples(1, run.round_prompts(1))
    samples = [json.loads(line) for line in (tmp_path / "run/round-1/samples.jsonl").read_text().splitlines()]
    kept = [s for s in samples if s["verdict"] == "accepted"]
    assert examples and len(examples) == len({(s["prompt_id"], tuple(s["token_ids"])) for s in kept})
    by_prompt = {str(i): r for i, r in enumerate(rows)}
    expected = set()
    for sample in kept:
        prompt = tokenizer.apply_chat_template(
            by_prompt[sample["prompt_id"]]["messages"], add_generation_prompt=True, tokenize=True
        )
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        assert sample["token_ids"][-1] == end and sample["stopped"]
        expected.add((tuple(prompt), tuple(sample["token_ids"])))
    for example in examples:
        assert (tuple(example.prompt_ids), tuple(example.completion_ids)) in expected
        assert example.completion_mask == [0] * len(example.prompt_ids) + [1] * len(example.completion_ids)
    # What the trainer receives through its pre-tokenized path is exactly that: ids, and the loss on the reply.
    prepared = run.trainer.prepare_examples([e.input_ids for e in examples], None, [e.labels for e in examples],
                                            None, None)  # fmt: skip
    for example, row in zip(examples, prepared, strict=True):
        assert row["input_ids"] == example.input_ids
        assert row["loss_mask"] == example.completion_mask


def test_stop_ids_are_the_generation_config_eos_else_the_templates_end_of_turn_and_eos():
    tokenizer = ensure_pad_token(real_tokenizers.load("llama3_1"))
    eot, end_of_text = (tokenizer.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>"))
    # Llama-3.1's own generation_config.json names both (and <|eom_id|>): generation stops at either.
    config = type("GenerationConfig", (), {"eos_token_id": [end_of_text, eot]})
    assert render.stop_token_ids(tokenizer, config) == [end_of_text, eot]
    # Without a generation config: the end-of-turn the template renders after a reply, and the tokenizer's EOS.
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}], tokenize=False
    )
    assert text.split("Yes", 1)[1].startswith("<|eot_id|>")
    assert eot in render.stop_token_ids(tokenizer) and tokenizer.eos_token_id in render.stop_token_ids(tokenizer)


@pytest.mark.parametrize("name", TEMPLATES)
def test_gold_reply_is_the_templates_reply_after_the_exact_inference_prompt(name, tmp_path):
    """train_on: reference and warm_start train the reference as the template renders that reply (what the model
    must generate), not its text tokenized apart plus a guessed end token."""
    tokenizer = ensure_pad_token(real_tokenizers.load(name))
    end = end_of_turn_id(tokenizer)
    rows = user_rows(2)
    config = IterateConfig(model="unused", dataset=write_rows(tmp_path / "train.jsonl", rows), rounds=1,
                           output_dir=str(tmp_path / "run"), verifier="exact", progress=False)  # fmt: skip
    run = Run(config, model=tiny_model(tokenizer, end), tokenizer=tokenizer)
    for prompt, row in zip(run.train_prompts, rows, strict=True):
        example = run.reference_example(prompt)
        expected_prompt = tokenizer.apply_chat_template(row["messages"], add_generation_prompt=True, tokenize=True)
        assert example.prompt_ids == list(expected_prompt["input_ids"] if hasattr(expected_prompt, "keys")
                                          else expected_prompt)  # fmt: skip
        assert example.completion_ids[-1] in run.stop_ids  # ends where sampling would stop
        full = [*row["messages"], {"role": "assistant", "content": row["answer"]}]
        rendered = tokenizer.apply_chat_template(full, tokenize=False)
        reply = tokenizer.decode(example.completion_ids)
        # The reply's text is the template's own rendering of that turn, from the prompt's end through the stop.
        assert row["answer"] in reply and reply.rstrip() in rendered, (reply, rendered)
        assert reply.endswith(tokenizer.convert_ids_to_tokens(example.completion_ids[-1]))


# ------------------------------------------------------------------------------------------------------------------
# Sampling: the batched KV-cached sampler draws what transformers' generate draws
# ------------------------------------------------------------------------------------------------------------------


def test_batched_greedy_equals_transformers_generate_per_prompt(smollm2):
    tokenizer, end = smollm2
    model = tiny_model(tokenizer, end, stop_bias=0.3).eval()  # greedy: some replies stop, some run out
    prompts = rows_to_prompts(user_rows(7), None, "answer", "test")
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    assert len({len(x) for x in ids}) > 1  # prompts of different lengths share batches (left padding)
    jobs = [Job(i, 0, 0) for i in range(len(ids))]
    samples = sample_all(model, ids, plan_batches([len(x) for x in ids], jobs, 4), [end], tokenizer.pad_token_id,
                         24, temperature=0.0, progress=False)  # fmt: skip
    by_prompt = {s.prompt_index: s for s in samples}
    stopped = 0
    for i, prompt in enumerate(ids):
        out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=end,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        assert by_prompt[i].token_ids == out[0, len(prompt) :].tolist()
        stopped += by_prompt[i].stopped
    assert 0 < stopped < len(ids)  # both kinds: ended at the stop token, and cut at max_new_tokens


def test_each_sample_draws_the_same_tokens_whatever_batch_it_is_in(smollm2):
    tokenizer, end = smollm2
    model = tiny_model(tokenizer, end).eval()
    prompts = rows_to_prompts(user_rows(5), None, "answer", "test")
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    jobs = [Job(i, s, sample_seed(0, i, s)) for i in range(5) for s in range(3)]

    def draw(batch_size):
        samples = sample_all(model, ids, plan_batches([len(x) for x in ids], jobs, batch_size), [end],
                             tokenizer.pad_token_id, 16, temperature=1.0, progress=False)  # fmt: skip
        return {(s.prompt_index, s.sample_index): s.token_ids for s in samples}

    alone, together = draw(1), draw(15)
    assert alone == together
    assert len({tuple(v) for v in alone.values()}) > 5  # samples of one prompt differ from one another


# ------------------------------------------------------------------------------------------------------------------
# Nothing lost: kill -9 mid-generation and mid-training, resume, same result as uninterrupted
# ------------------------------------------------------------------------------------------------------------------


def resume_recipe(tmp_path: Path, name: str) -> Path:
    train, test = tasks.make_task_splits(n_train=16, n_test=4)
    config = dict(model="unused", dataset=write_rows(tmp_path / "train.jsonl", train),
                  eval_dataset=write_rows(tmp_path / "test.jsonl", test), output_dir=str(tmp_path / name),
                  verifier="tests.iterate_helpers:slow_even_length", rounds=2, samples_per_prompt=4,
                  keep_per_prompt=2, max_new_tokens=12, generation_batch_size=2, batch_size=1, epochs=2,
                  save_every_steps=1, learning_rate=1e-2, lr_schedule="linear", progress=False)  # fmt: skip
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return path


def run_helper(recipe: Path, resume: bool = False) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "tests.iterate_helpers", str(recipe), *(["--resume"] if resume else [])]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def final_results(out: Path) -> tuple[list[dict], dict]:
    rounds = [{k: v for k, v in json.loads(line).items() if k != "time_s"}
              for line in (out / "rounds.jsonl").read_text().splitlines()]  # fmt: skip
    weights = torch.load(out / "training_state.pt", weights_only=False)["params"]
    samples = sorted((out / "round-2" / "samples.jsonl").read_text().splitlines())
    return rounds, {"weights": weights, "samples": samples}


def kill_when(process: subprocess.Popen, ready, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert process.poll() is None, process.stdout.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def state(out: Path) -> dict:
    try:
        return json.loads((out / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
def test_resume_after_kill_9_mid_generation_and_mid_training_equals_uninterrupted(tmp_path):
    reference = run_helper(resume_recipe(tmp_path, "whole"))
    assert reference.wait() == 0, reference.stdout.read().decode()[-3000:]
    expected_rounds, expected = final_results(tmp_path / "whole")
    assert all(r["accepted"] > 0 and r["optimizer_steps"] > 1 for r in expected_rounds[1:])

    recipe = resume_recipe(tmp_path, "killed")
    out = tmp_path / "killed"
    samples = out / "round-2" / "samples.jsonl"
    # 1. killed while round 2 samples: some of its replies are on disk, not all.
    kill_when(run_helper(recipe), lambda: 3 <= lines(samples))
    assert state(out)["phase"] == "generate" and 3 <= lines(samples) < 64

    # 2. resumed, then killed while round 2 trains (after some of its steps were checkpointed).
    def mid_training() -> bool:
        if state(out).get("phase") != "train" or not (out / "training_state.pt").exists():
            return False
        try:
            saved = torch.load(out / "training_state.pt", weights_only=False)
        except Exception:
            return False
        return saved["round"] == 2 and saved["step"] >= 2

    kill_when(run_helper(recipe, resume=True), mid_training)
    assert state(out)["phase"] == "train"
    # 3. resumed to the end.
    final = run_helper(recipe, resume=True)
    assert final.wait() == 0, final.stdout.read().decode()[-3000:]
    rounds, got = final_results(out)
    assert rounds == expected_rounds
    assert got["samples"] == expected["samples"]
    for name, value in expected["weights"].items():
        assert torch.equal(got["weights"][name], value), name


# ------------------------------------------------------------------------------------------------------------------
# Verifiers and bad input
# ------------------------------------------------------------------------------------------------------------------


def test_built_in_verifiers():
    assert make_verifier("exact")(" sun, owl \n", "sun, owl") and not make_verifier("exact")("sun,owl", "sun, owl")
    number = make_verifier("number")
    assert number("So 3 + 4 = 7.", "7") and number("It is 1,234.0", 1234) and not number("7 or 8", "7")
    assert extract_number("no digits") is None and extract_number("-2.5e1 and x") == -25.0
    assert make_verifier("regex", {"pattern": r"^\d+$", "full": True})("42", None)
    assert not make_verifier("regex", {"pattern": r"^\d+$", "full": True})("42 apples", None)
    assert make_verifier("json")('{"a": [1]}', None) and not make_verifier("json")("{a: 1}", None)
    assert make_verifier("json", {"equal_reference": True})('{"a": 1}', '{"a":1}')
    assert make_verifier("tests.iterate_helpers:even_length")("ab", None)


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("exactly", {}, "Unknown verifier 'exactly'"),
        ("no_such_module_xyz:f", {}, "cannot import module"),
        ("tests.iterate_helpers:nope", {}, "has no function 'nope'"),
        ("regex", {"pattern": "("}, "not a valid regular expression"),
        ("number", {"tolerance": 1}, "bad verifier_args"),
    ],
)
def test_bad_verifier_is_refused_before_any_model_is_loaded(name, args, message, tmp_path):
    config = IterateConfig(model=str(tmp_path / "no-such-model"), dataset=str(tmp_path / "missing.jsonl"),
                           output_dir=str(tmp_path / "run"), verifier=name, verifier_args=args)  # fmt: skip
    with pytest.raises(RecipeError, match=message):
        iterate(config)
    assert not (tmp_path / "run").exists()


def test_verifier_that_raises_names_the_prompt_and_reply(smollm2, tmp_path):
    tokenizer, end = smollm2
    rows = [{**r, "id": f"q{i}"} for i, r in enumerate(user_rows(2))]
    config = IterateConfig(model="unused", dataset=write_rows(tmp_path / "t.jsonl", rows),
                           output_dir=str(tmp_path / "run"), verifier="tests.iterate_helpers:raises", rounds=1,
                           max_new_tokens=24, progress=False)  # fmt: skip
    with pytest.raises(VerifierError, match=r"KeyError: 'boom' on prompt 'q[01]', reply '.*'"):
        iterate(config, model=tiny_model(tokenizer, end, stop_bias=20.0), tokenizer=tokenizer)


def test_round_without_accepted_replies_is_reported_and_skipped(smollm2, tmp_path, capsys):
    tokenizer, end = smollm2
    train, test = tasks.make_task_splits(n_train=4, n_test=2)
    config = IterateConfig(model="unused", dataset=write_rows(tmp_path / "t.jsonl", train),
                           eval_dataset=write_rows(tmp_path / "e.jsonl", test), output_dir=str(tmp_path / "run"),
                           verifier="exact", rounds=2, max_new_tokens=8, progress=False)  # fmt: skip
    model = tiny_model(tokenizer, end)
    before = {n: p.clone() for n, p in model.named_parameters()}
    rounds = iterate(config, model=model, tokenizer=tokenizer)
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["accepted"] == 0 and r["skipped_training"] for r in rounds[1:])
    assert "no accepted reply: training skipped" in capsys.readouterr().out
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_existing_run_needs_resume_and_the_same_recipe(smollm2, tmp_path):
    tokenizer, end = smollm2
    train, _ = tasks.make_task_splits(n_train=2, n_test=1)
    values = dict(model="unused", dataset=write_rows(tmp_path / "t.jsonl", train), output_dir=str(tmp_path / "run"),
                  verifier="exact", rounds=1, max_new_tokens=4, progress=False)  # fmt: skip
    iterate(IterateConfig(**values), model=tiny_model(tokenizer, end), tokenizer=tokenizer)
    with pytest.raises(RecipeError, match="already holds a run. Pass --resume"):
        iterate(IterateConfig(**values), model=tiny_model(tokenizer, end), tokenizer=tokenizer)
    with pytest.raises(RecipeError, match="differs from the one .* in rounds"):
        iterate(IterateConfig(**{**values, "rounds": 2}), resume=True, model=tiny_model(tokenizer, end),
                tokenizer=tokenizer)  # fmt: skip


def test_cli_reports_recipe_mistakes_in_one_line(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: x\ndataset: d.jsonl\noutput_dir: o\nverifier: exact\nsample_per_prompt: 4\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "sftune.cli", "iterate", "--config", str(recipe)],
                            capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2
    assert "unknown field(s) 'sample_per_prompt' (did you mean 'samples_per_prompt'?)" in result.stderr
    assert "Traceback" not in result.stderr
    recipe.write_text("model: x\ndataset: d.jsonl\noutput_dir: o\nverifier: exatc\n")
    result = subprocess.run([sys.executable, "-m", "sftune.cli", "iterate", "--config", str(recipe)],
                            capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2 and "Unknown verifier 'exatc'" in result.stderr and "Traceback" not in result.stderr


def test_task_references_pass_their_verifiers_and_wrong_answers_fail():
    import random

    rng = random.Random(0)
    checks = [
        (tasks.make_example, make_verifier("exact")),
        (tasks.make_json_list_example, make_verifier("json", {"equal_reference": True})),
        (tasks.make_arithmetic_example, make_verifier("number")),
        (tasks.make_small_arithmetic_example, make_verifier("number")),
    ]
    for make, verify in checks:
        for _ in range(50):
            example = make(rng)
            assert verify(example["messages"][-1]["content"], example["answer"])
            assert example["answer"] == example["messages"][-1]["content"]
    question = tasks.make_small_arithmetic_example(random.Random(1))
    assert eval(question["messages"][1]["content"].removeprefix("What is ").rstrip("?")) == int(question["answer"])
    assert make_verifier("json", {"equal_reference": True})('["a","b"]', '["a", "b"]')
    assert not make_verifier("json", {"equal_reference": True})('["b", "a"]', '["a", "b"]')


def test_cli_runs_rounds_and_resume_of_a_finished_run_is_a_no_op(smollm2, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer, _ = smollm2
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    train, test = tasks.make_task_splits(n_train=4, n_test=2)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {tmp_path / 'model'}\ndataset: {write_rows(tmp_path / 't.jsonl', train)}\n"
        f"eval_dataset: {write_rows(tmp_path / 'e.jsonl', test)}\noutput_dir: {tmp_path / 'run'}\n"
        "verifier: regex\nverifier_args: {pattern: ''}\nrounds: 2\nmax_new_tokens: 3\nlora: {r: 4}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "sftune.cli", "iterate", "--config", str(recipe), "--progress", "false"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "round 2: generated 16" in result.stdout and "held-out" in result.stdout
    rounds = [json.loads(line) for line in (tmp_path / "run/rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert (tmp_path / "run/round-2/model/adapter_config.json").exists()
    again = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "run/rounds.jsonl").read_text().count("\n") == 3
