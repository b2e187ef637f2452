"""Reads a few metadata values from the head of a GGUF stream, without the rest of the file.

A GGUF may come in chunks (the Gemma 3 package splits it in four), so this reads a stream of bytes,
not a memory-mapped file as ``gguf.GGUFReader`` does: the architecture and context length sit in
the first kilobytes, and reading stops once every key asked for was seen.
"""
from __future__ import annotations

import struct
from typing import BinaryIO

from gguf.constants import GGUFValueType

MAGIC = b"GGUF"

# The fixed-size value types (the gguf package's own numbering): their struct formats.
_FIXED = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
          GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
          GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
          GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}


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
        fmt = _FIXED[kind]
        return struct.unpack(fmt, _exactly(stream, struct.calcsize(fmt)))[0]
    if kind == GGUFValueType.STRING:
        return _string(stream)
    if kind == GGUFValueType.ARRAY:
        (item_kind,) = struct.unpack("<I", _exactly(stream, 4))
        (count,) = struct.unpack("<Q", _exactly(stream, 8))
        if item_kind in _FIXED:
            _exactly(stream, count * struct.calcsize(_FIXED[item_kind]))
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
