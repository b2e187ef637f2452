"""Which model architectures nlpmesh can convert, and which its built-in engine runs.

Two lists on purpose: a model is converted and listed as soon as transformers reads it and a real
one is tested, and served by the built-in engine once the engine knows its layout
(services/inference/families.py: Llama, Qwen2, Qwen3 and Gemma 3, each checked bit for bit against
transformers on a tiny model, Llama and Gemma 3 on the real catalogue models too). Each refusal is one
line naming the model, the architecture found and the ones supported.
"""
from __future__ import annotations

# Architectures (families, as modelfiles.sources.family names them) that conversion accepts:
# transformers 5 reads their GGUF and Hugging Face folders, and a real model of each is tested.
CONVERTIBLE = ("llama", "gemma3")
# Architectures whose layout the built-in engine knows (services/inference/families.py holds each one's rule).
BUILT_IN_ENGINE = ("llama", "gemma3", "qwen2", "qwen3")


class UnsupportedArchitecture(ValueError):
    """A model of an architecture nlpmesh cannot convert, or that the built-in engine cannot run."""


def check_convertible(model_id: str, architecture: str) -> None:
    if architecture not in CONVERTIBLE:
        raise UnsupportedArchitecture(f"model {model_id}: architecture {architecture!r} is not supported; "
                                      f"supported: {', '.join(CONVERTIBLE)}")


def engine_supports(architecture: str) -> bool:
    """Whether the built-in engine runs models of ``architecture``."""
    return architecture in BUILT_IN_ENGINE


def check_engine_supports(model_id: str, architecture: str) -> None:
    """Refuses, at inference start, a model the built-in engine cannot run."""
    if not engine_supports(architecture):
        raise UnsupportedArchitecture(f"model {model_id}: the built-in engine does not run architecture "
                                      f"{architecture!r}; it runs: {', '.join(BUILT_IN_ENGINE)}")
