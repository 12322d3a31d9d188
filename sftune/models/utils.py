"""TRL's `trl.models.utils` import path."""

from ..chat import ChatMlSpecialTokens, setup_chat_format

__all__ = ["ChatMlSpecialTokens", "setup_chat_format"]
