"""The tiny Llama's names, kept for the tests that import them from here: tests/tiny_models.py builds
tiny models of every family the engine runs."""
from tests.tiny_models import EOS_ID, VOCAB_SIZE, greedy_text, real_tokenizer, tiny_engine, tiny_llama

__all__ = ["EOS_ID", "VOCAB_SIZE", "greedy_text", "real_tokenizer", "tiny_engine", "tiny_llama"]
