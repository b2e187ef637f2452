"""The perplexity guard and the decode kernels' batch invariance.

The default precision must be a faster one than float32 whose perplexity, on a
fixed text, stays within 3% of float32. The perplexity is measured through the
decode kernels (the float32 GEMM that prefill uses is switched off), since
those produce every generated token.
"""
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from meshkit.settings import default_home
from modelfiles.convert import load_model_files
from services.inference.loading import load_model
from services.inference.precision import DecodeLinear, apply_precision, prefill_phase, set_gemm_rows
from services.inference.settings import InferenceSettings

# Openings of public-domain novels (Austen, Dickens, Melville, Tolstoy, Fitzgerald, Carroll).
TEXT = Path(__file__).resolve().parent.parent / "data" / "perplexity.txt"
MAX_RELATIVE_INCREASE = 0.03


def perplexity(dtype: str) -> float:
    model, tokenizer = load_model(load_model_files(default_home()), dtype)
    set_gemm_rows(model, 10**9)
    ids = tokenizer(TEXT.read_text(), return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        loss = model(input_ids=ids, labels=ids).loss.float()
    return math.exp(loss.item())


@pytest.mark.model
def test_the_default_precision_stays_within_three_percent_of_float32():
    default = InferenceSettings().dtype
    reference, candidate = perplexity("float32"), perplexity(default)
    increase = candidate / reference - 1
    print(f"perplexity float32 {reference:.3f}, {default} {candidate:.3f} ({100 * increase:+.2f}%)")
    assert default != "float32", "the default should be the faster precision the guard admits"
    assert increase <= MAX_RELATIVE_INCREASE


@pytest.mark.parametrize("precision", ["int8", "bfloat16"])
def test_decode_kernels_give_a_row_the_same_bits_whatever_shares_its_batch(precision):
    torch.manual_seed(0)
    model = apply_precision(nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 32)), precision)
    rows = torch.randn(8, 64).to(torch.bfloat16)
    with torch.inference_mode():
        together = model(rows)
        alone = torch.cat([model(rows[index : index + 1]) for index in range(8)])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("precision", ["int8", "bfloat16"])
def test_prefill_uses_float32_gemm_on_the_same_weights(precision):
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    layer = apply_precision(nn.Sequential(linear), precision)[0]
    assert isinstance(layer, DecodeLinear)
    rows = torch.randn(40, 64).to(torch.bfloat16)  # more rows than any decode step: the GEMM path
    with torch.inference_mode():
        gemm = layer(rows).float()
        set_gemm_rows(layer, 10**9)
        kernel = layer(rows).float()
        exact = rows.float() @ linear.weight.float().T + linear.bias.float()
    # The same weights in both paths: they differ by rounding only, and both track float32.
    assert torch.allclose(gemm, kernel, atol=0.05, rtol=0.02)
    tolerance = 0.02 if precision == "bfloat16" else 0.05
    assert (gemm - exact).abs().max() < tolerance * exact.abs().max()


@pytest.mark.parametrize("precision", ["int8", "bfloat16"])
def test_in_prefill_a_rows_result_does_not_depend_on_how_many_rows_come_with_it(precision):
    torch.manual_seed(0)
    layer = apply_precision(nn.Sequential(nn.Linear(64, 96)), precision)[0]
    rows = torch.randn(300, 64).to(torch.bfloat16)
    with torch.inference_mode(), prefill_phase():
        whole = layer(rows)
        for count in (1, 2, 3, 17, 44, 299):  # a tail after a reused prefix, of any length
            assert torch.equal(layer(rows[-count:]), whole[-count:]), count
