"""The chunked loss, computed in the model's forward, equals the model's own loss: values and gradients."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
import transformers
from datasets import Dataset
from packaging.version import Version
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sftune import DataCollatorForCompletionOnlyLM, SFTConfig, SFTTrainer
from sftune.compat import TRANSFORMERS_VERSION, dtype_kwargs
from sftune.errors import DatasetFormatError
from sftune.loss import HEAD_SCALES, IGNORE_INDEX, chunked_cross_entropy, enable_chunked_loss, supports_chunked_loss


def plain_loss(logits, labels, num_items=None):
    shifted = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shifted, reduction="sum",
                           ignore_index=IGNORE_INDEX)  # fmt: skip
    return loss / (num_items if num_items is not None else (shifted != IGNORE_INDEX).sum())


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
@pytest.mark.parametrize("num_items", [None, 50])
def test_chunked_loss_and_gradients_match_plain_cross_entropy(chunk_size, num_items):
    torch.manual_seed(0)
    hidden = torch.randn(3, 11, 16, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(16, 40, bias=True).double()
    labels = torch.randint(0, 40, (3, 11))
    labels[0, :4] = IGNORE_INDEX
    labels[2, 8:] = IGNORE_INDEX
    reference = plain_loss(head(hidden), labels, num_items)
    ref_grads = torch.autograd.grad(reference, [hidden, head.weight, head.bias])
    loss, count, correct = chunked_cross_entropy(hidden, head, labels, num_items, chunk_size)
    grads = torch.autograd.grad(loss, [hidden, head.weight, head.bias])
    torch.testing.assert_close(loss.double(), reference, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert count == (labels[:, 1:] != IGNORE_INDEX).sum()
    assert correct == ((head(hidden)[:, :-1].argmax(-1) == labels[:, 1:]) & (labels[:, 1:] != IGNORE_INDEX)).sum()


def test_gradients_under_bf16_autocast_match_the_autocast_head_and_keep_float32_parameters():
    torch.manual_seed(0)
    hidden = torch.randn(2, 33, 16, requires_grad=True)
    head = torch.nn.Linear(16, 300, bias=False)
    labels = torch.randint(0, 300, (2, 33))
    labels[1, :9] = IGNORE_INDEX
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference = plain_loss(head(hidden).float(), labels) * 3  # any multiple of the loss: grads scale with it
        loss, _, _ = chunked_cross_entropy(hidden, head, labels, None, chunk_size=10)
    ref_grads = torch.autograd.grad(reference, [hidden, head.weight])
    grads = torch.autograd.grad(loss * 3, [hidden, head.weight])
    torch.testing.assert_close(loss * 3, reference, atol=0, rtol=1e-3)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-3 * want.abs().max().item(), rtol=0.02)


def test_frozen_head_gets_no_gradient_and_the_hidden_states_still_do():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 8, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(8, 20, bias=False).double().requires_grad_(False)
    labels = torch.randint(0, 20, (2, 9))
    (want,) = torch.autograd.grad(plain_loss(head(hidden), labels), [hidden])
    loss, _, _ = chunked_cross_entropy(hidden, head, labels, None, chunk_size=4)
    loss.backward()
    torch.testing.assert_close(hidden.grad, want)
    assert head.weight.grad is None


def tiny_model(model_type: str, **overrides):
    values = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)  # fmt: skip
    values.update(overrides)
    torch.manual_seed(0)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type} architecture")
    config = AutoConfig.for_model(model_type, **values)
    model = AutoModelForCausalLM.from_config(config, **dtype_kwargs(torch.float32))
    with torch.no_grad():  # confident logits (random init gives near-uniform ones), so a wrong head scale shows
        model.get_output_embeddings().weight.mul_(20)
    return model


def own_and_chunked(model, ids, labels):
    """(loss, grads) from the model's own forward, then from the same model with the chunked loss enabled."""
    results = []
    for chunked in (False, True):
        if chunked:
            assert enable_chunked_loss(model, chunk_size=5) is not None
        out = model(input_ids=ids, labels=labels)
        assert (out.logits is None) == chunked  # the chunked forward never builds the full logits
        results.append((out.loss, torch.autograd.grad(out.loss, list(model.parameters()))))
    return results


# Non-default head settings, so that a head transform left out would show.
HEAD_OVERRIDES = {"granite": {"logits_scaling": 8.0}, "cohere": {"logit_scale": 0.25}}


@pytest.mark.parametrize("model_type", sorted(HEAD_SCALES))
def test_allowlisted_architecture_matches_its_own_loss(model_type):
    model = tiny_model(model_type, **HEAD_OVERRIDES.get(model_type, {}))
    model.train()
    assert supports_chunked_loss(model)
    ids = torch.randint(3, 96, (2, 13))
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX
    (own, own_grads), (chunked, grads) = own_and_chunked(model, ids, labels)
    torch.testing.assert_close(chunked, own, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, own_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert model._sftune_chunked_loss.checked and model._sftune_chunked_loss.active


def test_scaled_head_gets_the_right_loss():
    """Granite divides its logits by logits_scaling; the loss must too (an unscaled head gives another loss)."""
    model = tiny_model("granite", logits_scaling=8.0)
    ids = torch.randint(3, 96, (2, 13))
    own = model(input_ids=ids, labels=ids).loss
    state = enable_chunked_loss(model, chunk_size=4)
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, own, atol=1e-5, rtol=1e-5)
    state.scale, state.checked = None, True  # the head as if it were Llama's
    assert abs(model(input_ids=ids, labels=ids).loss.item() - own.item()) > 0.5


def test_unverified_architecture_keeps_the_model_loss():
    model = tiny_model("gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=96)
    assert enable_chunked_loss(model, 8) is None
    assert model(input_ids=torch.randint(3, 96, (1, 9)), labels=torch.randint(3, 96, (1, 9))).logits is not None


def test_first_step_check_falls_back_to_the_model_loss_with_one_warning(caplog):
    model = tiny_model("llama")
    model.train()
    ids = torch.randint(3, 96, (2, 13))
    own = model(input_ids=ids, labels=ids).loss
    state = enable_chunked_loss(model, chunk_size=4)
    state.scale = 0.5  # a head transform the chunked loss would get wrong
    with caplog.at_level(logging.WARNING, logger="sftune.loss"):
        first = model(input_ids=ids, labels=ids)
        second = model(input_ids=ids, labels=ids)
    assert not state.active
    assert [r.message.count("differs from LlamaForCausalLM's own loss") for r in caplog.records] == [1]
    for out in (first, second):
        assert out.logits is not None
        torch.testing.assert_close(out.loss, own)


def test_generation_and_logits_without_labels_use_the_model_forward(tiny_llama_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    ids = torch.randint(5, model.config.vocab_size, (1, 6))
    expected_logits = model(input_ids=ids).logits
    expected_text = model.generate(ids, max_new_tokens=4, do_sample=False)
    enable_chunked_loss(model, 1024)
    torch.testing.assert_close(model(input_ids=ids).logits, expected_logits)
    assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), expected_text)


def test_batch_without_labelled_tokens_gives_zero_loss_and_zero_gradients():
    model = tiny_model("llama")
    enable_chunked_loss(model, 4)
    ids = torch.randint(3, 96, (1, 9))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 0] = 5  # position 0 is never a target
    loss = model(input_ids=ids, labels=labels).loss
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


@pytest.mark.skipif(
    TRANSFORMERS_VERSION < Version("4.48"),
    reason="transformers < 4.48 divides accumulated gradients by gradient_accumulation_steps a second time, which "
    "brings them near Adam's eps, where float32 rounding between the two loss paths shows (2e-5)",
)
@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_trainer_steps_are_identical_with_chunked_and_full_logits(tiny_llama_path, tmp_path, gradient_checkpointing):
    rows = [{"prompt": f"Say {w}:", "completion": f" {w} {w}"} for w in ["red", "blue", "green", "teal"] * 2]
    weights = []
    for chunk in (0, 3):
        args = SFTConfig(output_dir=str(tmp_path / str(chunk)), max_steps=2, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, learning_rate=1e-3, report_to="none", save_strategy="no",
                         loss_chunk_size=chunk, gradient_checkpointing=gradient_checkpointing, seed=0,
                         disable_tqdm=True, logging_steps=1, bf16=False)  # fmt: skip
        trainer = SFTTrainer(str(tiny_llama_path), args=args, train_dataset=Dataset.from_list(rows))
        assert (trainer._chunked_loss is not None) == (chunk > 0)
        trainer.train()
        weights.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        assert "mean_token_accuracy" in trainer.state.log_history[0]
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], atol=1e-5, rtol=1e-4)


def small_args(tmp_path, **overrides) -> SFTConfig:
    values = dict(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=1, learning_rate=1e-3,
                  logging_steps=1, save_strategy="no", report_to="none", max_seq_length=64, disable_tqdm=True, seed=0)  # fmt: skip
    values.update(overrides)
    return SFTConfig(**values)


def test_assistant_less_conversation_trains_on(tiny_llama_path, tmp_path):
    """assistant_only_loss=True, batch size 1: a row without an assistant turn adds no loss (a zero loss: zero gradients); a dataset
    of only such rows has nothing to train and is refused before training."""
    talk = [{"messages": [{"role": "user", "content": "Say red."}, {"role": "assistant", "content": "red red."}]}]
    silent = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]}]
    with pytest.raises(DatasetFormatError, match="No row of the train dataset has a single token to train on"):
        SFTTrainer(str(tiny_llama_path), args=small_args(tmp_path, assistant_only_loss=True, max_steps=2),
                   train_dataset=Dataset.from_list(silent * 2))  # fmt: skip
    mixed = SFTTrainer(str(tiny_llama_path), args=small_args(tmp_path, assistant_only_loss=True),
                       train_dataset=Dataset.from_list(silent + talk + silent + talk))  # fmt: skip
    mixed.train()
    losses = [e["loss"] for e in mixed.state.log_history if "loss" in e]
    assert len(losses) == 4 and sum(loss > 0 for loss in losses) == 2


def test_completion_collator_row_without_template_trains_on(tiny_llama_plain_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_plain_path)
    tokenizer.pad_token = tokenizer.eos_token
    rows = [{"text": "no template in this one"}, {"text": "### Question: one ### Answer: two"}] * 2
    collator = DataCollatorForCompletionOnlyLM(" ### Answer:", tokenizer=tokenizer)
    trainer = SFTTrainer(str(tiny_llama_plain_path), args=small_args(tmp_path), train_dataset=Dataset.from_list(rows),
                         data_collator=collator, processing_class=tokenizer)  # fmt: skip
    with pytest.warns(UserWarning):
        trainer.train()
    assert trainer.state.global_step == 4
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_evaluation_with_compute_metrics_gets_full_logits(tiny_llama_path, tmp_path):
    rows = [{"prompt": f"Say {w}:", "completion": f" {w} {w}"} for w in ["red", "blue", "green", "teal"]]
    seen = []

    def compute_metrics(prediction):
        seen.append(prediction.predictions.shape)
        return {"rows": float(len(prediction.predictions))}

    args = small_args(tmp_path, per_device_eval_batch_size=2, padding_free=False)
    trainer = SFTTrainer(str(tiny_llama_path), args=args, train_dataset=Dataset.from_list(rows),
                         eval_dataset=Dataset.from_list(rows), compute_metrics=compute_metrics)  # fmt: skip
    metrics = trainer.evaluate()
    assert metrics["eval_rows"] == 4.0 and seen[0][-1] == trainer.model.config.vocab_size
    assert trainer._chunked_loss is not None
    plain = SFTTrainer(str(tiny_llama_path), args=args, train_dataset=Dataset.from_list(rows),
                       eval_dataset=Dataset.from_list(rows))  # fmt: skip
    assert abs(plain.evaluate()["eval_loss"] - metrics["eval_loss"]) < 1e-5  # chunked eval loss == full-logits one


def test_iterative_trainer_step_uses_the_chunked_loss(tiny_llama_path, tmp_path):
    from sftune import IterativeSFTConfig, IterativeSFTTrainer

    args = IterativeSFTConfig(output_dir=str(tmp_path), report_to="none", save_strategy="no", learning_rate=1e-3)
    trainer = IterativeSFTTrainer(str(tiny_llama_path), args=args)
    ids = torch.randint(5, trainer.model.config.vocab_size, (1, 8))
    assert trainer.model(input_ids=ids, labels=ids).logits is None
    stats = trainer.step(texts=["Say red: red red"], texts_labels=[" red red"])  # train on the suffix only
    assert stats["optimizer_steps"] == 1 and stats["loss"] > 0


def test_chunked_forward_returns_its_token_counts_on_its_output():
    """The counts come back with the loss (nothing kept on the model), equal to counts from the model's own logits,
    and survive accelerate's float32 output conversion (what mixed precision wraps the forward in)."""
    from accelerate.utils import convert_outputs_to_fp32

    from sftune.loss import ChunkedLoss, token_counts

    model = tiny_model("llama").train()
    plain = tiny_model("llama").train()  # the same seed: the same weights, without the chunked loss
    plain.load_state_dict(model.state_dict())
    assert enable_chunked_loss(model, chunk_size=5) is not None
    ids = torch.randint(3, 96, (3, 17))
    labels = ids.clone()
    labels[0, :6] = IGNORE_INDEX
    labels[2, 9:] = IGNORE_INDEX
    # Half the targets are the model's own argmax predictions, so that right and wrong both occur.
    with torch.no_grad():
        predicted = plain(input_ids=ids).logits.argmax(-1)
    labels[1, 1::2] = predicted[1, 0:-1:2]
    ids[1, 1::2] = predicted[1, 0:-1:2]
    with torch.no_grad():
        logits = plain(input_ids=ids).logits
        out = convert_outputs_to_fp32(model.forward)(input_ids=ids, labels=labels)
    assert out.logits is None
    shifted = labels[:, 1:]
    kept = shifted != IGNORE_INDEX
    want_correct = int(((logits[:, :-1].argmax(-1) == shifted) & kept).sum())
    assert want_correct > 0
    labelled, correct = token_counts(out)
    assert (int(labelled), int(correct)) == (int(kept.sum()), want_correct)
    assert (out["num_label_tokens"], out["num_correct_tokens"]) == (labelled, correct)
    assert not {"labelled", "correct"} & {f.name for f in ChunkedLoss.__dataclass_fields__.values()}
    assert token_counts(plain(input_ids=ids, labels=labels)) is None  # a forward that counted nothing


def test_logged_token_accuracy_equals_an_independent_count(tiny_llama_path, tmp_path):
    """With learning rate 0 every step sees the initial weights, so the accuracy logged over one epoch (train) and by
    evaluate() is the initial model's over all trained tokens, counted here from its own logits, row by row."""
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama_path, **dtype_kwargs(torch.float32)).eval()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(6):  # prompts of random tokens continued greedily: some tokens right, the prompt's mostly wrong
        prompt = torch.randint(5, plain.config.vocab_size, (1, 5), generator=generator)
        full = plain.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                              pad_token_id=0)  # fmt: skip
        rows.append({"input_ids": full[0].tolist()})
    args = small_args(tmp_path, max_steps=-1, num_train_epochs=1, per_device_train_batch_size=2, learning_rate=0.0,
                      logging_steps=3, per_device_eval_batch_size=4)  # fmt: skip
    trainer = SFTTrainer(str(tiny_llama_path), args=args, train_dataset=Dataset.from_list(rows),
                         eval_dataset=Dataset.from_list(rows))  # fmt: skip
    assert trainer._chunked_loss is not None
    correct = labelled = 0
    for row in trainer.train_dataset:
        ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            predicted = plain(input_ids=ids).logits[0, :-1].argmax(-1)
        trained = torch.tensor(row["loss_mask"][1:]).bool()
        correct += int((predicted == ids[0, 1:])[trained].sum())
        labelled += int(trained.sum())
    assert 0 < correct < labelled
    trainer.train()
    logged = [e["mean_token_accuracy"] for e in trainer.state.log_history if "loss" in e]
    assert logged == [pytest.approx(correct / labelled, abs=1e-12)]
    assert trainer.evaluate()["eval_mean_token_accuracy"] == pytest.approx(correct / labelled, abs=1e-12)


def test_predict_returns_the_logits(tiny_llama_path, tmp_path):
    """predict() wants the logits: the model's own forward gives them, never the chunked loss's counts."""
    rows = [{"prompt": f"Say {w}:", "completion": f" {w} {w}"} for w in ["red", "blue", "green", "teal"]]
    args = small_args(tmp_path, per_device_eval_batch_size=2, padding_free=False)
    trainer = SFTTrainer(str(tiny_llama_path), args=args, train_dataset=Dataset.from_list(rows))
    prediction = trainer.predict(trainer.train_dataset)
    assert prediction.predictions.shape[0] == 4 and prediction.predictions.shape[-1] == trainer.model.config.vocab_size
