"""IterativeSFTTrainer: optimisation steps on data you produce between steps (generate, filter, train).

`step()` uses SFTTrainer's data pipeline: texts become segments, are tokenized by `tokenize_rows` (special tokens,
EOS, loss mask), collated by `DataCollatorForSFT` into padding-free rows, and the loss is the prepared model's own
forward with labels, so masks, speed, memory and loss are those of SFTTrainer.

Unlike the TRL version it re-implements, the learning-rate schedule works without `max_steps`, caller labels
and `texts_labels` are honoured, `max_length` cuts tokens (not batch rows, and says so), `save_steps` saves
resumable checkpoints, and `step()` returns its statistics.
"""

from __future__ import annotations

import gc
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer, TrainerState, TrainingArguments, get_scheduler
from transformers.trainer_callback import ExportableState

from ..config import IterativeSFTConfig, train_without_evaluation_data, trainer_config
from ..data import formats
from ..data.collators import IGNORE_INDEX, DataCollatorForSFT, mask_for_model, pad_rows
from ..data.formats import Segments
from ..data.pipeline import pipeline_options
from ..data.tokenize import TruncationReport, fit, tokenize_rows
from ..engines import release_process_group_at_exit, start_deepspeed_communication
from ..loss import enable_chunked_loss
from ..models import default_output_dir, resolve_model, resolve_processing_class, tag_model, takes_packed_rows
from .checkpoints import AtomicCheckpoints
from .guards import NonFiniteGuard

logger = logging.getLogger(__name__)

# Arguments of the 0.11-era IterativeSFTTrainer that are IterativeSFTConfig fields now.
LEGACY_TRAINER_KWARGS = ("max_length", "truncation_mode", "optimize_device_cache")
DECAYING_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "cosine_with_min_lr")


class IterativeSFTTrainer(AtomicCheckpoints, Trainer):
    """Call `step()` with token ids or texts whenever you have new data; each call trains on it at once."""

    def __init__(
        self,
        model: PreTrainedModel | str | os.PathLike,
        args: IterativeSFTConfig | TrainingArguments | None = None,
        processing_class: Any = None,
        data_collator: Callable | None = None,
        eval_dataset: Any = None,
        optimizers: tuple = (None, None),
        compute_metrics: Callable | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        callbacks: list | None = None,
        tokenizer: Any = None,
        **legacy_kwargs: Any,
    ) -> None:
        args = _as_iterative_config(args, model, legacy_kwargs)
        train_without_evaluation_data(args, eval_dataset, "IterativeSFTTrainer")
        if tokenizer is not None and processing_class is not None and tokenizer is not processing_class:
            raise ValueError("Pass the tokenizer as `processing_class` or `tokenizer`, not both.")
        start_deepspeed_communication(args)  # before a ZeRO-3 model is built
        model, model_id = resolve_model(model, args.model_init_kwargs)
        processing_class = resolve_processing_class(
            processing_class if processing_class is not None else tokenizer, model_id, args.model_init_kwargs
        )
        self.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        tag_model(model)
        self.is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        enable_chunked_loss(model, args.loss_chunk_size)  # before accelerate wraps the forward
        if data_collator is None:
            # SFTTrainer's collator: padding-free rows, documents isolated, labels from the loss mask.
            data_collator = (
                self.collate_seq2seq
                if self.is_encoder_decoder
                else DataCollatorForSFT(
                    self.tokenizer.pad_token_id, padding_free=compute_metrics is None and takes_packed_rows(model)
                )
            )
        elif not self.is_encoder_decoder:
            data_collator = _with_plain_rows(data_collator)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        self.model_id = model_id
        release_process_group_at_exit()
        # The same check as SFTTrainer's, called by step() itself (no training loop here to fire callbacks).
        self.nonfinite_guard = NonFiniteGuard(args.on_nonfinite, check_gradients=not args.fp16)
        self.create_optimizer()
        if self.lr_scheduler is None:
            self.lr_scheduler = self.make_scheduler()
        self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.model, self.optimizer, self.lr_scheduler
        )
        self.state = TrainerState(
            is_local_process_zero=self.is_local_process_zero(),
            is_world_process_zero=self.is_world_process_zero(),
            stateful_callbacks=[
                cb for cb in self.callback_handler.callbacks + [self.control] if isinstance(cb, ExportableState)
            ],
        )
        self.state.max_steps = max(args.max_steps, 0)
        self.state.logging_steps, self.state.eval_steps, self.state.save_steps = (
            args.logging_steps, args.eval_steps, args.save_steps
        )  # fmt: skip
        self._pending: dict[str, float] = {"loss": 0.0, "steps": 0, "tokens": 0}
        self.num_tokens = 0
        # What step() feeds the data pipeline: max_length and truncation_mode, the one mapping SFTTrainer uses.
        self.options = pipeline_options(args, self.tokenizer)
        self.truncation = TruncationReport(
            "step()'s examples",
            self.options,
            fix="Raise max_length, or pass shorter examples.",
            later="Later truncation is counted in trainer.truncated and in step()'s num_truncated_tokens.",
        )

    # ----------------------------------------------------------------------------------------------------------
    # Schedule
    # ----------------------------------------------------------------------------------------------------------

    def make_scheduler(self) -> Any:
        """The configured schedule over `max_steps`. Without `max_steps` the length of training is unknown, so the
        rate stays constant after warmup (the reference implementation decayed over 0 steps: a rate of 0)."""
        args = self.args
        warmup = args.get_warmup_steps(args.max_steps) if args.max_steps > 0 else int(args.warmup_steps or 0)
        if args.max_steps > 0:
            return get_scheduler(args.lr_scheduler_type, self.optimizer, warmup, args.max_steps)
        if str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) in DECAYING_SCHEDULES:
            logger.info("No max_steps: the learning rate stays constant after warmup (set max_steps to decay).")
        return get_scheduler("constant_with_warmup", self.optimizer, num_warmup_steps=warmup)

    # ----------------------------------------------------------------------------------------------------------
    # Inputs
    # ----------------------------------------------------------------------------------------------------------

    def prepare_examples(
        self,
        input_ids: Sequence | None,
        attention_mask: Sequence | None,
        labels: Sequence | None,
        texts: Sequence[str] | None,
        texts_labels: Sequence[str] | None,
    ) -> list[dict[str, list[int]]]:
        """Validate the inputs of `step()` and turn them into the rows the collator takes: `input_ids`, a
        `loss_mask`, and `labels` only where the caller's labels are not the input ids themselves."""
        if (input_ids is None) == (texts is None):
            raise ValueError("step() takes either input_ids (lists of token ids) or texts (strings), exactly one.")
        input_ids, attention_mask, labels, texts, texts_labels = (
            _as_list(name, value)
            for name, value in (
                ("input_ids", input_ids),
                ("attention_mask", attention_mask),
                ("labels", labels),
                ("texts", texts),
                ("texts_labels", texts_labels),
            )
        )
        if input_ids is not None:
            if texts_labels is not None:
                raise ValueError("texts_labels go with texts, not with input_ids; pass labels= for token ids.")
            examples = self._examples_from_ids(input_ids, attention_mask, labels)
        else:
            if attention_mask is not None or labels is not None:
                raise ValueError("attention_mask and labels go with input_ids; with texts, pass texts_labels.")
            if self.is_encoder_decoder:
                examples = self._seq2seq_examples_from_texts(texts, texts_labels)
            else:
                examples = self._examples_from_texts(texts, texts_labels)
        return self.fit_to_max_length(examples)

    def _examples_from_ids(self, input_ids, attention_mask, labels) -> list[dict[str, list[int]]]:
        _check_list("input_ids", input_ids)
        for name, values in (("attention_mask", attention_mask), ("labels", labels)):
            if values is not None:
                _check_list(name, values, len(input_ids))
        if self.is_encoder_decoder and labels is None:
            raise ValueError("Sequence-to-sequence models need labels: pass labels= (or texts_labels with texts).")
        examples = []
        for i, ids in enumerate(input_ids):
            ids = _as_int_list("input_ids", i, ids)
            mask = (
                _as_int_list("attention_mask", i, attention_mask[i]) if attention_mask is not None else [1] * len(ids)
            )
            if len(mask) != len(ids):
                raise ValueError(f"attention_mask[{i}] has {len(mask)} entries for {len(ids)} input_ids.")
            target = _as_int_list("labels", i, labels[i]) if labels is not None else None
            if self.is_encoder_decoder:
                examples.append({"input_ids": ids, "attention_mask": mask, "labels": target})
                continue
            if target is not None and len(target) != len(ids):
                raise ValueError(f"labels[{i}] has {len(target)} entries for {len(ids)} input_ids.")
            # Positions outside the attention mask are the caller's padding: dropped, as the collator pads itself.
            kept = [j for j, m in enumerate(mask) if m]
            example = {"input_ids": [ids[j] for j in kept]}
            if target is None:
                example["loss_mask"] = [1] * len(kept)
            else:
                target = [target[j] for j in kept]
                example["loss_mask"] = [int(t != IGNORE_INDEX) for t in target]
                if any(t not in (IGNORE_INDEX, x) for t, x in zip(target, example["input_ids"], strict=True)):
                    example["labels"] = target  # labels that are not the inputs: given to the model as they are
            examples.append(example)
        return examples

    def _examples_from_texts(self, texts, texts_labels) -> list[dict[str, list[int]]]:
        """Texts become segments and go through SFTTrainer's tokenization: the special tokens and EOS of raw text,
        and the loss on what `texts_labels` marks (the whole text, or its suffix `texts_labels[i]`)."""
        _check_list("texts", texts, item_type=str)
        if texts_labels is not None:
            _check_list("texts_labels", texts_labels, len(texts), item_type=str)
        rows = []
        for i, text in enumerate(texts):
            target = text if texts_labels is None else texts_labels[i]
            rows.append((text_and_target_segments(text, target, i), True))
        tokens = tokenize_rows(rows, self.tokenizer, self.options)
        return [{"input_ids": ids, "loss_mask": mask} for ids, mask in zip(tokens["input_ids"], tokens["loss_mask"])]

    def _seq2seq_examples_from_texts(self, texts, texts_labels) -> list[dict[str, list[int]]]:
        _check_list("texts", texts, item_type=str)
        if texts_labels is None:
            raise ValueError("Sequence-to-sequence models need targets: pass texts_labels with texts.")
        _check_list("texts_labels", texts_labels, len(texts), item_type=str)
        inputs, targets = self.tokenizer(list(texts))["input_ids"], self.tokenizer(list(texts_labels))["input_ids"]
        return [{"input_ids": x, "attention_mask": [1] * len(x), "labels": y} for x, y in zip(inputs, targets)]

    @property
    def truncated(self) -> dict[str, int]:
        """Examples and tokens that step() has cut to max_length so far."""
        return {"examples": self.truncation.examples, "tokens": self.truncation.tokens}

    def fit_to_max_length(self, examples: list[dict[str, list[int]]]) -> list[dict[str, list[int]]]:
        """Cut examples to `max_length` on the `truncation_mode` side with SFTTrainer's fitter; say once what was cut."""
        out, cut, dropped = [], 0, 0
        for i, example in enumerate(examples):
            ids = example["input_ids"]
            # Seq2seq targets are read from the start, whatever side the inputs keep; the inputs train nothing.
            mask = [] if self.is_encoder_decoder else example["loss_mask"]
            (keep,) = fit(ids, mask, self.options, i)
            fitted = {key: values[keep] for key, values in example.items()}
            if self.is_encoder_decoder and keep != slice(None):
                fitted["labels"] = example["labels"][: self.options.max_length]
            out.append(fitted)
            lost = len(ids) - len(fitted["input_ids"])
            cut, dropped = cut + bool(lost), dropped + lost
        if cut:
            self.truncation.add_and_warn_once(cut, dropped)
        return out

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        # The collator's token count is for statistics (step() reads it); the model's forward does not take it.
        inputs = {key: value for key, value in inputs.items() if key != "num_tokens"}
        return mask_for_model(super()._prepare_inputs(inputs), self.model)

    def collate_seq2seq(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        return {
            "input_ids": pad_rows([e["input_ids"] for e in examples], self.tokenizer.pad_token_id),
            "attention_mask": pad_rows([e["attention_mask"] for e in examples], 0),
            "labels": pad_rows([e["labels"] for e in examples], IGNORE_INDEX),
        }

    # ----------------------------------------------------------------------------------------------------------
    # Training
    # ----------------------------------------------------------------------------------------------------------

    def step(
        self,
        input_ids: Sequence | None = None,
        attention_mask: Sequence | None = None,
        labels: Sequence | None = None,
        texts: Sequence[str] | None = None,
        texts_labels: Sequence[str] | None = None,
    ) -> dict[str, float]:
        """Train on these examples now: shuffled mini-batches of `per_device_train_batch_size`, one optimizer
        step per `gradient_accumulation_steps` mini-batches. Returns loss, learning rate, tokens and steps.

        `texts_labels[i]` says what of `texts[i]` is trained on: the whole text (`texts_labels[i] == texts[i]`, the
        same as passing no texts_labels) or a suffix of it (e.g. the reply after a prompt; the rest is context)."""
        truncated_before = self.truncated["tokens"]
        examples = self.prepare_examples(input_ids, attention_mask, labels, texts, texts_labels)
        self.model.train()
        args = self.args
        order = torch.randperm(
            len(examples), generator=torch.Generator().manual_seed(args.seed + self.state.global_step)
        )
        size = args.per_device_train_batch_size
        batches = [[examples[i] for i in order[s : s + size].tolist()] for s in range(0, len(examples), size)]
        groups = [
            batches[g : g + args.gradient_accumulation_steps]
            for g in range(0, len(batches), args.gradient_accumulation_steps)
        ]
        losses, tokens, steps = [], 0, 0
        for group in groups:
            collated = [self.data_collator(batch) for batch in group]
            targets = sum(_count_targets_tensor(batch["labels"], self.is_encoder_decoder) for batch in collated)
            group_loss = 0.0
            for batch in collated:
                tokens += int(batch.pop("num_tokens").sum()) if "num_tokens" in batch else _real_tokens(batch)
                inputs = self._prepare_inputs(batch)
                # The prepared model's own forward (mixed precision, DDP, the loss it computes from labels).
                outputs = self.model(**inputs)
                # Its mean over this mini-batch's target tokens, weighted by their share of the whole group's: a
                # token average over the accumulated batch, whatever the split into mini-batches.
                share = _count_targets_tensor(inputs["labels"], self.is_encoder_decoder) / max(targets, 1)
                loss = outputs.loss * share
                self.accelerator.backward(loss)
                self.nonfinite_guard.observe_loss(loss)
                group_loss += loss.item()
            self.nonfinite_guard.on_pre_optimizer_step(args, self.state, self.control, model=self.model)
            if args.max_grad_norm:
                self.accelerator.clip_grad_norm_(self.model.parameters(), args.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.global_step += 1
            steps += 1
            losses.append(group_loss)
            self._after_optimizer_step(group_loss, tokens)
        self.num_tokens += tokens
        if args.optimize_device_cache:
            free_device_cache()
        return {
            "loss": sum(losses) / max(len(losses), 1),
            "learning_rate": self.lr_scheduler.get_last_lr()[0],
            "num_tokens": tokens,
            "num_truncated_tokens": self.truncated["tokens"] - truncated_before,
            "optimizer_steps": steps,
            "global_step": self.state.global_step,
        }

    def _after_optimizer_step(self, loss: float, tokens: int) -> None:
        args, step = self.args, self.state.global_step
        self._pending["loss"] += loss
        self._pending["steps"] += 1
        if _every(args.logging_steps, step):
            self.log(
                {
                    "loss": self._pending["loss"] / self._pending["steps"],
                    "learning_rate": self.lr_scheduler.get_last_lr()[0],
                    "num_tokens": float(self.num_tokens + tokens),
                }
            )
            self._pending = {"loss": 0.0, "steps": 0, "tokens": 0}
        if self.eval_dataset is not None and str(args.eval_strategy) in ("steps", "IntervalStrategy.STEPS"):
            if _every(args.eval_steps or args.logging_steps, step):
                self.evaluate()
        if str(getattr(args.save_strategy, "value", args.save_strategy)) == "steps" and _every(args.save_steps, step):
            self._save_checkpoint(self.model, trial=None)

    def resume_from_checkpoint(self, checkpoint: str | os.PathLike) -> None:
        """Restore weights, optimizer, schedule and step count from a checkpoint written by `save_steps`."""
        checkpoint = str(checkpoint)
        self._load_from_checkpoint(checkpoint, self.model)
        self._load_optimizer_and_scheduler(checkpoint)
        self.state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.is_world_process_zero():
            from .model_card import write_model_card

            write_model_card(Path(output_dir or self.args.output_dir), self)


def free_device_cache() -> None:
    """Release cached accelerator memory; nothing to do on CPU."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif getattr(torch, "mps", None) is not None and torch.backends.mps.is_available():
        torch.mps.empty_cache()


def _every(interval: float | int | None, step: int) -> bool:
    return bool(interval) and interval >= 1 and step % math.floor(interval) == 0


def text_and_target_segments(text: str, target: str, row: int) -> Segments:
    """The segments of `texts[row]` given `texts_labels[row]`: all trained when they are equal, else the text's
    suffix `target` trained after its untrained prefix."""
    if target == text:
        return formats.text_segments(text, row, "texts")
    if target and text.endswith(target):
        return [(text[: -len(target)], False), (target, True)]
    raise ValueError(
        f"texts_labels[{row}] is neither texts[{row}] nor a suffix of it. texts_labels say which part of each text "
        "is trained on: the whole text (the same as not passing texts_labels) or its end, e.g. texts=[prompt + "
        "reply], texts_labels=[reply] to train on the reply only."
    )


def _as_iterative_config(args: Any, model: Any, legacy_kwargs: dict[str, Any]) -> IterativeSFTConfig:
    output_dir = default_output_dir(model, "IterativeSFT")
    return trainer_config(
        args, IterativeSFTConfig, output_dir, legacy_kwargs, LEGACY_TRAINER_KWARGS, "IterativeSFTTrainer"
    )


def _with_plain_rows(collator: Callable) -> Callable:
    """A caller's collator gets the rows TRL gave it: input_ids, attention_mask and labels."""
    if isinstance(collator, DataCollatorForSFT):
        return collator

    def collate(examples: list[dict[str, list[int]]]) -> Any:
        rows = []
        for example in examples:
            ids, mask = example["input_ids"], example["loss_mask"]
            labels = example.get("labels") or [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
            rows.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
        return collator(rows)

    return collate


def _real_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["attention_mask"].sum())


def _count_targets_tensor(labels: torch.Tensor, encoder_decoder: bool) -> int:
    labels = labels if encoder_decoder else labels[:, 1:]
    return int((labels != IGNORE_INDEX).sum())


def _as_list(name: str, values: Any) -> Any:
    """Any sequence of examples as a list: a list, tuple, a `datasets` column (`Column` in datasets >= 4, which
    is not a list), a numpy array or a 2-D tensor of rows. A string or a dict is not a sequence of examples."""
    if values is None or isinstance(values, list):
        return values
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__") or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a list (or any sequence) of examples, got {type(values).__name__}.")
    if isinstance(values, torch.Tensor) and values.dim() != 2:
        raise ValueError(f"{name} as a tensor must be 2-D (one row per example), got shape {tuple(values.shape)}.")
    return list(values)


def _check_list(name: str, values: Any, length: int | None = None, item_type: type | None = None) -> None:
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{name} must be a list, got {type(values).__name__}.")
    if not values:
        raise ValueError(f"{name} is empty; step() needs at least one example.")
    if length is not None and len(values) != length:
        raise ValueError(f"{name} has {len(values)} elements but there are {length} examples; give one per example.")
    if item_type is not None:
        for i, value in enumerate(values):
            if not isinstance(value, item_type):
                raise ValueError(f"{name}[{i}] must be a {item_type.__name__}, got {type(value).__name__}.")


def _as_int_list(name: str, index: int, value: Any) -> list[int]:
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ValueError(f"{name}[{index}] must be a 1-D tensor of token ids, got shape {tuple(value.shape)}.")
        return value.tolist()
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 1:
        value = value.tolist()
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return list(value)
    raise ValueError(f"{name}[{index}] must be a 1-D tensor or a list of ints, got {type(value).__name__}.")
