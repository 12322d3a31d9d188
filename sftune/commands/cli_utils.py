"""TRL 0.11's `trl.commands.cli_utils`: the script helpers."""

from ..scripts.utils import (
    ScriptArguments,
    SFTScriptArguments,
    TrlParser,
    YamlConfigParser,
    get_git_commit_hash,
    init_zero_verbose,
)

__all__ = [
    "SFTScriptArguments",
    "ScriptArguments",
    "TrlParser",
    "YamlConfigParser",
    "get_git_commit_hash",
    "init_zero_verbose",
]
