"""Every difference between the library versions sftune supports, in one place.

The support matrix (README, pyproject, `constraints/`): transformers 4.46-5.x, datasets 3.0-5.x, peft 0.15+,
accelerate 1.4+. Code elsewhere asks this module instead of testing versions itself, so that dropping an old
version is a matter of deleting lines here.

What it covers:
- `output_dir`: required by older 4.x releases, optional ("trainer_output") in 5.x: optional on every version.
- TrainingArguments fields that transformers 5 removed but TRL-era code still passes (`warmup_ratio`,
  `evaluation_strategy`, `overwrite_output_dir`, ...): `legacy_training_arguments_base()` gives the configs a base
  class that accepts them, and `apply_legacy_arguments()` maps each to its current meaning with one FutureWarning
  (or, where it no longer means anything, says so). On transformers 4.x they are transformers' own fields.
- `rotate_checkpoints` (only transformers 5 has a public one); `best_global_step` (4.50+ records it).
- The token count of the loss average, `num_items_in_batch` (`counts_predicted_labels`).
- `torch.load` of the indexed CPU devices accelerate gives multi-CPU processes (`read_indexed_cpu_locations`).
- FSDP2, which the oldest supported transformers/accelerate cannot run (`fsdp2_unavailable`).
- The `from_pretrained` keyword for the dtype (`dtype` in 5.x, `torch_dtype` before 4.56).
- Processors called TRL-era style, `processor(texts, images)`, which transformers 5 reads as `images=texts`.
- Whether the installed transformers isolates packed documents from `position_ids` alone.
- DeepSpeed's "auto" batch sizes under transformers 5's lazy process set-up (`start_processes_before_deepspeed_config`).
- The KV-cache keyword of a model's forward (`cache` or `past_key_values`) and `logits_to_keep` (`cache_argument`).
- The private transformers functions behind `apply_chat_template` that sftune.data.render calls directly for speed
  (`compile_chat_template`, `template_messages`, `plain_template_data`), each with a fallback where absent.

It imports no other sftune module (the lowest import layer).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import transformers
from packaging.version import Version
from transformers import TrainingArguments

TRANSFORMERS_VERSION = Version(transformers.__version__)
TRANSFORMERS_5 = TRANSFORMERS_VERSION >= Version("5.0.0.dev0")


# --------------------------------------------------------------------------------------------------------------
# TrainingArguments fields of transformers 4.x that transformers 5 removed
# --------------------------------------------------------------------------------------------------------------


def _set(name: str, value_of: Any = None) -> Any:
    """A mapping that sets `name` (to the old value, or to `value_of(old value, args)`) unless already set."""

    def apply(args: Any, value: Any) -> None:
        setattr(args, name, value if value_of is None else value_of(value, args))

    return apply


def _warmup_ratio(args: Any, value: float) -> None:
    # transformers 5 reads a warmup_steps below 1 as a fraction of the training steps; a ratio of 1 (warm up over
    # the whole run) stays a fraction that way.
    if args.warmup_steps not in (0, None):
        raise ValueError(
            f"warmup_ratio={value} and warmup_steps={args.warmup_steps} both set the warmup; keep one "
            "(warmup_steps below 1 is a fraction of the training steps)."
        )
    args.warmup_steps = min(float(value), 1 - 1e-9) if value else 0


def _logging_dir(args: Any, value: str) -> None:
    # transformers 5's TensorBoard callback reads its folder from this variable.
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(value))


def _group_by_length(args: Any, value: bool) -> None:
    if value:
        args.train_sampling_strategy = "group_by_length"


def _include_inputs(args: Any, value: bool) -> None:
    if value:
        args.include_for_metrics = sorted(set(args.include_for_metrics or []) | {"inputs"})


def _adafactor(args: Any, value: bool) -> None:
    if value:
        args.optim = "adafactor"


def _torchdynamo(args: Any, value: str) -> None:
    args.torch_compile = True
    args.torch_compile_backend = value


def _into_dict(attribute: str, key: str) -> Any:
    def apply(args: Any, value: Any) -> None:
        current = getattr(args, attribute)
        if current is None or isinstance(current, str):
            current = {} if not current else __import__("json").loads(current)
        if isinstance(current, dict):
            current.setdefault(key, value)
        else:  # an AcceleratorConfig object
            setattr(current, key, value)
        setattr(args, attribute, current)

    return apply


def _hub_organization(args: Any, value: str) -> None:
    name = args.hub_model_id or Path(args.output_dir or "model").name
    args.hub_model_id = f"{value}/{name.split('/')[-1]}"


def _no_cuda(args: Any, value: bool) -> None:
    args.use_cpu = args.use_cpu or bool(value)


# name -> (type, what it means now, how to apply it; None: it no longer means anything)
LEGACY_TRAINING_ARGUMENTS: dict[str, tuple[type, str, Any]] = {
    "evaluation_strategy": (str, "renamed `eval_strategy`", _set("eval_strategy")),
    "warmup_ratio": (float, "now `warmup_steps` below 1 (a fraction of the training steps)", _warmup_ratio),
    "logging_dir": (str, "now the TENSORBOARD_LOGGING_DIR environment variable", _logging_dir),
    "group_by_length": (bool, "now `train_sampling_strategy='group_by_length'`", _group_by_length),
    "per_gpu_train_batch_size": (int, "renamed `per_device_train_batch_size`", _set("per_device_train_batch_size")),
    "per_gpu_eval_batch_size": (int, "renamed `per_device_eval_batch_size`", _set("per_device_eval_batch_size")),
    "no_cuda": (bool, "renamed `use_cpu`", _no_cuda),
    "push_to_hub_model_id": (str, "renamed `hub_model_id`", _set("hub_model_id")),
    "push_to_hub_token": (str, "renamed `hub_token`", _set("hub_token")),
    "push_to_hub_organization": (str, "now the owner part of `hub_model_id`", _hub_organization),
    "include_inputs_for_metrics": (bool, "now `include_for_metrics=['inputs']`", _include_inputs),
    "adafactor": (bool, "now `optim='adafactor'`", _adafactor),
    "torchdynamo": (str, "now `torch_compile_backend`", _torchdynamo),
    "fsdp_min_num_params": (int, "now `fsdp_config['min_num_params']`", _into_dict("fsdp_config", "min_num_params")),
    "fsdp_transformer_layer_cls_to_wrap": (
        str,
        "now `fsdp_config['transformer_layer_cls_to_wrap']`",
        _into_dict("fsdp_config", "transformer_layer_cls_to_wrap"),
    ),
    "dispatch_batches": (
        bool,
        "now `accelerator_config['dispatch_batches']`",
        _into_dict("accelerator_config", "dispatch_batches"),
    ),
    "split_batches": (
        bool,
        "now `accelerator_config['split_batches']`",
        _into_dict("accelerator_config", "split_batches"),
    ),
    # No meaning any more: accepted, with a warning that says so.
    "overwrite_output_dir": (bool, "transformers never refused an existing output_dir; it has no effect", None),
    "save_safetensors": (bool, "checkpoints are always safetensors; it has no effect", None),
    "use_mps_device": (bool, "an Apple GPU is used automatically; it has no effect", None),
    "jit_mode_eval": (bool, "TorchScript evaluation was removed; it has no effect", None),
    "use_ipex": (bool, "Intel Extension for PyTorch support was removed; it has no effect", None),
    "fp16_opt_level": (str, "apex AMP was removed (torch AMP is used); it has no effect", None),
    "half_precision_backend": (str, "only torch AMP remains; it has no effect", None),
    "fp16_backend": (str, "only torch AMP remains; it has no effect", None),
    "tpu_num_cores": (int, "set by the TPU launcher; it has no effect", None),
    "tpu_metrics_debug": (bool, "it has no effect", None),
    "past_index": (int, "it has no effect", None),
    "use_legacy_prediction_loop": (bool, "the legacy prediction loop was removed; it has no effect", None),
    "mp_parameters": (str, "it has no effect", None),
    "ray_scope": (str, "Ray Tune's scope is set in its own call now; it has no effect", None),
    "include_tokens_per_second": (bool, "sftune logs tokens per second itself; it has no effect", None),
}


@functools.cache
def fsdp2_unavailable() -> str | None:
    """Why the installed transformers/accelerate cannot train FSDP2 (None where they can): before transformers
    builds accelerate's FSDP settings from `fsdp_config` itself (`_process_fsdp_args`) and accelerate's plugin has
    `fsdp_version` (both absent from transformers 4.46 / accelerate 1.4), `fsdp_config` selects FSDP1 only."""
    import accelerate
    from accelerate.utils import FullyShardedDataParallelPlugin

    if not hasattr(TrainingArguments, "_process_fsdp_args"):
        return f"transformers {transformers.__version__} trains FSDP1 only"
    if "fsdp_version" not in {f.name for f in dataclasses.fields(FullyShardedDataParallelPlugin)}:
        return f"accelerate {accelerate.__version__} trains FSDP1 only"
    return None


def legacy_training_arguments_base() -> type:
    """`TrainingArguments` plus a field (default None) for each old name the installed transformers lacks, so that
    constructors, `HfArgumentParser` flags and YAML recipes all accept them. On transformers 4.x: `TrainingArguments`
    itself (the names are its own fields there), with `output_dir` optional as in 5.x."""
    fields = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    present = set(fields)
    extra: list[tuple[str, Any, Any]] = []
    if fields["output_dir"].default is dataclasses.MISSING:  # required by older 4.x (4.46); optional in 5.x
        help_text = "Where checkpoints and the model are written (default: trainer_output)."
        extra.append(("output_dir", str | None, dataclasses.field(default=None, metadata={"help": help_text})))
    for name, (kind, meaning, _) in LEGACY_TRAINING_ARGUMENTS.items():
        if name not in present:
            help_text = f"Deprecated (transformers 4.x): {meaning}."
            extra.append((name, kind | None, dataclasses.field(default=None, metadata={"help": help_text})))
    if not extra:
        return TrainingArguments
    return dataclasses.make_dataclass("LegacyTrainingArguments", extra, bases=(TrainingArguments,))


def apply_legacy_arguments(args: Any) -> None:
    """Map every old name set on `args` to its current meaning, with one FutureWarning each (before
    `TrainingArguments.__post_init__`). On transformers 4.x, where they are transformers' own fields, only give
    `output_dir` the default newer versions give it."""
    if args.output_dir is None:
        args.output_dir = "trainer_output"
    if not TRANSFORMERS_5:
        return
    for name, (_, meaning, apply) in LEGACY_TRAINING_ARGUMENTS.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        setattr(args, name, None)  # applied once: a copy of these args does not warn again
        warnings.warn(
            f"`{name}` is a transformers 4.x argument: {meaning}. "
            + ("It was applied that way; use the new form." if apply is not None else "It is ignored."),
            FutureWarning,
            stacklevel=4,
        )
        if apply is not None:
            apply(args, value)


def legacy_names() -> list[str]:
    """The old TrainingArguments names accepted (with a warning) on this transformers."""
    return sorted(LEGACY_TRAINING_ARGUMENTS)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints, models, processors
# --------------------------------------------------------------------------------------------------------------


def rotate_checkpoints(output_dir: str, save_total_limit: int | None, best_model_checkpoint: str | None) -> None:
    """Delete the oldest `checkpoint-N` folders beyond `save_total_limit`, never the newest nor the best one
    (transformers 5's `trainer_utils.rotate_checkpoints`; 4.x has it only as a Trainer method)."""
    if not save_total_limit or save_total_limit <= 0:
        return
    numbered = []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            numbered.append((int(match.group(1)), str(path)))
    checkpoints = [path for _, path in sorted(numbered)]
    if len(checkpoints) <= save_total_limit:
        return
    protected = {checkpoints[-1]}
    if best_model_checkpoint is not None:
        protected.add(str(Path(best_model_checkpoint)))
    keep = max(save_total_limit, len(protected))
    remaining = len(checkpoints)
    for checkpoint in checkpoints:
        if remaining <= keep:
            break
        if checkpoint not in protected:
            shutil.rmtree(checkpoint, ignore_errors=True)
            remaining -= 1


# `from_pretrained`'s dtype keyword: `dtype` from transformers 4.56 on, `torch_dtype` before.
DTYPE_KWARG = "dtype" if TRANSFORMERS_VERSION >= Version("4.56.0") else "torch_dtype"


def best_global_step(state: Any) -> int | None:
    """The best checkpoint's step: `state.best_global_step` (transformers >= 4.50), else read from the folder
    name of `best_model_checkpoint`."""
    step = getattr(state, "best_global_step", None)
    if step is None and state.best_model_checkpoint:
        suffix = os.path.basename(os.path.normpath(state.best_model_checkpoint)).rsplit("-", 1)[-1]
        step = int(suffix) if suffix.isdigit() else None
    return step


def dtype_kwargs(dtype: Any) -> dict[str, Any]:
    """`{"dtype": dtype}` in the keyword this transformers' `from_pretrained`/`_from_config` reads."""
    return {DTYPE_KWARG: dtype}


def model_init_dtype_key(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`model_init_kwargs` (normalized to the `dtype` key) with the dtype under this transformers' keyword."""
    if DTYPE_KWARG != "dtype" and "dtype" in kwargs:
        kwargs = dict(kwargs)
        kwargs[DTYPE_KWARG] = kwargs.pop("dtype")
    return kwargs


def _looks_like_text(value: Any) -> bool:
    if isinstance(value, str):
        return True
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, str) for v in value)


def accept_positional_processor_call(processor: Any) -> Any:
    """Let `processor(texts, images)` (TRL-era collators; transformers 4.x swapped the two when the first was text)
    mean the same on transformers 5, whose processors read the first positional argument as `images`.

    The instance's class is replaced by a subclass with that one difference; everything else is the processor's."""
    if not TRANSFORMERS_5 or processor is None:
        return processor
    from transformers import ProcessorMixin

    cls = type(processor)
    if not isinstance(processor, ProcessorMixin) or getattr(cls, "_sftune_positional_text", False):
        return processor

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        if args and "text" not in kwargs and _looks_like_text(args[0]):
            text, *rest = args
            if rest and "images" not in kwargs:
                kwargs["images"] = rest.pop(0)
            return cls.__call__(self, *rest, text=text, **kwargs)
        return cls.__call__(self, *args, **kwargs)

    processor.__class__ = type(cls.__name__, (cls,), {"__call__": __call__, "_sftune_positional_text": True})
    return processor


@functools.cache
def position_ids_isolate_documents() -> bool:
    """The installed transformers builds a block-diagonal causal mask from `position_ids` that restart at 0 when no
    attention mask is given (its packed-sequence detection) - but only when the forward builds no KV cache: on 5.25
    a forward with the default `use_cache=True` lets packed documents attend to each other (logits 0.58 apart on a
    tiny Llama). So this decides only what a collator emits; sftune's trainers build the mask themselves
    (`collators.mask_for_model`), and code that trains on position_ids alone must pass `use_cache=False`."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    return True


def numpy_safe_globals() -> Any:
    """A context in which `torch.load(weights_only=True)` (torch >= 2.6's default) reads the numpy RNG state that
    `Trainer` saves in `rng_state.pth`. transformers >= 4.50 allowlists it itself; 4.4x calls plain `torch.load`,
    so resuming any checkpoint fails there without this."""
    import numpy as np
    import torch

    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    return torch.serialization.safe_globals(allowed)


def counts_predicted_labels(trainer: Any) -> bool:
    """Whether this transformers counts `num_items_in_batch` over the labels a causal LM predicts (`labels[:, 1:]`),
    as 5.x does (it sets `_loss_shifts_labels`); 4.x counts every label, position 0 included, so the token average
    differs between 1 and N processes."""
    return hasattr(trainer, "_loss_shifts_labels")


@functools.cache
def read_indexed_cpu_locations() -> None:
    """Let `torch.load` take `map_location="cpu:N"`. accelerate (1.4 to at least 1.16) gives each process of a
    multi-CPU run the device `cpu:<local rank>`, and transformers 4.x resumes a multi-process run's optimizer with
    `torch.load(map_location=args.device)`, which torch refuses ("don't know how to restore data location ... cpu:0").
    Any CPU index is the CPU: registered once, for locations torch has no reader for."""
    import torch

    def read(storage: Any, location: str) -> Any:
        return storage if re.fullmatch(r"cpu:\d+", location) else None

    torch.serialization.register_package(100, lambda storage: None, read)


def bits_and_bytes_config(**kwargs: Any) -> Any:
    """`BitsAndBytesConfig(**kwargs)`. transformers 5 builds it anywhere; 4.x reads the installed bitsandbytes version
    while building it, so without bitsandbytes it fails there: say what to install instead of a metadata error."""
    from importlib.metadata import PackageNotFoundError

    from transformers import BitsAndBytesConfig

    try:
        return BitsAndBytesConfig(**kwargs)
    except PackageNotFoundError as err:
        raise RuntimeError("8-bit/4-bit loading needs bitsandbytes: `pip install 'sftune[bnb]'`.") from err


_MIXED_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"
# Records (in the environment, so that worker processes spawned later know it too) the value transformers wrote.
_WRITTEN_MARK = "SFTUNE_MIXED_PRECISION_WRITTEN_BY_TRANSFORMERS"


@contextlib.contextmanager
def mixed_precision_env_of_this_config() -> Any:
    """Around `TrainingArguments.__post_init__`: transformers 4.x writes ACCELERATE_MIXED_PRECISION for a bf16/fp16
    config and never clears it, so a later float32 config in the same process (a notebook, a test suite), or in a
    process it spawns, trains in bf16. A value that transformers wrote for an earlier config is removed first; one
    set by the user or a launcher (`accelerate launch`) is left alone."""
    current = os.environ.get(_MIXED_PRECISION_ENV)
    if not TRANSFORMERS_5 and current is not None and os.environ.get(_WRITTEN_MARK) == current:
        del os.environ[_MIXED_PRECISION_ENV]
        current = None
    yield
    after = os.environ.get(_MIXED_PRECISION_ENV)
    if after is not None and after != current:
        os.environ[_WRITTEN_MARK] = after


def start_processes_before_deepspeed_config(args: Any) -> None:
    """transformers fills DeepSpeed's "auto" batch sizes from `args.world_size` while it reads the DeepSpeed
    config, but (5.x) sets the processes up only later, lazily: the world size then reads 1 and train_batch_size
    comes out N times too small (DeepSpeed's batch assertion fails). Set them up first."""
    if args.deepspeed and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        args._setup_devices  # noqa: B018 (a cached property: the set-up is the point)


# --------------------------------------------------------------------------------------------------------------
# Model forward arguments for incremental decoding
# --------------------------------------------------------------------------------------------------------------


def cache_argument(model: Any) -> tuple[str, dict[str, int]]:
    """The name the model's forward gives its KV cache (`cache` in recent transformers, else `past_key_values`),
    and the argument that computes only the last position's logits if it has one (`logits_to_keep`, transformers
    >= 4.50; older ones compute every position's)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    parameters = inspect.signature(base.forward).parameters
    name = "cache" if "cache" in parameters else "past_key_values"
    return name, ({"logits_to_keep": 1} if "logits_to_keep" in parameters else {})


# --------------------------------------------------------------------------------------------------------------
# Chat templates rendered as apply_chat_template renders them (sftune.data.render's fast path)
# --------------------------------------------------------------------------------------------------------------


def _chat_template_utils() -> Any:
    try:
        from transformers.utils import chat_template_utils
    except ImportError:
        return None
    return chat_template_utils


def compile_chat_template(template: str) -> Any:
    """The compiled Jinja template `apply_chat_template` renders with (transformers' private
    `_compile_jinja_template`), or None where this transformers has none: callers then call `apply_chat_template`."""
    compile_template = getattr(_chat_template_utils(), "_compile_jinja_template", None)
    return compile_template(template) if compile_template is not None else None


def plain_template_data(value: Any) -> Any:
    """`value` as transformers hands it to a template (its private `_plain_template_data`: plain dicts and lists;
    versions without it pass values as they are)."""
    plain = getattr(_chat_template_utils(), "_plain_template_data", None)
    return plain(value) if plain is not None else value


def template_messages(messages: list[dict]) -> list[dict]:
    """The messages as `apply_chat_template` hands them to the template: None fields dropped (its private
    `_normalize_chat_messages` where it has one), plain data, reasoning field aliases (`_alias_reasoning_fields`).
    Each step is used where this transformers has it."""
    utils = _chat_template_utils()
    normalize = getattr(utils, "_normalize_chat_messages", None)
    chat = normalize(messages) if normalize else [{k: v for k, v in m.items() if v is not None} for m in messages]
    chat = plain_template_data(chat)
    alias = getattr(utils, "_alias_reasoning_fields", None)
    return alias(chat) if alias else chat
