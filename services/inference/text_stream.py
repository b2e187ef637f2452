"""Generated token ids to text that is safe to stream.

Two things make streaming text harder than decoding at the end:
- a character can span tokens (byte-level BPE splits emoji and CJK into byte
  pieces), so a token may add half a character: nothing is emitted until the
  character is whole (``tokenizers.decoders.DecodeStream`` returns None then);
- a stop sequence can span tokens, and its text must never reach the caller: any
  tail of the text that could still grow into a stop sequence is held back until
  it either completes one (generation stops, the text is cut before it) or can't.

The pieces joined equal ``tokenizer.decode(ids, skip_special_tokens=True)``,
cut before the first stop sequence.
"""
from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class TextStream:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...] = ()):
        self._tokenizer = tokenizer
        self._decoder = DecodeStream(skip_special_tokens=True)
        self._stop = tuple(stop)
        self._ids: list[int] = []
        self._decoded = ""  # everything the decoder has produced so far
        self._held = ""  # decoded but not yet released: could start a stop sequence
        self.stopped = False  # a stop sequence was found; the stream is over

    def push(self, token_id: int) -> str:
        """Adds one generated token; returns the text now safe to emit (maybe "")."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        piece = self._decoder.step(self._tokenizer, token_id)
        if piece is None:  # an incomplete character: wait for the next token
            return ""
        self._decoded += piece
        return self._release(piece, final=False)

    def finish(self) -> str:
        """The text still held back, once generation has ended for another reason."""
        if self.stopped:
            return ""
        # Bytes that never became a character are flushed as the full decode has them.
        full = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        tail = full[len(self._decoded) :] if full.startswith(self._decoded) else ""
        self._decoded += tail
        return self._release(tail, final=True)

    def _release(self, piece: str, final: bool) -> str:
        text = self._held + piece
        cut = first_stop_at(text, self._stop)
        if cut is not None:
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = 0 if final else stop_prefix_length(text, self._stop)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]


def first_stop_at(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the earliest stop sequence in ``text`` begins, or None."""
    found = [at for at in (text.find(s) for s in stop) if at >= 0]
    return min(found) if found else None


def stop_prefix_length(text: str, stop: tuple[str, ...]) -> int:
    """The length of the longest tail of ``text`` that a stop sequence starts with."""
    longest = 0
    for s in stop:
        for size in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:size]):
                longest = size
                break
    return longest
