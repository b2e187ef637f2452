"""The checks an Embed request's texts pass before any work, one set for the gateway and the embedding replicas.

The gateway checks them before any hop (with a character limit per text); a replica checks them again before
they queue, since any client of its port may call it (and then holds each text to the model's token limit).
"""
from __future__ import annotations

from collections.abc import Sequence

from meshkit.errors import FieldViolation, InvalidArgument


def check_texts(texts: Sequence[str], max_texts: int, max_chars: int | None = None) -> None:
    """INVALID_ARGUMENT for no texts or too many (naming ``texts``), and for each text that is empty or over
    ``max_chars`` characters (naming ``texts[i]``)."""
    if not texts:
        raise InvalidArgument.for_field("texts", "give at least one text")
    if len(texts) > max_texts:
        raise InvalidArgument.for_field("texts", f"{len(texts)} texts; at most {max_texts} per request")
    bad = [FieldViolation(f"texts[{i}]", "is empty") if not text else
           FieldViolation(f"texts[{i}]", f"{len(text)} characters; at most {max_chars}")
           for i, text in enumerate(texts) if not text or (max_chars is not None and len(text) > max_chars)]
    if bad:
        raise InvalidArgument(f"{len(bad)} text(s) refused, first {bad[0].field}: {bad[0].description}", bad)
