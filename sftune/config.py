"""Training configuration: `SFTConfig` (TRL-compatible) on top of `transformers.TrainingArguments`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

DEFAULT_MAX_SEQ_LENGTH_CAP = 1024
PACKING_STRATEGIES = ("bfd", "wrapped")


def resolve_dtype(value: Any) -> Any:
    """Turn a dtype written as a string ("bfloat16", "torch.float16") into a `torch.dtype`; keep "auto"/None."""
    if value is None or value == "auto" or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype):
            return dtype
    raise ValueError(
        f"Unknown dtype {value!r}: use 'auto' or a torch dtype name such as 'float32', 'bfloat16' or 'float16'."
    )


def normalize_model_init_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Copy `model_init_kwargs`, converting string dtypes and the old `torch_dtype` key to transformers' `dtype`."""
    kwargs = dict(kwargs or {})
    if "torch_dtype" in kwargs:
        if "dtype" in kwargs and kwargs["dtype"] != kwargs["torch_dtype"]:
            raise ValueError("model_init_kwargs sets both `torch_dtype` and `dtype` to different values; keep one.")
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    if "dtype" in kwargs:
        kwargs["dtype"] = resolve_dtype(kwargs["dtype"])
    return kwargs


@dataclass
class SFTConfig(TrainingArguments):
    """Arguments of `SFTTrainer`: every `TrainingArguments` field plus the SFT-specific ones below.

    Field names and defaults follow TRL's `SFTConfig`; TRL's later names are accepted too
    (`max_length` for `max_seq_length`). Differences from TRL, on purpose:
    - batches are padded to their longest row, not to `max_seq_length` (same result, less compute), and by
      default (`padding_free=True`) a batch's examples share rows, isolated from each other, so little is padded;
    - the loss is computed in chunks over labelled tokens only (`loss_chunk_size`), never holding full logits;
    - `packing=True` packs exactly: documents in one row never attend to each other (see `sftune.data.packing`).
    """

    dataset_text_field: str = field(
        default="text",
        metadata={"help": "Column holding the text, for plain-text datasets."},
    )
    packing: bool = field(
        default=False,
        metadata={"help": "Pack several examples into each row of the batch."},
    )
    packing_strategy: str = field(
        default="bfd",
        metadata={
            "help": "'bfd': best-fit-decreasing bins, examples never attend to each other (exact). "
            "'wrapped': concatenate and cut into fixed blocks (TRL's ConstantLengthDataset behaviour)."
        },
    )
    eval_packing: bool | None = field(
        default=None,
        metadata={"help": "Pack the eval dataset too. Defaults to the value of `packing`."},
    )
    max_seq_length: int | None = field(
        default=None,
        metadata={"help": "Longest tokenized sequence. Defaults to min(tokenizer.model_max_length, 1024)."},
    )
    max_length: int | None = field(default=None, metadata={"help": "Newer name of `max_seq_length`."})
    truncation_mode: str = field(
        default="keep_start",
        metadata={"help": "Which part of an over-long example to keep: 'keep_start' or 'keep_end'."},
    )
    dataset_num_proc: int | None = field(
        default=None,
        metadata={"help": "Processes used to tokenize the dataset (None: this process)."},
    )
    dataset_batch_size: int = field(default=1000, metadata={"help": "Examples tokenized per batch."})
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments of `from_pretrained` when the model is given by name or path."},
    )
    dataset_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Dataset preparation options: skip_prepare_dataset, add_special_tokens, append_concat_token."
        },
    )
    use_liger: bool = field(
        default=False,
        metadata={"help": "Use Liger kernels (needs liger-kernel and a GPU)."},
    )
    num_of_sequences: int = field(
        default=1024,
        metadata={"help": "ConstantLengthDataset: examples buffered per packing round."},
    )
    chars_per_token: float = field(
        default=3.6,
        metadata={"help": "ConstantLengthDataset: characters per token, to size the buffer."},
    )
    completion_only_loss: bool | None = field(
        default=None,
        metadata={"help": "Train only on the completion of prompt/completion data. None: yes for such data."},
    )
    assistant_only_loss: bool = field(
        default=False,
        metadata={"help": "Train only on the assistant turns of conversational data."},
    )
    padding_free: bool = field(
        default=True,
        metadata={
            "help": "Place each unpacked batch's examples in as few rows as fit its longest one instead of padding "
            "every row (exact on every attention backend: examples never attend to each other)."
        },
    )
    memory_efficient_mlp: bool = field(
        default=True,
        metadata={"help": "Fused SwiGLU and RMSNorm that keep fewer activations for backward (same results)."},
    )
    loss_chunk_size: int = field(
        default=1024,
        metadata={
            "help": "Compute the loss over this many tokens at a time, never holding the full logits "
            "(0: the model's own loss over full logits)."
        },
    )
    learning_rate: float = field(default=2e-5, metadata={"help": "Initial AdamW learning rate."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps."})

    def __post_init__(self) -> None:
        self.model_init_kwargs = _maybe_json(self.model_init_kwargs, "model_init_kwargs")
        self.dataset_kwargs = _maybe_json(self.dataset_kwargs, "dataset_kwargs")
        if self.max_length is not None and self.max_seq_length is not None and self.max_length != self.max_seq_length:
            raise ValueError(
                f"max_length={self.max_length} and max_seq_length={self.max_seq_length} are the same setting "
                "under two names; set only one."
            )
        if self.max_seq_length is None:
            self.max_seq_length = self.max_length
        self.max_length = self.max_seq_length
        if self.loss_chunk_size < 0:
            raise ValueError(f"loss_chunk_size must be >= 0 (0 turns chunking off), got {self.loss_chunk_size}.")
        if self.packing_strategy not in PACKING_STRATEGIES:
            raise ValueError(f"packing_strategy must be one of {PACKING_STRATEGIES}, got {self.packing_strategy!r}.")
        if self.truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', got {self.truncation_mode!r}.")
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # pinning needs an accelerator; without one it only warns
        use_cpu_for_bf16(self)
        super().__post_init__()

    @property
    def dataset_options(self) -> dict[str, Any]:
        """`dataset_kwargs` with its defaults filled in."""
        options = {
            "skip_prepare_dataset": False,
            "add_special_tokens": True,
            "append_concat_token": True,
        }
        unknown = set(self.dataset_kwargs or {}) - set(options)
        if unknown:
            raise ValueError(f"Unknown dataset_kwargs {sorted(unknown)}; known keys: {sorted(options)}.")
        options.update(self.dataset_kwargs or {})
        return options


def cpu_supports_bf16() -> bool:
    """oneDNN has bf16 kernels for this CPU (x86 with AVX-512 or AMX, Arm with BF16)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_has_native_bf16() -> bool:
    """bf16 instructions in hardware (x86 AVX512-BF16 or AMX), where bf16 autocast trains faster than fp32; with
    AVX-512 alone oneDNN emulates bf16, correct but not faster."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def use_cpu_for_bf16(args: TrainingArguments) -> None:
    """`bf16=True` on a machine without a GPU trains on the CPU in bf16 mixed precision (accelerate's autocast;
    fp32 weights and optimizer state), instead of transformers' error asking for `use_cpu=True`."""
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    wants_bf16 = args.bf16 or args.bf16_full_eval
    if not wants_bf16 or args.use_cpu or torch.cuda.is_available():
        return  # a CUDA GPU without bf16 gets transformers' own message
    if is_torch_bf16_gpu_available() or is_torch_xla_available():
        return
    if not cpu_supports_bf16():
        raise ValueError(
            "bf16=True, but this machine has no GPU and its CPU has no bfloat16 support (x86 AVX-512 or AMX, "
            "Arm BF16): set bf16=False to train in float32."
        )
    args.use_cpu = True


def _maybe_json(value: Any, name: str) -> Any:
    """Command lines and YAML give dicts as JSON strings; parse them."""
    if isinstance(value, str):
        import json

        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"{name} must be a dict or a JSON object string, got {value!r}.") from err
    return value


@dataclass
class IterativeSFTConfig(TrainingArguments):
    """Arguments of `IterativeSFTTrainer`: every `TrainingArguments` field plus the ones below."""

    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments of `from_pretrained` when the model is given by name or path."},
    )
    max_length: int | None = field(default=None, metadata={"help": "Longest sequence, in tokens, after truncation."})
    truncation_mode: str = field(
        default="keep_end",
        metadata={"help": "'keep_end': drop tokens from the start; 'keep_start': drop tokens from the end."},
    )
    optimize_device_cache: bool = field(
        default=False, metadata={"help": "Free cached accelerator memory after every step (a no-op on CPU)."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every X optimizer steps."})
    loss_chunk_size: int = field(
        default=1024,
        metadata={
            "help": "Compute the loss over this many tokens at a time, never holding the full logits "
            "(0: the model's own loss over full logits)."
        },
    )

    def __post_init__(self) -> None:
        self.model_init_kwargs = _maybe_json(self.model_init_kwargs, "model_init_kwargs")
        if self.loss_chunk_size < 0:
            raise ValueError(f"loss_chunk_size must be >= 0 (0 turns chunking off), got {self.loss_chunk_size}.")
        if self.truncation_mode not in ("keep_end", "keep_start"):
            raise ValueError(f"truncation_mode must be 'keep_end' or 'keep_start', got {self.truncation_mode!r}.")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be a positive number of tokens, got {self.max_length}.")
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False
        use_cpu_for_bf16(self)
        super().__post_init__()
