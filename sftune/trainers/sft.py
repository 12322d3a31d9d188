"""SFTTrainer: `transformers.Trainer` plus model loading, dataset preparation, PEFT and SFT metrics."""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, Trainer, TrainingArguments

from ..compat import counts_predicted_labels
from ..config import SFTConfig, train_without_evaluation_data, trainer_config
from ..data.collators import IGNORE_INDEX, DataCollatorForSFT, mask_for_model
from ..data.pipeline import default_max_length, explicit_generation_config, prepare_for_training
from ..engines import (
    drop_fsdp_accelerate_cannot_build,
    fsdp_asked,
    release_process_group_at_exit,
    start_deepspeed_communication,
    warn_if_fsdp_dropped,
)
from ..loss import enable_chunked_loss, model_own_loss, token_counts
from ..memory import use_memory_efficient_mlp
from ..models import (
    check_finite_weights,
    default_output_dir,
    resolve_model,
    resolve_processing_class,
    tag_model,
    takes_packed_rows,
)
from ..throughput import ThroughputMeter, matmul_dtype, training_flops_per_token
from .checkpoints import AtomicCheckpoints, read_extra_state, resolve_resume_checkpoint
from .guards import InterruptHandler, NonFiniteGuard, interrupted_error
from .model_card import write_model_card

logger = logging.getLogger(__name__)

# SFTConfig fields that old TRL versions accepted as SFTTrainer keyword arguments.
LEGACY_TRAINER_KWARGS = (
    "dataset_text_field",
    "max_seq_length",
    "packing",
    "dataset_num_proc",
    "dataset_batch_size",
    "neftune_noise_alpha",
    "model_init_kwargs",
    "dataset_kwargs",
    "eval_packing",
    "num_of_sequences",
    "chars_per_token",
)
# Columns our prepared datasets carry that the model's forward does not take, but the collator needs.
PREPARED_COLUMNS = [
    "input_ids",
    "loss_mask",
    "seq_lengths",
    "labels",
    "attention_mask",
    "position_ids",
]


class SFTTrainer(AtomicCheckpoints, Trainer):
    """Supervised fine-tuning trainer with TRL's `SFTTrainer` API.

    `model` may be a model instance, or a hub id / local path loaded with `args.model_init_kwargs`. Datasets may
    be plain text (`dataset_text_field`), conversations (`messages`), `prompt`/`completion` pairs, already
    tokenized (`input_ids`), or anything `formatting_func` turns into text. They are tokenized once, before
    training, and any bad row is reported with its index, column and a fix.
    """

    def __init__(
        self,
        model: PreTrainedModel | torch.nn.Module | str | os.PathLike | None = None,
        args: SFTConfig | TrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        tokenizer: Any = None,
        model_init: Callable[[], PreTrainedModel] | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        preprocess_logits_for_metrics: Callable | None = None,
        peft_config: Any = None,
        formatting_func: Callable | None = None,
        processing_class: Any = None,
        **legacy_kwargs: Any,
    ) -> None:
        args = _as_sft_config(args, model, legacy_kwargs)
        train_without_evaluation_data(args, eval_dataset, "SFTTrainer")
        if model is None and model_init is None:
            raise ValueError("SFTTrainer needs a model: a model instance, a hub id or a local checkpoint path.")
        start_deepspeed_communication(args)  # before a ZeRO-3 model is built
        model, model_id = resolve_model(model, args.model_init_kwargs)
        if tokenizer is not None and processing_class is not None and tokenizer is not processing_class:
            raise ValueError("Pass the tokenizer as `processing_class` or `tokenizer`, not both.")
        processing_class = resolve_processing_class(
            processing_class if processing_class is not None else tokenizer, model_id, args.model_init_kwargs
        )
        text_tokenizer = getattr(processing_class, "tokenizer", processing_class)
        if args.max_seq_length is None:
            args.max_seq_length = args.max_length = default_max_length(text_tokenizer)

        if model is not None:
            model = _prepare_peft_model(model, peft_config, args)
            tag_model(model)
            _maybe_enable_liger(args)
            if args.memory_efficient_mlp and not args.use_liger_kernel:
                use_memory_efficient_mlp(model)
        # Before the Trainer prepares the model: mixed precision and DDP/FSDP then wrap the loss-computing forward.
        chunked = model is not None and not args.use_liger_kernel
        self._chunked_loss = enable_chunked_loss(model, args.loss_chunk_size) if chunked else None

        if not args.dataset_options["skip_prepare_dataset"]:
            generation_config = explicit_generation_config(model)

            def prepare(data: Any, packing: bool, name: str) -> Any:
                return self._prepare(data, text_tokenizer, args, formatting_func, packing, name, generation_config)

            train_dataset = prepare(train_dataset, args.packing, "train")
            eval_packing = args.packing if args.eval_packing is None else args.eval_packing
            if isinstance(eval_dataset, dict):
                eval_dataset = {
                    name: prepare(data, eval_packing, f"eval {name}") for name, data in eval_dataset.items()
                }
            else:
                eval_dataset = prepare(eval_dataset, eval_packing, "eval")
        if data_collator is None:  # model-agnostic rows; `_prepare_inputs` fits their masks to the model
            data_collator = DataCollatorForSFT(
                text_tokenizer.pad_token_id,
                padding_free=args.padding_free and compute_metrics is None and takes_packed_rows(model),
            )

        asked_fsdp = fsdp_asked(args)
        drop_fsdp_accelerate_cannot_build(args)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            model_init=model_init,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        self.model_id = model_id
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._num_tokens = {"train": 0, "eval": 0}
        # (correct, labelled) tokens since the last log (device tensors: no sync per step), summed over ranks when
        # logged.
        self._accuracy_counts: dict[str, list[Any]] = {"train": [0, 0], "eval": [0, 0]}
        self._predicting = False  # inside prediction_step with predictions wanted: the loss over full logits
        scaled = getattr(self.accelerator, "scaler", None) is not None
        self._nonfinite_guard = NonFiniteGuard(
            args.on_nonfinite,
            check_gradients=not scaled,
            deepspeed_engine=lambda: self.model_wrapped if self.is_deepspeed_enabled else None,
        )
        warn_if_fsdp_dropped(self, asked_fsdp)
        release_process_group_at_exit()
        self._interrupt = InterruptHandler()
        self.add_callback(self._nonfinite_guard)
        self.add_callback(self._interrupt)

    # ----------------------------------------------------------------------------------------------------------
    # Data
    # ----------------------------------------------------------------------------------------------------------

    @staticmethod
    def _prepare(
        dataset: Any,
        tokenizer: Any,
        args: SFTConfig,
        formatting_func: Callable | None,
        packing: bool,
        name: str,
        generation_config: Any = None,
    ) -> Any:
        if dataset is None or not _is_hf_dataset(dataset):
            return dataset  # torch datasets (ConstantLengthDataset, ...) yield rows ready for the collator
        return prepare_for_training(dataset, tokenizer, args, packing, name, formatting_func, generation_config)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        self._signature_columns = list(dict.fromkeys(self._signature_columns + PREPARED_COLUMNS))

    # ----------------------------------------------------------------------------------------------------------
    # Loss and metrics
    # ----------------------------------------------------------------------------------------------------------

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        mode = "train" if self.model.training else "eval"
        self._num_tokens[mode] += count_real_tokens(inputs)
        self._metrics[mode]["num_tokens"] = [float(self._num_tokens[mode])]
        inputs = {key: value for key, value in inputs.items() if key != "num_tokens"}
        return mask_for_model(super()._prepare_inputs(inputs), self.model)

    def prediction_step(
        self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: list[str] | None = None
    ) -> Any:
        # Predictions (for compute_metrics, or predict()'s output) are the logits: computed in full then.
        self._predicting = not prediction_loss_only
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        finally:
            self._predicting = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        # The model computes the chunked loss in its forward (sftune.loss), without logits.
        with model_own_loss(self._chunked_loss if self._predicting else None):
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        self._record_accuracy(mode, inputs, outputs)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _record_accuracy(self, mode: str, inputs: dict[str, Any], outputs: Any) -> None:
        """Add this forward's (correct, labelled) tokens: those its output carries (the chunked loss counts them
        while it has each chunk's logits), else counted from its logits."""
        counts = token_counts(outputs)
        if counts is None:
            logits = outputs.get("logits") if isinstance(outputs, dict) else None
            counts = self._counts_from_logits(logits, inputs.get("labels"))
        if counts is not None:
            labelled, correct = counts
            self._accuracy_counts[mode][0] += correct.detach()
            self._accuracy_counts[mode][1] += labelled.detach()

    def _counts_from_logits(self, logits: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not isinstance(logits, torch.Tensor) or labels is None or logits.dim() != 3:
            return None
        if not self.model_is_encoder_decoder:
            logits, labels = logits[:, :-1], labels[:, 1:]
        mask = labels != IGNORE_INDEX
        return mask.sum(), ((logits.argmax(-1) == labels) & mask).sum()

    @property
    def model_is_encoder_decoder(self) -> bool:
        config = getattr(self.accelerator.unwrap_model(self.model), "config", None)
        return bool(getattr(config, "is_encoder_decoder", False))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for key, values in self._metrics[mode].items():
            if values:
                logs[prefix + key] = sum(values) / len(values)
        self._metrics[mode] = defaultdict(list)
        # Every rank logs together (transformers calls log() on all of them), so counts are summed over ranks:
        # the metric is the whole batch's, not rank 0's share of it.
        correct, labelled = sum_over_ranks(self._accuracy_counts[mode], self.args.device)
        self._accuracy_counts[mode] = [0, 0]
        if labelled > 0:
            logs[prefix + "mean_token_accuracy"] = correct / labelled
        if prefix + "num_tokens" in logs:  # every rank logs together, so the count can be summed over them
            logs[prefix + "num_tokens"] = float(sum_over_ranks(self._num_tokens[mode], self.args.device))
        if mode == "train" and self._nonfinite_guard.skipped_steps:
            logs["skipped_nonfinite_steps"] = self._nonfinite_guard.skipped_steps
        if mode == "train" and "loss" in logs:
            logs.update(self._throughput.measure(self._num_tokens["train"]))
        super().log(logs, *(() if start_time is None else (start_time,)))  # transformers < 4.47: log(logs)

    def get_batch_samples(self, *args: Any, **kwargs: Any) -> tuple[list, Any]:
        batches, num_items_in_batch = super().get_batch_samples(*args, **kwargs)
        if num_items_in_batch is None or counts_predicted_labels(self) or self.model_is_encoder_decoder:
            return batches, num_items_in_batch
        # Count what the loss predicts, labels[:, 1:], as transformers 5 does (4.x counted every label).
        count = sum(int((batch["labels"][..., 1:] != IGNORE_INDEX).sum()) for batch in batches if "labels" in batch)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = int(self.accelerator.gather(torch.tensor(count, device=self.args.device)).sum())
        return batches, count

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._nonfinite_guard.observe_loss(loss)  # the raw value, before transformers' logging filter
        return loss

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        tokens = read_extra_state(checkpoint).get("num_tokens", 0)
        # The checkpoint holds the total over ranks; rank 0 carries it so that the sum over ranks stays right.
        self._num_tokens["train"] = tokens if self.is_world_process_zero() else 0
        self._throughput = ThroughputMeter(
            training_flops_per_token(self.model), self.args.device.type, matmul_dtype(self.args, self.model)
        )
        self._throughput.last_tokens = self._num_tokens["train"]
        self._interrupt.install()
        try:
            output = super().train(checkpoint, *args, **kwargs)
        finally:
            self._interrupt.uninstall()
        if self._interrupt.requested:
            raise interrupted_error(self.args.output_dir, self.state.global_step)
        return output

    def num_tokens_trained(self) -> int:
        """Training tokens seen so far, summed over processes (and over runs resumed from checkpoints)."""
        return sum_over_ranks(self._num_tokens["train"], self.args.device)

    @property
    def skipped_nonfinite_steps(self) -> int:
        return self._nonfinite_guard.skipped_steps

    def _checkpoint_extra_state(self) -> dict[str, Any]:
        return {"num_tokens": self._num_tokens_at_save}

    def _save_checkpoint(self, model: Any, trial: Any, *args: Any, **kwargs: Any) -> None:  # 4.x adds metrics
        self._num_tokens_at_save = self.num_tokens_trained()  # a collective: every rank computes it
        super()._save_checkpoint(model, trial, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        check_finite_weights(model if model is not None else self.model, resume_from_checkpoint)

    # ----------------------------------------------------------------------------------------------------------
    # Saving
    # ----------------------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model so that plain `from_pretrained` loads it. Under sharded engines that would save shards
        (FSDP's sharded state dict; ZeRO-3 without `stage3_gather_16bit_weights_on_model_save`), the final save
        gathers a full state dict first (checkpoints stay sharded, for resuming); it raises if no weights were
        written, rather than report a save that did not happen."""
        output_dir = output_dir or self.args.output_dir
        if _internal_call or not self._weights_stay_sharded():
            super().save_model(output_dir, _internal_call)
        else:
            self._save_full_state_dict(output_dir)
        if self.is_world_process_zero():
            if not _internal_call:
                check_weights_written(output_dir)
            write_model_card(Path(output_dir), self)

    def _weights_stay_sharded(self) -> bool:
        if self.is_fsdp_enabled:
            return "FULL_STATE_DICT" not in str(self.accelerator.state.fsdp_plugin.state_dict_type)
        if self.is_deepspeed_enabled:
            zero = self.accelerator.deepspeed_config.get("zero_optimization", {})
            return zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save", False)
        return False

    def _save_full_state_dict(self, output_dir: str) -> None:
        """Gather the whole model (a collective: every rank calls it) and save it from the main process."""
        if self.is_deepspeed_enabled:
            state_dict = self.model_wrapped._zero3_consolidated_16bit_state_dict()
        else:
            state_dict = self.accelerator.get_state_dict(self.model)
        if self.args.should_save:
            self._save(output_dir, state_dict=state_dict)
        self.accelerator.wait_for_everyone()


def sum_over_ranks(value: Any, device: Any) -> Any:
    """An int (or a list of ints) summed over all processes; a collective every rank must call."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [int(v) for v in value] if isinstance(value, list) else int(value)
    values = value if isinstance(value, list) else [value]
    total = torch.tensor([int(v) for v in values], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(total)
    return total.tolist() if isinstance(value, list) else int(total[0])


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)


def check_weights_written(output_dir: str | os.PathLike) -> None:
    """Raise unless `output_dir` holds model weights that `from_pretrained` reads."""
    if not any(Path(output_dir, name).is_file() for name in WEIGHT_FILES):
        raise RuntimeError(
            f"save_model() wrote no model weights to {output_dir} (expected one of {', '.join(WEIGHT_FILES[:2])}). "
            "Under FSDP set fsdp_config={'state_dict_type': 'FULL_STATE_DICT'}; under DeepSpeed ZeRO-3 set "
            "zero_optimization.stage3_gather_16bit_weights_on_model_save=true in the DeepSpeed config."
        )


def count_real_tokens(inputs: dict[str, Any]) -> int:
    """Tokens that are not padding: the collator's count, else the 2D attention mask's."""
    if "num_tokens" in inputs:
        return int(inputs["num_tokens"].sum())
    attention = inputs.get("attention_mask")
    if attention is not None and attention.dim() == 2:
        return int(attention.sum())
    input_ids = inputs.get("input_ids")
    return int(input_ids.numel()) if input_ids is not None else 0


def _as_sft_config(args: Any, model: Any, legacy_kwargs: dict[str, Any]) -> SFTConfig:
    output_dir = default_output_dir(model, "SFT")
    args = trainer_config(args, SFTConfig, output_dir, legacy_kwargs, LEGACY_TRAINER_KWARGS, "SFTTrainer")
    if "max_seq_length" in legacy_kwargs:
        args.max_length = args.max_seq_length  # the two names of one setting
    return args


def _prepare_peft_model(model: Any, peft_config: Any, args: SFTConfig) -> Any:
    """Wrap the model with adapters when `peft_config` is given; get k-bit and checkpointed models ready."""
    if args.gradient_checkpointing and args.gradient_checkpointing_kwargs is None:
        # Reentrant checkpointing drops gradients when the inputs need none (frozen embeddings under PEFT).
        args.gradient_checkpointing_kwargs = {"use_reentrant": False}
    is_peft = _is_peft_model(model)
    if peft_config is None:
        if is_peft and args.gradient_checkpointing:
            model.enable_input_require_grads()
        return model
    if is_peft:
        raise ValueError(
            "The model is already a PeftModel; to keep training its adapters, do not pass peft_config. "
            "To train new adapters, merge the old ones first (model.merge_and_unload())."
        )
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=args.gradient_checkpointing,
            gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
        )
    elif args.gradient_checkpointing:
        model.enable_input_require_grads()
    # Adapters are initialised from args.seed: the same seed gives the same run, whatever ran before.
    from transformers import set_seed

    set_seed(args.seed)
    with warnings.catch_warnings():
        # peft still calls transformers' deprecated `is_gradient_checkpointing`; not the user's concern.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, peft_config)


def _is_hf_dataset(dataset: Any) -> bool:
    from datasets import Dataset, IterableDataset

    return isinstance(dataset, (Dataset, IterableDataset))


def _is_peft_model(model: Any) -> bool:
    if importlib.util.find_spec("peft") is None:
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _maybe_enable_liger(args: SFTConfig) -> None:
    if not args.use_liger:
        return
    if importlib.util.find_spec("liger_kernel") is None:
        warnings.warn(
            "use_liger=True but liger-kernel is not installed (`pip install 'sftune[liger]'`); training without it.",
            stacklevel=3,
        )
        return
    if not torch.cuda.is_available():
        warnings.warn(
            "use_liger=True but Liger kernels need a CUDA GPU; training without them.",
            stacklevel=3,
        )
        return
    args.use_liger_kernel = True
