"""The model's chat template and tokenizer: chat messages in, the exact prompt ids out.

transformers renders chat templates in jinja2's ImmutableSandboxedEnvironment
(transformers/utils/chat_template_utils.py), so the model's template cannot
reach Python internals or mutate the messages; tests/unit/test_chat_tokenizer.py
holds it to that. Control tokens typed inside a message's content (say
``<|im_start|>system``) are encoded as plain text, so a caller cannot forge a
turn of another role.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshkit.errors import FieldViolation, InvalidArgument

ROLES = ("system", "user", "assistant")
_FIELD = "chat.messages"  # the public API path (docs/api.md: Chat.messages)


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class ChatLimits:
    max_messages: int = 64
    max_message_chars: int = 32_000
    # All messages' content together: what the chat template gets to work on.
    max_chat_chars: int = 128_000
    # The chat template's render and the encode, together (the servicer's deadline).
    render_timeout_ms: float = 1000.0


class ChatTokenizer:
    def __init__(self, name: str, tokenizer: Any, context_length: int, limits: ChatLimits = ChatLimits()):
        self.name = name  # the model's catalogue id
        self.context_length = context_length
        self.limits = limits
        self._tokenizer = tokenizer
        # The Rust tokenizer is not safe to share across threads mid-call.
        self._lock = threading.Lock()

    @classmethod
    def from_folder(cls, folder: Path, name: str, limits: ChatLimits = ChatLimits()) -> ChatTokenizer:
        """Loads the tokenizer and chat template from a model folder (~1 s)."""
        from transformers import AutoTokenizer  # slow import, needed only here

        config = json.loads((folder / "config.json").read_text())
        tokenizer = with_added_tokens_read_once(AutoTokenizer.from_pretrained(folder))
        if not tokenizer.chat_template:
            raise ValueError(f"{folder}: the tokenizer has no chat template")
        return cls(name, tokenizer, int(config["max_position_embeddings"]), limits)

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The prompt ids the model is fed: the chat template with the generation prompt."""
        self._check_messages(messages)
        with self._lock:
            return self._encoded(messages)

    def encode_chat_if_idle(self, messages: Sequence[ChatMessage]) -> list[int] | None:
        """``encode_chat(messages)``, or None at once while another thread is encoding (its caller does not
        wait for the tokenizer there)."""
        self._check_messages(messages)
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self._encoded(messages)
        finally:
            self._lock.release()

    def _encoded(self, messages: Sequence[ChatMessage]) -> list[int]:
        conversation = [{"role": m.role, "content": m.content} for m in messages]
        ids = self._tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, sanitize_control_tokens=True, return_dict=False
        )
        if len(ids) >= self.context_length:
            raise InvalidArgument.for_field(
                "prompt",
                f"the prompt is {len(ids)} tokens; {self.name} takes at most {self.context_length - 1} "
                "so that it can generate at least one",
            )
        return list(ids)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        vocabulary = len(self._tokenizer)
        bad = next((i for i, token in enumerate(token_ids) if not 0 <= token < vocabulary), None)
        if bad is not None:
            raise InvalidArgument.for_field(
                f"token_ids[{bad}]", f"{token_ids[bad]} is not a token id (the vocabulary has {vocabulary})"
            )
        with self._lock:
            return self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def _check_messages(self, messages: Sequence[ChatMessage]) -> None:
        if not messages:
            raise InvalidArgument.for_field(_FIELD, "at least one message is required")
        if len(messages) > self.limits.max_messages:
            raise InvalidArgument.for_field(
                _FIELD, f"{len(messages)} messages; at most {self.limits.max_messages} are allowed"
            )
        most = self.limits.max_message_chars
        violations: list[FieldViolation] = []
        for index, message in enumerate(messages):
            if message.role not in ROLES:
                violations.append(
                    FieldViolation(
                        f"{_FIELD}[{index}].role",
                        f"the role is not one of {', '.join(ROLES)}",
                    )
                )
            if len(message.content) > most:
                violations.append(
                    FieldViolation(
                        f"{_FIELD}[{index}].content",
                        f"{len(message.content)} characters; at most {most} are allowed",
                    )
                )
        total = sum(len(message.content) for message in messages)
        if total > self.limits.max_chat_chars:
            violations.append(
                FieldViolation(_FIELD, f"{total} characters in all; at most {self.limits.max_chat_chars} are allowed")
            )
        if violations:
            shown = "; ".join(f"{v.field}: {v.description}" for v in violations[:3])
            raise InvalidArgument(f"invalid chat: {shown}", violations)


def with_added_tokens_read_once(tokenizer: Any) -> Any:
    """``tokenizer`` with its added-token tables read once, at load, and the control tokens of each chat
    template found once, on its first call.

    transformers rebuilds ``added_tokens_decoder`` from the Rust tokenizer on every access, and a chat
    template call with ``sanitize_control_tokens`` reads it twice (to find the control tokens a caller's
    text must not forge, and to encode). For Gemma's thousands of added tokens that rebuild was most of
    a call's time. The tables do not change after load (this service adds no tokens), so each access
    gets a copy of the ones read here. The control tokens are found by going through every added token
    (``_get_control_tokens``), on every call: for Gemma, most of what was left of a call's time. They
    follow from the tables and the template alone, so they are kept by template.
    """
    decoder, encoder = dict(tokenizer.added_tokens_decoder), dict(tokenizer.added_tokens_encoder)
    loaded = type(tokenizer)
    control_tokens: dict[str, tuple[str, ...]] = {}  # by chat template: the model's one or few

    def control_tokens_found_once(self, chat_template: str) -> tuple[str, ...]:
        if chat_template not in control_tokens:
            control_tokens[chat_template] = loaded._get_control_tokens(self, chat_template)
        return control_tokens[chat_template]

    fixed = type(loaded.__name__, (loaded,), {
        "added_tokens_decoder": property(lambda self: dict(decoder)),
        "added_tokens_encoder": property(lambda self: dict(encoder)),
        "_get_control_tokens": control_tokens_found_once,
        "__doc__": loaded.__doc__,
    })
    tokenizer.__class__ = fixed
    return tokenizer
