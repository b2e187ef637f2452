"""Reads a few metadata values from the head of a GGUF stream, without the rest of the file.

A GGUF may come in chunks (the Gemma 3 package splits it in four), so this reads a stream of bytes,
not a memory-mapped file as ``gguf.GGUFReader`` does: the architecture and context length sit in
the first kilobytes, and reading stops once every key asked for was seen.
"""
from __future__ import annotations

import struct
from typing import BinaryIO

MAGIC = b"GGUF"

# GGUF value types: (struct format, size) of the fixed-size ones.
_FIXED = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
          6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_STRING = 8
_ARRAY = 9


class NotGguf(ValueError):
    """The bytes are not a GGUF file this reader understands."""


def read_gguf_metadata(stream: BinaryIO, wanted: set[str]) -> dict[str, object]:
    """The values of the ``wanted`` keys found in the metadata (missing keys are absent);
    arrays are skipped, never returned."""
    if _exactly(stream, 4) != MAGIC:
        raise NotGguf("not a GGUF file (it does not start with 'GGUF')")
    (version,) = struct.unpack("<I", _exactly(stream, 4))
    if version not in (2, 3):
        raise NotGguf(f"GGUF version {version} (this reader knows 2 and 3)")
    _tensor_count, kv_count = struct.unpack("<QQ", _exactly(stream, 16))
    found: dict[str, object] = {}
    for _ in range(kv_count):
        if wanted <= found.keys():
            break
        key = _string(stream)
        (kind,) = struct.unpack("<I", _exactly(stream, 4))
        value = _value(stream, kind)
        if key in wanted:
            found[key] = value
    return found


def _value(stream: BinaryIO, kind: int) -> object:
    if kind in _FIXED:
        fmt, size = _FIXED[kind]
        return struct.unpack(fmt, _exactly(stream, size))[0]
    if kind == _STRING:
        return _string(stream)
    if kind == _ARRAY:
        (item_kind,) = struct.unpack("<I", _exactly(stream, 4))
        (count,) = struct.unpack("<Q", _exactly(stream, 8))
        if item_kind in _FIXED:
            _exactly(stream, count * _FIXED[item_kind][1])
        else:  # strings (a tokenizer's vocabulary) or nested arrays: one by one
            for _ in range(count):
                _value(stream, item_kind)
        return None
    raise NotGguf(f"unknown GGUF value type {kind}")


def _string(stream: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", _exactly(stream, 8))
    return _exactly(stream, length).decode("utf-8", errors="replace")


def _exactly(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise NotGguf("the GGUF metadata ends early (a truncated file)")
    return data
