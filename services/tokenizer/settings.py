"""The tokenizer service's settings (env: NLPMESH_TOKENIZER_<FIELD>)."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from meshkit.settings import ServiceSettings, default_home
from services.tokenizer.chat_tokenizer import ChatLimits

_LIMITS = ChatLimits()


class TokenizerSettings(ServiceSettings, service="tokenizer"):
    home: Path = Field(default_factory=default_home)
    # The models served, a comma list of catalogue ids (deploy/models.toml), the default first; empty =
    # every converted catalogue model, in the catalogue's order.
    models: str = ""
    max_messages: int = Field(default=_LIMITS.max_messages, gt=0)
    max_message_chars: int = Field(default=_LIMITS.max_message_chars, gt=0)
    max_chat_chars: int = Field(default=_LIMITS.max_chat_chars, gt=0)
    # The chat template's render and encode; past it, RESOURCE_EXHAUSTED (servicer.py says why a deadline, and
    # which short chats are encoded in the event loop instead).
    render_timeout_ms: float = Field(default=_LIMITS.render_timeout_ms, gt=0)

    @property
    def limits(self) -> ChatLimits:
        return ChatLimits(max_messages=self.max_messages, max_message_chars=self.max_message_chars,
                          max_chat_chars=self.max_chat_chars, render_timeout_ms=self.render_timeout_ms)
