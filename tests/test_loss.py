"""The chunked loss equals plain cross-entropy over full logits: loss and gradients, to 1e-5."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import AutoModelForCausalLM

from sftune import SFTConfig, SFTTrainer
from sftune.loss import IGNORE_INDEX, body_and_head, chunked_cross_entropy, supports_chunked_loss


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


def test_chunked_loss_matches_the_model_loss_on_a_real_architecture(tiny_llama_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32)
    assert supports_chunked_loss(model)
    ids = torch.randint(5, model.config.vocab_size, (2, 9))
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX
    reference = model(input_ids=ids, labels=labels).loss
    ref_grads = torch.autograd.grad(reference, list(model.parameters()))
    body, head = body_and_head(model)
    loss, _, _ = chunked_cross_entropy(body(input_ids=ids).last_hidden_state, head, labels, chunk_size=4)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_trainer_steps_are_identical_with_chunked_and_full_logits(tiny_llama_path, tmp_path, gradient_checkpointing):
    rows = [{"prompt": f"Say {w}:", "completion": f" {w} {w}"} for w in ["red", "blue", "green", "teal"] * 2]
    weights = []
    for chunk in (0, 3):
        args = SFTConfig(output_dir=str(tmp_path / str(chunk)), max_steps=2, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, learning_rate=1e-3, report_to="none", save_strategy="no",
                         loss_chunk_size=chunk, gradient_checkpointing=gradient_checkpointing, seed=0,
                         disable_tqdm=True, logging_steps=1)  # fmt: skip
        trainer = SFTTrainer(str(tiny_llama_path), args=args, train_dataset=Dataset.from_list(rows))
        trainer.train()
        weights.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        assert "mean_token_accuracy" in trainer.state.log_history[0]
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], atol=1e-5, rtol=1e-4)
