"""TRL's `trl.scripts` import path: the script helpers."""

from .utils import ScriptArguments, SFTScriptArguments, TrlParser, YamlConfigParser, init_zero_verbose

__all__ = ["SFTScriptArguments", "ScriptArguments", "TrlParser", "YamlConfigParser", "init_zero_verbose"]
