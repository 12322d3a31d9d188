"""IterativeSFTTrainer on tiny models: inputs, labels, truncation, schedule, logging, checkpoints."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftune import IterativeSFTConfig, IterativeSFTTrainer
from sftune.data.collators import IGNORE_INDEX


def config(tmp_path, **overrides) -> IterativeSFTConfig:
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, learning_rate=1e-3,
                  report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True)  # fmt: skip
    values.update(overrides)
    return IterativeSFTConfig(**values)


@pytest.fixture
def trainer(tiny_llama_path, tmp_path):
    return IterativeSFTTrainer(str(tiny_llama_path), args=config(tmp_path))


def test_config_fields_and_truncation_mode_validation(tmp_path):
    args = config(tmp_path)
    assert args.truncation_mode == "keep_end" and args.max_length is None
    assert args.optimize_device_cache is False and args.model_init_kwargs is None
    with pytest.raises(ValueError, match="truncation_mode"):
        config(tmp_path, truncation_mode="middle")


def test_model_by_id_loads_tokenizer_and_model_init_kwargs(tiny_llama_path, tmp_path):
    trainer = IterativeSFTTrainer(
        str(tiny_llama_path), args=config(tmp_path, model_init_kwargs={"torch_dtype": "bfloat16"})
    )
    assert trainer.model.dtype == torch.bfloat16 and trainer.processing_class.pad_token is not None


def test_learning_rate_is_not_stuck_at_zero_without_max_steps(trainer):
    stats = trainer.step(texts=["one two three", "four five six", "seven eight", "nine ten"])
    assert stats["learning_rate"] == pytest.approx(1e-3)
    assert stats["optimizer_steps"] == 2 and stats["global_step"] == 2
    assert stats["loss"] > 0 and stats["num_tokens"] > 0


def test_schedule_over_max_steps_decays(tiny_llama_path, tmp_path):
    trainer = IterativeSFTTrainer(str(tiny_llama_path), args=config(tmp_path, max_steps=4, lr_scheduler_type="linear"))
    rates = [trainer.step(texts=["a b c", "d e f"])["learning_rate"] for _ in range(4)]
    assert rates == sorted(rates, reverse=True) and rates[-1] == pytest.approx(0.0) and rates[0] > 0


def test_default_labels_are_input_ids_with_padding_ignored_and_eos_kept(trainer):
    tok = trainer.tokenizer
    eos = tok.eos_token_id
    examples = trainer.prepare_examples(
        [torch.tensor([5, 6, eos]), torch.tensor([7, eos, eos])], [torch.tensor([1, 1, 1]), torch.tensor([1, 1, 0])],
        None, None, None,
    )  # fmt: skip
    batch = trainer.data_collator(examples)
    assert batch["labels"].tolist() == [[5, 6, eos], [7, eos, IGNORE_INDEX]]


def test_caller_labels_are_honoured(trainer):
    examples = trainer.prepare_examples([[5, 6, 7]], None, [[IGNORE_INDEX, IGNORE_INDEX, 7]], None, None)
    assert trainer.data_collator(examples)["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 7]]


def test_texts_labels_suffix_is_the_target(trainer):
    tok = trainer.tokenizer
    (example,) = trainer.prepare_examples(None, None, None, ["Say red: red red"], [" red red"])
    labels = trainer.data_collator([example])["labels"][0].tolist()
    trained = [t for t in labels if t != IGNORE_INDEX]
    assert tok.decode(trained) == " red red" + tok.eos_token
    assert tok.decode(example["input_ids"]) == "Say red: red red" + tok.eos_token


@pytest.mark.parametrize(("mode", "expected"), [("keep_end", [4, 5, 6]), ("keep_start", [1, 2, 3])])
def test_truncation_cuts_tokens_on_the_configured_side(tiny_llama_path, tmp_path, mode, expected):
    trainer = IterativeSFTTrainer(str(tiny_llama_path), args=config(tmp_path, max_length=3, truncation_mode=mode))
    examples = trainer.prepare_examples([[1, 2, 3, 4, 5, 6], [7, 8]], None, None, None, None)
    assert examples[0]["input_ids"] == expected and examples[0]["loss_mask"] == [1, 1, 1]
    assert examples[1]["input_ids"] == [7, 8]  # rows are never dropped
    text_example = trainer.prepare_examples(None, None, None, ["w1 w2 w3 w4 w5 w6 w7 w8"], None)[0]
    assert len(text_example["input_ids"]) == 3


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({}, "exactly one"),
        ({"texts": ["a"], "input_ids": [[1]]}, "exactly one"),
        ({"texts": ["a", "b"], "texts_labels": ["x"]}, "2 examples"),
        ({"texts": []}, "empty"),
        ({"texts": ["a", 3]}, r"texts\[1\] must be a str"),
        ({"input_ids": [[1, 2], "oops"]}, r"input_ids\[1\]"),
        ({"input_ids": [[1, 2]], "labels": [[1]]}, "labels\\[0\\] has 1 entries"),
        ({"input_ids": [[1]], "texts_labels": ["x"]}, "texts_labels go with texts"),
        ({"input_ids": "not a list"}, "must be a list"),
    ],
)
def test_malformed_inputs_raise_clear_errors(trainer, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        trainer.step(**kwargs)


def test_seq2seq_requires_labels_and_trains(tiny_t5_path, tmp_path):
    trainer = IterativeSFTTrainer(str(tiny_t5_path), args=config(tmp_path))
    with pytest.raises(ValueError, match="need"):
        trainer.step(texts=["translate this"])
    with pytest.raises(ValueError, match="need labels"):
        trainer.step(input_ids=[[5, 6, 7]])
    stats = trainer.step(texts=["translate this", "and that"], texts_labels=["done", "ok"])
    assert stats["loss"] > 0


def test_loss_falls_when_repeating_a_step(trainer):
    texts, labels = ["Say red: red red", "Say blue: blue blue"], [" red red", " blue blue"]
    first = trainer.step(texts=texts, texts_labels=labels)["loss"]
    for _ in range(15):
        last = trainer.step(texts=texts, texts_labels=labels)["loss"]
    assert last < first * 0.75


def test_logging_checkpoints_resume_and_save_model(tiny_llama_path, tmp_path):
    args = config(tmp_path, save_strategy="steps", save_steps=2, logging_steps=1, per_device_train_batch_size=4)
    trainer = IterativeSFTTrainer(str(tiny_llama_path), args=args)
    for _ in range(3):
        trainer.step(texts=["a b c d", "e f g"])
    assert [entry["step"] for entry in trainer.state.log_history if "loss" in entry] == [1, 2, 3]
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "trainer_state.json").exists()

    resumed = IterativeSFTTrainer(str(tiny_llama_path), args=config(tmp_path, per_device_train_batch_size=4))
    resumed.resume_from_checkpoint(checkpoint)
    assert resumed.state.global_step == 2
    saved = AutoModelForCausalLM.from_pretrained(checkpoint)
    for key, value in saved.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value)

    trainer.save_model(str(tmp_path / "final"))
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "final") is not None
    assert AutoTokenizer.from_pretrained(tmp_path / "final") is not None


def test_eval_every_eval_steps(tiny_llama_path, tmp_path):
    from datasets import Dataset

    eval_rows = Dataset.from_list([{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [5, 6, 7]}] * 2)
    args = config(tmp_path, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=2)
    trainer = IterativeSFTTrainer(str(tiny_llama_path), args=args, eval_dataset=eval_rows)
    trainer.step(texts=["a b", "c d"])
    assert any("eval_loss" in entry for entry in trainer.state.log_history)


def test_optimize_device_cache_is_a_cpu_no_op(tiny_llama_path, tmp_path):
    trainer = IterativeSFTTrainer(str(tiny_llama_path), args=config(tmp_path, optimize_device_cache=True))
    assert trainer.step(texts=["a b c"])["global_step"] == 1


def test_generate_filter_train_trains_on_accepted_replies_only(trainer):
    from sftune.generate_filter_train import generate_filter_train, training_example

    tokenizer = trainer.tokenizer
    prompts = [[{"role": "user", "content": f"Say {w}."}] for w in ["red", "blue", "green"]]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")  # the template's end-of-turn
    with torch.no_grad():  # replies end after a few tokens, as a trained model's do (some run out instead)
        model = trainer.model
        head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[end] = 6.0
        model.lm_head = head
    model.generation_config.eos_token_id = end
    seen, steps = [], []
    original_step = trainer.step

    def recording_step(**kwargs):
        steps.append(kwargs)
        return original_step(**kwargs)

    trainer.step = recording_step

    def accept(index, reply):
        seen.append((index, reply))
        return index != 1  # never accept anything for prompt 1

    results = generate_filter_train(trainer, prompts, accept, rounds=2, samples_per_prompt=3, max_new_tokens=6,
                                    evaluate=lambda model: 0.5)  # fmt: skip
    assert [r.round for r in results] == [0, 1, 2] and results[0].metric == 0.5
    assert all(r.generated == 9 for r in results[1:])
    assert 0 < len(seen) <= sum(r.generated - r.unfinished for r in results[1:])  # only finished replies offered
    assert steps, "no round accepted a reply"
    trained_steps = iter(steps)

    def template_prompt(messages):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    for result in results[1:]:
        if not result.accepted:
            continue
        kwargs = next(trained_steps)
        assert result.accepted == len(kwargs["input_ids"]) <= 2  # at most one reply per accepted prompt
        assert result.train_loss is not None
        for ids, labels in zip(kwargs["input_ids"], kwargs["labels"], strict=True):
            # Exact: the template's inference prompt, then the sampled ids ending with the end-of-turn.
            reply = [t for t in labels if t != -100]
            prompt = ids[: len(ids) - len(reply)]
            assert prompt in [template_prompt(p) for p in (prompts[0], prompts[2])]
            assert reply[-1] == end and ids[len(prompt) :] == reply
    # A gold reply written as text: trained as the template renders it, through its end-of-turn; the prompt is not.
    ids, labels = training_example(tokenizer, prompts[0], "red red")
    trained = [t for t in labels if t != -100]
    rendered = tokenizer.apply_chat_template([*prompts[0], {"role": "assistant", "content": "red red"}], tokenize=False)
    assert tokenizer.decode(trained) == "red red<|im_end|>" and "red red<|im_end|>" in rendered
    assert len(ids) == len(labels)
