"""Incremental detokenization and stop-sequence holding, with the real SmolLM2 tokenizer."""
import pytest

from services.inference.text_stream import TextStream, first_stop_at, stop_prefix_length
from tests.tiny_llama import real_tokenizer


def backend():
    return real_tokenizer().backend_tokenizer


def stream_pieces(ids, stop=()):
    stream = TextStream(backend(), stop)
    pieces = [stream.push(token) for token in ids]
    pieces.append(stream.finish())
    return pieces, stream


def full_decode(ids):
    return real_tokenizer().decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", ["日本語のテキスト 🎉👍", "ça va? 🤗 naïve café", "emoji only: 🤗🤗🤗"])
def test_multibyte_characters_split_across_tokens_are_never_emitted_in_halves(text):
    ids = real_tokenizer().encode(text)
    pieces, _ = stream_pieces(ids)
    assert len(ids) > len(text.split())  # byte-level pieces: some tokens hold half a character
    assert "" in pieces[:-1]  # ... and those emitted nothing until the character was whole
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == text == full_decode(ids)


def test_special_tokens_are_skipped():
    tokenizer = real_tokenizer()
    ids = [1] + tokenizer.encode("hi there") + [2, 0]
    pieces, _ = stream_pieces(ids)
    assert "".join(pieces) == "hi there" == full_decode(ids)


def test_arbitrary_token_sequences_join_to_the_full_decode():
    # Byte pieces in any order, as a random model emits them; an unfinished
    # character at the end is flushed as the full decode renders it.
    ids = [15107, 114, 81, 23274, 251, 10391, 19556, 15107, 114, 241, 10813]
    pieces, _ = stream_pieces(ids)
    assert "".join(pieces) == full_decode(ids)
    assert pieces[-1] == "\ufffd"  # the trailing lone lead bytes, only at the end


def test_a_stop_sequence_spanning_two_tokens_cuts_the_text_before_it():
    ids = real_tokenizer().encode("Hello world, how are you?")  # Hello| world|,| how...
    pieces, stream = stream_pieces(ids, stop=("lo wor",))
    assert stream.stopped
    assert "".join(pieces) == "Hel"


def test_text_that_could_start_a_stop_sequence_is_held_then_released():
    ids = real_tokenizer().encode("Hello world, how are you?")
    stream = TextStream(backend(), ("world peace",))
    assert stream.push(ids[0]) == "Hello"
    assert stream.push(ids[1]) == " "  # "world" might begin "world peace": held
    assert stream.push(ids[2]) == "world,"  # it did not: released with what followed
    rest = "".join(stream.push(token) for token in ids[3:]) + stream.finish()
    assert not stream.stopped
    assert "Hello world," + rest == "Hello world, how are you?"


def test_held_text_is_flushed_when_generation_ends_for_another_reason():
    ids = real_tokenizer().encode("Hello world")
    pieces, stream = stream_pieces(ids, stop=("world peace",))
    assert pieces[-1] == "world"
    assert "".join(pieces) == "Hello world" and not stream.stopped


def test_the_earliest_of_several_stop_sequences_wins_and_nothing_follows_it():
    ids = real_tokenizer().encode("Hello world, how are you?")
    pieces, stream = stream_pieces(ids, stop=("are", ", how"))
    assert "".join(pieces) == "Hello world"
    assert stream.stopped and stream.push(ids[0]) == "" and stream.finish() == ""


def test_a_stop_sequence_at_the_very_start_yields_no_text():
    ids = real_tokenizer().encode("Hello world")
    pieces, stream = stream_pieces(ids, stop=("Hello",))
    assert stream.stopped and "".join(pieces) == ""


def test_stop_prefix_length_finds_the_longest_possible_start():
    assert stop_prefix_length("abc wor", ("world",)) == 3
    assert stop_prefix_length("abc w", ("world", " wx")) == 2
    assert stop_prefix_length("abc", ("world",)) == 0
    assert stop_prefix_length("abc world", ("world",)) == 0  # complete: found by first_stop_at instead
    assert first_stop_at("abc world, or", ("or", "world")) == 4
    assert first_stop_at("abc", ("x",)) is None
