"""TRL 0.11's `trl.commands` import path."""

from .cli_utils import SFTScriptArguments, TrlParser, YamlConfigParser, init_zero_verbose

__all__ = ["SFTScriptArguments", "TrlParser", "YamlConfigParser", "init_zero_verbose"]
