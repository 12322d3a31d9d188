"""Training configuration: `SFTConfig` (TRL-compatible) on top of `transformers.TrainingArguments`."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers import TrainingArguments

from .compat import (
    apply_legacy_arguments,
    fsdp2_unavailable,
    legacy_training_arguments_base,
    mixed_precision_env_of_this_config,
    start_processes_before_deepspeed_config,
)

# TrainingArguments, plus the transformers 4.x names that 5.x removed (mapped in `__post_init__`, see compat).
if TYPE_CHECKING:  # the checker sees the fields of the installed TrainingArguments; the extra ones are runtime-only
    TrainingArgumentsWithLegacyNames = TrainingArguments
else:
    TrainingArgumentsWithLegacyNames = legacy_training_arguments_base()

DEFAULT_MAX_SEQ_LENGTH_CAP = 1024
PACKING_STRATEGIES = ("bfd_split", "bfd", "wrapped")


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


def average_tokens_field() -> Any:
    """`average_tokens_across_devices`, on by default as in transformers 5 (4.x defaulted to off): the loss and its
    gradient are the mean over every token of the global batch, so N processes train exactly as one."""
    return field(
        default=True,
        metadata={"help": "Average the loss over the tokens of all devices (N processes train as one)."},
    )


def bf16_field() -> Any:
    """The bf16 field of both configs (a fresh Field each: dataclasses write into it)."""
    return field(
        default=None,
        metadata={
            "help": "bf16 mixed precision (float32 master weights and optimizer state). Default (None): on where the "
            "hardware runs bf16 natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX) and fp16 is not set, "
            "as TRL's later configs do; float32 elsewhere. False: float32."
        },
    )


NONFINITE_MODES = ("stop", "skip")
TRUNCATION_MODES = ("keep_start", "keep_end")


def truncation_mode_field(default: str) -> Any:
    """`truncation_mode`, whose default is each TRL config's own: SFTConfig keeps the start, IterativeSFTConfig the
    end (a fresh Field each: dataclasses write into it)."""
    return field(
        default=default,
        metadata={
            "help": "Which part of an over-long example to keep: 'keep_start' (drop tokens from the end) or "
            "'keep_end' (drop tokens from the start)."
        },
    )


def refuse_fsdp2_where_unavailable(args: Any) -> None:
    """An `fsdp_config` that asks for FSDP2 on a stack that can only train FSDP1 is an error, not FSDP1."""
    config = args.fsdp_config or {}
    version = config.get("fsdp_version", config.get("version"))
    if args.fsdp and version is not None and str(version) == "2":
        reason = fsdp2_unavailable()
        if reason is not None:
            raise ValueError(
                f"fsdp_config asks for FSDP2 (version 2), but {reason}. Upgrade transformers and accelerate "
                "(FSDP2 is tested on transformers 5.25 with accelerate 1.16), or leave the version out for FSDP1."
            )


@dataclass
class SharedTrainingConfig(TrainingArgumentsWithLegacyNames):
    """The fields SFTConfig and IterativeSFTConfig share, declared and checked once, and the checks both run:
    TRL's legacy argument names, numbers a user can get wrong, and the machine's defaults (bf16, CPU
    processes). A config adds its own checks in `check_own_fields`."""

    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments of `from_pretrained` when the model is given by name or path."},
    )
    max_length: int | None = field(default=None, metadata={"help": "Longest sequence, in tokens, after truncation."})
    truncation_mode: str = truncation_mode_field("keep_start")
    bf16: bool | None = bf16_field()
    average_tokens_across_devices: bool = average_tokens_field()
    logging_steps: float = field(default=10, metadata={"help": "Log every X optimizer steps."})
    on_nonfinite: str = field(
        default="stop",
        metadata={
            "help": "When a step's loss or gradient norm is NaN/inf: 'stop' with an error (the default), or "
            "'skip' the step and count it."
        },
    )
    loss_chunk_size: int = field(
        default=1024,
        metadata={
            "help": "Compute the loss over this many tokens at a time, never holding the full logits "
            "(0: the model's own loss over full logits)."
        },
    )

    def __post_init__(self) -> None:
        apply_legacy_arguments(self)
        no_step_checkpoints_for_zero(self)
        self.model_init_kwargs = _maybe_json(self.model_init_kwargs, "model_init_kwargs")
        validate_numeric_fields(self)
        self.check_own_fields()
        if self.on_nonfinite not in NONFINITE_MODES:
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}.")
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode must be 'keep_start' or 'keep_end', got {self.truncation_mode!r}.")
        apply_machine_defaults(self)
        with mixed_precision_env_of_this_config():
            super().__post_init__()
        refuse_fsdp2_where_unavailable(self)

    def check_own_fields(self) -> None:
        """A config's own fields, normalised and checked before the shared checks."""


@dataclass
class SFTConfig(SharedTrainingConfig):
    """Arguments of `SFTTrainer`: every `TrainingArguments` field plus the SFT-specific ones below.

    Field names and defaults follow TRL's `SFTConfig`; TRL's later names are accepted too
    (`max_length` for `max_seq_length`). Differences from TRL, on purpose:
    - batches are padded to their longest row, not to `max_seq_length` (same result, less compute), and by
      default (`padding_free=True`) a batch's examples share rows, isolated from each other, so little is padded;
    - the loss is computed in chunks over labelled tokens only (`loss_chunk_size`), never holding full logits;
    - `packing=True` packs exactly: documents in one row never attend to each other (see `sftune.data.packing`),
      and by default (`packing_strategy="bfd_split"`) an example longer than `max_length` is split into pieces
      rather than truncated, so no token is lost; wherever truncation drops tokens, the log says how many.
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
        default="bfd_split",
        metadata={
            "help": "'bfd_split': best-fit-decreasing bins, examples never attend to each other; an example longer "
            "than max_length is split into max_length pieces, each its own document, so every token is trained. "
            "'bfd': the same, but over-long examples are truncated (the dropped tokens are counted in the log). "
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
    dataset_num_proc: int | None = field(
        default=None,
        metadata={"help": "Processes used to tokenize the dataset (None: this process)."},
    )
    dataset_batch_size: int = field(default=1000, metadata={"help": "Examples tokenized per batch."})
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
    assistant_turns_as_examples: bool = field(
        default=False,
        metadata={
            "help": "Make each assistant turn of a conversation its own example, its history rendered as at inference, "
            "training only that turn (by default only turns the whole conversation does not show as at inference "
            "become their own examples, see inexact_turns)."
        },
    )
    inexact_turns: str = field(
        default="split",
        metadata={
            "help": "Assistant turns that the whole conversation's rendering does not show as at inference (past "
            "reasoning dropped, a prefill, a moved system prompt): 'split' trains each as its own example rendered "
            "as at inference (logged once per dataset); 'error' refuses such rows before training.",
            "choices": ["split", "error"],
        },
    )
    chat_template_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": 'Extra keyword arguments of the chat template for every row, e.g. {"enable_thinking": false} '
            "(a row's own `chat_template_kwargs` column wins)."
        },
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
    learning_rate: float = field(default=2e-5, metadata={"help": "Initial AdamW learning rate."})

    def check_own_fields(self) -> None:
        self.dataset_kwargs = _maybe_json(self.dataset_kwargs, "dataset_kwargs")
        self.chat_template_kwargs = _maybe_json(self.chat_template_kwargs, "chat_template_kwargs")
        if self.max_length is not None and self.max_seq_length is not None and self.max_length != self.max_seq_length:
            raise ValueError(
                f"max_length={self.max_length} and max_seq_length={self.max_seq_length} are the same setting "
                "under two names; set only one."
            )
        if self.max_seq_length is None:
            self.max_seq_length = self.max_length
        self.max_length = self.max_seq_length
        if self.packing_strategy not in PACKING_STRATEGIES:
            raise ValueError(f"packing_strategy must be one of {PACKING_STRATEGIES}, got {self.packing_strategy!r}.")

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


def trainer_config(
    args: TrainingArguments | None,
    config_class: type,
    output_dir: str,
    legacy_kwargs: dict[str, Any],
    legacy_names: tuple[str, ...],
    trainer_name: str,
) -> Any:
    """A trainer's `args` as `config_class`: made with defaults when None, converted from plain
    `TrainingArguments`, and with the config fields old TRL versions took as trainer keyword arguments applied."""
    unknown = set(legacy_kwargs) - set(legacy_names)
    if unknown:
        raise TypeError(f"{trainer_name} got unexpected keyword arguments {sorted(unknown)}.")
    args = config_class(output_dir=output_dir) if args is None else convert_training_arguments(args, config_class)
    if legacy_kwargs:
        import warnings

        warnings.warn(
            f"Passing {sorted(legacy_kwargs)} to {trainer_name} is deprecated; set them on {config_class.__name__}.",
            FutureWarning,
            stacklevel=4,
        )
        for key, value in legacy_kwargs.items():
            setattr(args, key, value)
    return args


def train_without_evaluation_data(args: TrainingArguments, eval_dataset: Any, trainer_name: str) -> None:
    """`eval_strategy` other than "no" with no eval dataset: transformers >= 4.46 refuses to build the Trainer, while
    TRL-era code (e.g. TRL 0.11's recipes, `eval_strategy="steps"` set once for every run) trained on, evaluating
    nothing. A drop-in trains too, and says loudly that nothing will be evaluated."""
    strategy = str(getattr(args.eval_strategy, "value", args.eval_strategy))
    if eval_dataset is not None or strategy in ("no", "None"):
        return
    import warnings

    warnings.warn(
        f"{trainer_name}: eval_strategy={strategy!r} but no eval_dataset was given, so nothing will be evaluated: "
        "training goes on with eval_strategy='no'"
        + (" and load_best_model_at_end=False" if args.load_best_model_at_end else "")
        + ". Pass eval_dataset=... to evaluate.",
        UserWarning,
        stacklevel=3,
    )
    from transformers.trainer_utils import IntervalStrategy

    args.eval_strategy = IntervalStrategy.NO
    args.load_best_model_at_end = False


def convert_training_arguments(args: TrainingArguments, config_class: type) -> Any:
    """`args` as an instance of `config_class` (SFTConfig, IterativeSFTConfig): plain `TrainingArguments` are
    copied field by field, the extra fields keeping their defaults."""
    if isinstance(args, config_class):
        return args
    import dataclasses

    fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init and not f.name.startswith("_")}
    return config_class(**{name: getattr(args, name) for name in fields if name in args.to_dict()})


# field -> (lowest, highest, lowest allowed itself?, None allowed?, what it means); checked where a config has it.
NUMERIC_FIELDS: dict[str, tuple[float, float, bool, bool, str]] = {
    "max_seq_length": (1, math.inf, True, True, "a number of tokens"),
    "max_length": (1, math.inf, True, True, "a number of tokens"),
    "per_device_train_batch_size": (1, math.inf, True, False, "examples per device per step"),
    "per_device_eval_batch_size": (1, math.inf, True, False, "examples per device per step"),
    "gradient_accumulation_steps": (1, math.inf, True, False, "micro-batches per optimizer step"),
    "eval_accumulation_steps": (1, math.inf, True, True, "steps"),
    "dataset_batch_size": (1, math.inf, True, False, "examples tokenized per batch"),
    "dataset_num_proc": (1, math.inf, True, True, "processes"),
    "dataloader_num_workers": (0, math.inf, True, False, "worker processes"),
    "num_of_sequences": (1, math.inf, True, False, "examples"),
    "chars_per_token": (0, math.inf, False, False, "characters per token"),
    "num_train_epochs": (0, math.inf, False, False, "epochs"),
    "learning_rate": (0, math.inf, True, False, "a learning rate"),
    "weight_decay": (0, math.inf, True, False, "a decay factor"),
    "max_grad_norm": (0, math.inf, True, True, "a gradient norm (0: no clipping)"),
    "adam_beta1": (0, 1, True, False, "a decay rate below 1"),
    "adam_beta2": (0, 1, True, False, "a decay rate below 1"),
    "adam_epsilon": (0, math.inf, True, False, "a small constant"),
    "warmup_ratio": (0, 1, True, True, "a fraction of the training steps"),
    "warmup_steps": (0, math.inf, True, False, "steps (or a fraction below 1)"),
    "logging_steps": (0, math.inf, False, False, "steps (or a fraction below 1)"),
    "save_steps": (0, math.inf, True, True, "steps (or a fraction below 1; 0: no step checkpoints)"),
    "eval_steps": (0, math.inf, False, True, "steps (or a fraction below 1)"),
    "save_total_limit": (1, math.inf, True, True, "checkpoints"),
    "label_smoothing_factor": (0, 1, True, False, "a fraction"),
    "neftune_noise_alpha": (0, math.inf, True, True, "a noise scale"),
    "loss_chunk_size": (0, math.inf, True, False, "tokens per loss chunk (0: the model's own loss)"),
    "seed": (0, 2**32 - 1, True, False, "a seed"),
    "data_seed": (0, 2**32 - 1, True, True, "a seed"),
}


def validate_numeric_fields(config: Any) -> None:
    """Refuse numbers a user can get wrong (0 batch size, negative lengths, NaN learning rate), naming the field."""
    for name, (low, high, low_ok, none_ok, meaning) in NUMERIC_FIELDS.items():
        if not hasattr(config, name):
            continue
        value = getattr(config, name)
        if value is None and none_ok:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number ({meaning}), got {value!r}.")
        above = value >= low if low_ok else value > low
        if not math.isfinite(value) or not above or value > high:
            bounds = f"{'>=' if low_ok else '>'} {low}" + (f" and <= {high}" if high != math.inf else "")
            raise ValueError(f"{name} must be {bounds} ({meaning}), got {value!r}.")
    max_steps = getattr(config, "max_steps", -1)
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or (max_steps < 1 and max_steps != -1):
        raise ValueError(
            f"max_steps must be a positive number of steps (-1: train num_train_epochs), got {max_steps!r}."
        )


def no_step_checkpoints_for_zero(args: TrainingArguments) -> None:
    """`save_steps=0` meant "no step checkpoints" on transformers 4.x (its callback skipped a zero interval);
    transformers 5 refuses it. Keep the old meaning: no checkpoints during training."""
    if args.save_steps == 0 and str(getattr(args.save_strategy, "value", args.save_strategy)) == "steps":
        args.save_strategy = "no"
        args.save_steps = 500  # transformers' default, so its own checks pass; nothing is saved by step


def cpu_supports_bf16() -> bool:
    """oneDNN has bf16 kernels for this CPU (x86 with AVX-512 or AMX, Arm with BF16)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_has_native_bf16() -> bool:
    """bf16 instructions in hardware (x86 AVX512-BF16 or AMX), where bf16 autocast trains faster than fp32; with
    AVX-512 alone oneDNN emulates bf16, correct but not faster."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def fast_bf16_available() -> bool:
    """bf16 mixed precision trains faster than float32 here: a CUDA GPU with native bf16, or a CPU with
    AVX512-BF16/AMX (1.9x per step on the packing benchmark's batches, 2 cores)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return cpu_has_native_bf16()


def apply_machine_defaults(args: TrainingArguments) -> None:
    """Settings that follow from the machine, shared by both configs: bf16 where it is native (unless set), on a
    machine without a CUDA GPU no pinned memory (it only warns), torchrun trains one job over gloo, and bf16 means
    CPU mixed precision."""
    if args.bf16 is None:
        args.bf16 = not args.fp16 and fast_bf16_available()
    if not torch.cuda.is_available():
        args.dataloader_pin_memory = False
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # torchrun on CPU: without these, transformers runs N independent copies of the job.
            args.use_cpu = True
            args.ddp_backend = args.ddp_backend or "gloo"
    use_cpu_for_bf16(args)
    start_processes_before_deepspeed_config(args)


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
class IterativeSFTConfig(SharedTrainingConfig):
    """Arguments of `IterativeSFTTrainer`: every `TrainingArguments` field, the ones it shares with SFTConfig
    (`SharedTrainingConfig`: max_length, here without a default limit, truncation_mode, on_nonfinite, ...) and
    the ones below."""

    truncation_mode: str = truncation_mode_field("keep_end")  # TRL's IterativeSFTConfig keeps the end
    optimize_device_cache: bool = field(
        default=False, metadata={"help": "Free cached accelerator memory after every step (a no-op on CPU)."}
    )
