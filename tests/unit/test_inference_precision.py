"""The perplexity guard: the default precision stays within 3% of float32 on a fixed text."""
import math
from pathlib import Path

import pytest
import torch

from meshkit.settings import default_home
from services.inference.loading import load_model
from services.inference.settings import InferenceSettings
from services.model.store import load_model_files

pytestmark = pytest.mark.model

# Openings of public-domain novels (Austen, Dickens, Melville, Tolstoy, Fitzgerald, Carroll).
TEXT = Path(__file__).resolve().parent.parent / "data" / "perplexity.txt"
MAX_RELATIVE_INCREASE = 0.03


def perplexity(dtype: str) -> float:
    model, tokenizer = load_model(load_model_files(default_home()), dtype)
    ids = tokenizer(TEXT.read_text(), return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        loss = model(input_ids=ids, labels=ids).loss.float()
    return math.exp(loss.item())


def test_the_default_precision_stays_within_three_percent_of_float32():
    default = InferenceSettings().dtype
    reference, candidate = perplexity("float32"), perplexity(default)
    increase = candidate / reference - 1
    print(f"perplexity float32 {reference:.3f}, {default} {candidate:.3f} ({100 * increase:+.2f}%)")
    assert default != "float32", "the default should be the faster precision the guard admits"
    assert increase <= MAX_RELATIVE_INCREASE
