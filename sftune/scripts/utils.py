"""TRL's script helpers: `TrlParser`, `ScriptArguments`, `SFTScriptArguments`, `YamlConfigParser`.

TRL's example scripts and the recipes written for them parse their arguments like this:

    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()

and run as `python sft.py --config recipe.yaml --learning_rate 1e-4`: the YAML file gives defaults for any field,
the command line overrides them, and the file's `env:` section sets environment variables. Both generations of
the API work: TRL 0.11's (`trl.commands.cli_utils`, `TrlParser(parsers, ignore_extra_args=...)`) and 0.12+'s
(`trl.TrlParser(dataclass_types)`, `parse_args_and_config(args, return_remaining_strings, fail_with_unknown_args)`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from argparse import Namespace
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

logger = logging.getLogger(__name__)


@dataclass
class ScriptArguments:
    """The dataset arguments of TRL's scripts (`trl.ScriptArguments`)."""

    dataset_name: str | None = field(default=None, metadata={"help": "Dataset name, local file or folder."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on."})
    dataset_streaming: bool = field(default=False, metadata={"help": "Stream the dataset instead of loading it."})
    gradient_checkpointing_use_reentrant: bool = field(
        default=False,
        metadata={"help": "Reentrant gradient checkpointing (the scripts pass it in gradient_checkpointing_kwargs)."},
    )
    ignore_bias_buffers: bool = field(
        default=False,
        metadata={"help": "Ignore boolean bias buffers in DDP (a workaround for some models)."},
    )


@dataclass
class SFTScriptArguments(ScriptArguments):
    """TRL 0.11's SFT script arguments (`trl.commands.cli_utils.SFTScriptArguments`): its dataset default, and
    `config` for a dataset configuration."""

    dataset_name: str | None = field(
        default="timdettmers/openassistant-guanaco", metadata={"help": "Dataset name, local file or folder."}
    )
    config: str | None = field(default=None, metadata={"help": "Dataset configuration name (TRL 0.11's name)."})


class YamlConfigParser:
    """Reads a YAML recipe and applies its `env:` section to `os.environ`."""

    def parse_and_set_env(self, config_path: str) -> dict[str, Any]:
        config = read_recipe(config_path)
        set_env_from_recipe(config, config_path)
        return config

    def to_string(self, config: dict[str, Any]) -> str:
        return "".join(f"--{key} {value} " for key, value in config.items()).strip()


def read_recipe(path: str) -> dict[str, Any]:
    """A YAML recipe as a dict (empty for an empty file), with errors that name the file and line."""
    import yaml

    if not Path(path).is_file():
        raise ValueError(f"Config file {path} not found.")
    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}).") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ValueError(f"{path}: not valid YAML{where}: {getattr(err, 'problem', None) or err}.") from err
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected `key: value` lines, got a {type(config).__name__}.")
    return config


def set_env_from_recipe(config: dict[str, Any], path: str = "the config file") -> None:
    """Pop the recipe's `env:` section and set each variable (as TRL does: the recipe wins over the shell)."""
    if "env" not in config:
        return
    env = config.pop("env")
    if env is None:
        return
    if not isinstance(env, dict):
        raise ValueError(f"{path}: the `env` field must be a mapping of variable names to values, got {env!r}.")
    for key, value in env.items():
        os.environ[str(key)] = str(value)


class TrlParser(HfArgumentParser):
    """`HfArgumentParser` that also reads `--config recipe.yaml` (defaults for any field, `env:` variables)."""

    def __init__(
        self,
        dataclass_types: Any = None,
        ignore_extra_args: bool | None = None,
        parsers: Any = None,
        **kwargs: Any,
    ) -> None:
        types = dataclass_types if dataclass_types is not None else parsers
        if types is None:
            types = []
        elif not isinstance(types, Iterable) or dataclasses.is_dataclass(types):
            types = [types]
        types = list(types)
        for dataclass_type in types:
            if "config" in getattr(dataclass_type, "__dataclass_fields__", {}) and dataclass_type is not (
                SFTScriptArguments
            ):
                raise ValueError(
                    f"{dataclass_type.__name__} has a field named `config`; TrlParser reserves `--config` for the "
                    "YAML file. Rename the field."
                )
        super().__init__(types, **kwargs)
        self.ignore_extra_args = bool(ignore_extra_args)
        self.yaml_parser = YamlConfigParser()

    def parse_args_and_config(
        self,
        args: Iterable[str] | None = None,
        return_remaining_strings: bool = False,
        fail_with_unknown_args: bool = True,
    ) -> tuple:
        """The dataclasses from `args` (default: `sys.argv[1:]`) over the `--config` file's values. Unknown keys in
        the file are an error (TRL's `fail_with_unknown_args`, or `ignore_extra_args=False` of TRL 0.11) unless
        `return_remaining_strings`, which returns them with the command line's leftovers as a last element."""
        args = list(sys.argv[1:] if args is None else args)
        config_remaining: list[str] = []
        config_path = _pop_flag(args, "--config")
        if config_path is not None:
            config = self.yaml_parser.parse_and_set_env(config_path)
            config_remaining = self.set_defaults_with_config(**config)
        output = self.parse_args_into_dataclasses(args=args, return_remaining_strings=return_remaining_strings)
        if return_remaining_strings:
            *parsed, remaining = output
            return (*parsed, config_remaining + list(remaining))
        if config_remaining and fail_with_unknown_args and not self.ignore_extra_args:
            unknown = config_remaining[::2]
            raise ValueError(
                f"{config_path}: unknown keys {[name.removeprefix('--') for name in unknown]}: they are not fields of "
                f"{[t.__name__ for t in self.dataclass_types]}. Fix their spelling or remove them."
            )
        return output

    def set_defaults_with_config(self, **kwargs: Any) -> list[str]:
        """Make the config's values the defaults (a field given by it is no longer required); return the keys no
        field takes, as `--key value` strings."""
        for action in self._actions:
            if action.dest in kwargs:
                value = kwargs.pop(action.dest)
                action.default = _as_flag_default(action, value)
                action.required = False
        return [item for key, value in kwargs.items() for item in (f"--{key}", str(value))]

    def post_process_dataclasses(self, dataclasses_: list[Any]) -> list[Any]:
        """TRL 0.11: `gradient_checkpointing_use_reentrant` of the script arguments goes into the training
        arguments' `gradient_checkpointing_kwargs`."""
        script = next((d for d in dataclasses_ if isinstance(d, ScriptArguments)), None)
        training = next((d for d in dataclasses_ if hasattr(d, "gradient_checkpointing_kwargs")), None)
        if script is not None and training is not None:
            training.gradient_checkpointing_kwargs = {"use_reentrant": script.gradient_checkpointing_use_reentrant}
        return dataclasses_


def _pop_flag(args: list[str], flag: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == flag:
            if i + 1 >= len(args):
                raise ValueError(f"{flag} needs a value: {flag} path/to/recipe.yaml")
            value = args[i + 1]
            del args[i : i + 2]
            return value
        if arg.startswith(flag + "="):
            del args[i]
            return arg.split("=", 1)[1]
    return None


def _as_flag_default(action: Any, value: Any) -> Any:
    """A YAML value as the flag's default: dicts as JSON (the fields parse JSON strings), scalars through the
    flag's type so that `learning_rate: 1e-4` (a string to YAML) becomes a float."""
    import json

    if isinstance(value, dict):
        return json.dumps(value)
    if value is None or action.type is None or isinstance(value, list):
        return value
    try:
        return action.type(value)
    except (TypeError, ValueError):
        return value


def init_zero_verbose() -> None:
    """TRL 0.11's helper that quiets logging to errors only (used by its scripts under DeepSpeed ZeRO)."""
    import warnings

    logging.basicConfig(format="%(message)s", level=logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)


def get_git_commit_hash(package_name: str) -> str | None:
    """TRL 0.11's helper; sftune is not run from a git checkout of a package, so there is no hash to report."""
    return None


__all__ = [
    "Namespace",
    "SFTScriptArguments",
    "ScriptArguments",
    "TrlParser",
    "YamlConfigParser",
    "init_zero_verbose",
]
