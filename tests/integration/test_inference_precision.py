"""The perplexity guard, and the kernels' row independence: in decode (alone or in a batch)
and in prefill (a tail after a reused prefix, or the whole prompt).

The default precision must be a faster one than float32 whose perplexity, on a
fixed text, stays within 3% of float32, for every model of the catalogue. The perplexity is measured through the
decode kernels (the float32 GEMM that prefill uses is switched off), since
those produce every generated token.
"""
import functools
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from meshkit.cpu_features import read_cpu_features
from meshkit.settings import default_home
from modelfiles.catalogue import DEFAULT_MODELS_FILE, load_catalogue
from modelfiles.convert import load_model_files
from services.inference.attention import tiled_sdpa_attention
from services.inference.decode_linear import DecodeLinear
from services.inference.kernel_checks import (
    RowDependence,
    check_row_independence,
    choose_one_tile_parts,
    choose_tile_placement,
)
from services.inference.kernel_plan import KernelPlan, kernel_plan
from services.inference.loading import load_model
from services.inference.precision import (
    FASTEST_FIRST,
    MAX_DECODE_ROWS,
    apply_fastest_precision,
    apply_precision,
    kernel_paths,
    model_precision,
)
from services.inference.settings import InferenceSettings
from services.inference.tiles import BY_POSITION, FROM_START, GEMM_TILE_ROWS
from tests.tiny_models import tiny_llama

# Openings of public-domain novels (Austen, Dickens, Melville, Tolstoy, Fitzgerald, Carroll).
TEXT = Path(__file__).resolve().parent.parent / "data" / "perplexity.txt"
MAX_RELATIVE_INCREASE = 0.03


CATALOGUE = load_catalogue(DEFAULT_MODELS_FILE)
# (model, precision) for each precision other than float32 that ``auto`` may pick for each catalogue model:
# the faster ones its entry allows.
AUTO_CHOICES = [(model.id, precision) for model in CATALOGUE.models if "auto" in model.precisions
                for precision in FASTEST_FIRST if precision != "float32" and precision in model.precisions]


def perplexity(model_id: str, dtype: str) -> float:
    model, tokenizer = load_model(load_model_files(default_home(), model_id), dtype)
    kernel_plan(model).gemm_rows = 10**9
    ids = tokenizer(TEXT.read_text(), return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        loss = model(input_ids=ids, labels=ids).loss.float()
    return math.exp(loss.item())


@functools.cache
def float32_perplexity(model_id: str) -> float:
    return perplexity(model_id, "float32")


@pytest.mark.model
@pytest.mark.parametrize(("model_id", "precision"), AUTO_CHOICES, ids=["-".join(choice) for choice in AUTO_CHOICES])
def test_every_precision_auto_may_pick_stays_within_three_percent_of_float32(model_id, precision):
    reference, candidate = float32_perplexity(model_id), perplexity(model_id, precision)
    increase = candidate / reference - 1
    print(f"{model_id}: perplexity float32 {reference:.3f}, {precision} {candidate:.3f} ({100 * increase:+.2f}%)")
    assert increase <= MAX_RELATIVE_INCREASE


def test_the_default_picks_the_fastest_precision_this_cpu_keeps_batch_independent():
    assert InferenceSettings().dtype == "auto"
    loads = []

    def load() -> nn.Module:
        loads.append(1)
        return tiny_llama()

    model = apply_fastest_precision(load, read_cpu_features())
    assert model_precision(model) != "float32", "the default should be a faster precision than float32"
    chosen = FASTEST_FIRST.index(model_precision(model))
    assert len(loads) == chosen + 1  # every faster one was tried, on a model of its own, and refused
    for faster in FASTEST_FIRST[:chosen]:
        with pytest.raises(RowDependence):
            check_row_independence(apply_precision(tiny_llama(), faster), MAX_DECODE_ROWS, read_cpu_features())


def test_auto_passes_over_a_precision_whose_kernels_depend_on_the_batch(monkeypatch):
    real = DecodeLinear.decode_rows

    def batch_dependent(self, flat):  # int4 rows change with the batch, as a CPU's kernel might
        out = real(self, flat)
        return out + flat.shape[0] - 1 if self.precision == "int4" else out

    monkeypatch.setattr(DecodeLinear, "decode_rows", batch_dependent)
    model = apply_fastest_precision(tiny_llama, read_cpu_features())
    assert model_precision(model) == "int8"
    assert model.model.layers[0].mlp.down_proj.precision == "int8"


# The model's layer shapes (SmolLM2-135M): MKL picks kernels and threading by shape.
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]


def activation_dtype(precision: str) -> torch.dtype:
    return torch.float32 if precision == "float32" else torch.bfloat16


def skip_where_refused(precision: str, model: nn.Module) -> None:
    """int4 and bfloat16 may be refused on a CPU (``auto`` then passes over them): skip there, saying why.
    int8 and float32 are what ``auto`` falls back to, so they must hold everywhere."""
    if precision in ("int4", "bfloat16"):
        try:
            check_row_independence(model, MAX_DECODE_ROWS, read_cpu_features())
        except RowDependence as refused:  # a clear refusal: the precision and this CPU named
            assert f"precision {precision} cannot" in str(refused)
            assert read_cpu_features().summary() in str(refused)
            pytest.skip(str(refused))


@pytest.mark.parametrize("precision", ["int8", "int4", "bfloat16", "float32"])
@pytest.mark.parametrize("shape", SHAPES)
def test_decode_kernels_give_a_row_the_same_bits_whatever_shares_its_batch(precision, shape):
    torch.manual_seed(0)
    model = apply_precision(nn.Sequential(nn.Linear(*shape)), precision)
    skip_where_refused(precision, model)
    layer = model[0]
    rows = torch.randn(16, shape[0]).to(activation_dtype(precision))
    with torch.inference_mode():
        alone = torch.cat([layer(rows[index : index + 1]) for index in range(16)])
        for count in range(2, 17):
            assert torch.equal(layer(rows[:count]), alone[:count]), count


@pytest.mark.parametrize("precision", ["int8", "int4", "bfloat16"])
def test_prefill_uses_float32_gemm_on_the_same_weights(precision):
    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    layer = apply_precision(nn.Sequential(linear), precision)[0]
    assert isinstance(layer, DecodeLinear)
    rows = torch.randn(40, 64).to(torch.bfloat16)  # more rows than any decode step: the GEMM path
    with torch.inference_mode():
        gemm = layer(rows).float()
        layer.plan.gemm_rows = 10**9
        kernel = layer(rows).float()
        exact = rows.float() @ linear.weight.float().T + linear.bias.float()
    # The same weights in both paths: they differ by rounding only, and both track float32.
    assert torch.allclose(gemm, kernel, atol=0.05, rtol=0.02)
    tolerance = {"bfloat16": 0.02, "int8": 0.05, "int4": 0.1}[precision]  # int4: 16 levels a group of 32
    assert (gemm - exact).abs().max() < tolerance * exact.abs().max()


@functools.cache
def placement_from_start_holds() -> bool:
    """Whether this CPU lets the engine place prefill rows from the start (the start-up check's choice
    for the real layer shapes and for the tiny model's attention)."""
    real_shapes = apply_precision(nn.Sequential(*(nn.Linear(*shape) for shape in SHAPES)), "bfloat16")
    return BY_POSITION not in (choose_tile_placement(real_shapes), choose_tile_placement(tiny_llama_in("bfloat16")))


@pytest.fixture(params=[BY_POSITION, FROM_START])
def placement(request):
    """Each way the engine may place prefill rows in tiles. Where the start-up check refuses FROM_START
    the engine never uses it, so there is nothing of it to test there."""
    if request.param == FROM_START and not placement_from_start_holds():
        pytest.skip(f"this CPU ({read_cpu_features().summary()}) gives a row other bits elsewhere in a tile: "
                    "the engine places rows by position here")
    return request.param


def tiny_llama_in(precision: str) -> nn.Module:
    return apply_precision(tiny_llama(), precision)


@pytest.mark.parametrize("precision", ["int8", "int4", "bfloat16", "float32"])
@pytest.mark.parametrize("shape", SHAPES)
def test_in_prefill_a_rows_result_does_not_depend_on_how_many_rows_come_with_it(precision, shape, placement):
    torch.manual_seed(0)
    model = apply_precision(nn.Sequential(nn.Linear(*shape)), precision)
    layer, plan = model[0], kernel_plan(model)
    plan.placement = placement
    rows = torch.randn(300, shape[0]).to(activation_dtype(precision))
    with torch.inference_mode():
        with plan.prefill(0):
            whole = layer(rows)
        for start in (1, 16, 32, 100, 160, 237, 256, 283, 297, 298, 299):  # a tail after a reused prefix
            with plan.prefill(start):
                assert torch.equal(layer(rows[start:]), whole[start:]), start
        with plan.prefill(0):  # and a shorter prompt sharing the beginning
            assert torch.equal(layer(rows[:77]), whole[:77])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_attention_gives_a_query_row_the_same_bits_whatever_the_prompts_length(dtype, placement):
    torch.manual_seed(0)
    heads, kv_heads, dim, count = 9, 3, 64, 300
    width = 304  # aligned, as services/inference/kv.py gives it
    query = torch.randn(1, heads, count, dim).to(dtype)
    key, value = (torch.randn(1, kv_heads, width, dim).to(dtype) for _ in range(2))
    mask = (torch.arange(width)[None] <= torch.arange(count)[:, None])[None, None]
    module = nn.Module()
    module.num_key_value_groups = heads // kv_heads
    plan = module.kernel_plan = KernelPlan(placement)
    with torch.inference_mode():
        with plan.prefill(0):
            whole, _ = tiled_sdpa_attention(module, query, key, value, mask, scaling=dim**-0.5)
        for start in (16, 48, 64, 112, 200, 240, 256, 272, 283, 299):
            with plan.prefill(start):
                tail, _ = tiled_sdpa_attention(module, query[:, :, start:], key, value, mask[:, :, start:],
                                               scaling=dim**-0.5)
            assert torch.equal(tail, whole[:, start:]), start
        exact = torch.nn.functional.scaled_dot_product_attention(
            query.float(), key.float().repeat_interleave(3, 1), value.float().repeat_interleave(3, 1), attn_mask=mask)
    assert torch.allclose(whole.float(), exact.transpose(1, 2), atol=0.02)


@pytest.mark.parametrize("precision", ["int8", "int4", "bfloat16", "float32"])
def test_the_start_up_check_passes_for_the_kernels_in_use_and_names_them(precision):
    model = apply_precision(nn.Sequential(*(nn.Linear(*shape) for shape in [(576, 1536), (1536, 576)])), precision)
    skip_where_refused(precision, model)
    check_row_independence(model, 8, read_cpu_features())
    assert kernel_paths(model).startswith(f"{precision}: decode ")


def test_the_start_up_check_refuses_a_decode_kernel_whose_rows_depend_on_the_batch(monkeypatch):
    model = apply_precision(nn.Sequential(nn.Linear(64, 96)), "int8")
    real = torch._weight_int8pack_mm

    def batch_dependent(x, weight, scales):  # what a kernel blocking rows together may do
        out = real(x, weight, scales)
        return out + 1e-2 if x.shape[0] > 1 else out

    monkeypatch.setattr(torch, "_weight_int8pack_mm", batch_dependent)
    with pytest.raises(RowDependence, match=r"precision int8 .* batch of 2 than alone"):
        check_row_independence(model, 8, read_cpu_features())
    assert issubclass(RowDependence, ValueError)


def test_rows_whose_bits_depend_on_their_place_in_a_tile_are_placed_by_position(monkeypatch):
    from services.inference import decode_linear as module

    model = tiny_llama_in("float32")
    real = module.tiled_gemm

    def place_dependent(x, weight, bias, tile_rows, offset, *parts):  # a kernel rounding edge rows its own way
        out = real(x, weight, bias, tile_rows, offset, *parts)
        place = (torch.arange(offset, offset + x.shape[0]) % tile_rows == tile_rows - 1).float()[:, None]
        return out + 1e-3 * place

    monkeypatch.setattr(module, "tiled_gemm", place_dependent)
    assert choose_tile_placement(model) == BY_POSITION
    check_row_independence(model, 8, read_cpu_features())  # placed by position, such a kernel is still fine


@pytest.mark.parametrize(("placement_", "tiles"), [(FROM_START, 1), (BY_POSITION, 2)])
def test_a_tail_of_one_tiles_rows_after_a_reused_prefix_costs_one_tile_placed_from_its_start(placement_, tiles):
    from services.inference.kv import SlotKV
    from services.inference.layered import ChunkForward

    model = tiny_llama_in("float32")
    kernel_plan(model).placement = placement_
    chunk = ChunkForward(model, SlotKV(model.config, 1, torch.float32), prompt=list(range(300)), start=268, end=300)
    assert chunk.cost_tokens == tiles * GEMM_TILE_ROWS


def test_a_one_tile_gemm_runs_in_parts_only_where_each_part_keeps_the_bits_of_the_whole(monkeypatch):
    from services.inference import kernel_checks, tiled_gemm

    model = tiny_llama_in("float32")
    plan = kernel_plan(model)
    assert choose_one_tile_parts(model, 1) == 1  # one thread: nothing to split over
    real_parts = tiled_gemm.one_tile_in_parts
    with monkeypatch.context() as patched:  # parts that round their own way: never split
        patched.setattr(kernel_checks, "one_tile_in_parts",
                        lambda tile, weight, parts: real_parts(tile, weight, parts) + 1e-3)
        assert choose_one_tile_parts(model, 2) == 1
    if choose_one_tile_parts(model, 2) == 1:
        pytest.skip(f"this CPU ({read_cpu_features().summary()}) gives a one-tile GEMM in parts other bits: "
                    "the engine does not split it here")
    layer = model.model.layers[0].mlp.gate_proj
    calls = []
    monkeypatch.setattr(tiled_gemm, "one_tile_in_parts", lambda *args: calls.append(args[2]) or real_parts(*args))
    x = torch.randn(3 * GEMM_TILE_ROWS, layer.in_features, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        with plan.prefill(0), plan.placement_tried(FROM_START):
            whole_one_tile, whole_three = layer(x[:GEMM_TILE_ROWS]), layer(x)
            assert calls == []
            plan.one_tile_parts = 2
            assert torch.equal(layer(x[:GEMM_TILE_ROWS]), whole_one_tile)  # in 2 parts, the same bits
            assert calls == [2]
            assert torch.equal(layer(x), whole_three)  # 3 tiles: one batched multiply, never split
            assert calls == [2]
        layer(x[:4])  # a float32 decode step: its one 16-row tile is never split
        assert calls == [2]


def test_auto_picks_among_the_precisions_the_model_allows_only():
    model = apply_fastest_precision(tiny_llama, read_cpu_features(), allowed=("auto", "int8", "float32"))
    assert model_precision(model) == "int8"  # int4, faster, is not allowed
    model = apply_fastest_precision(tiny_llama, read_cpu_features(), allowed=("float32",))
    assert model_precision(model) == "float32"
    with pytest.raises(ValueError, match="auto needs one of int4, int8, bfloat16, float32 allowed"):
        apply_fastest_precision(tiny_llama, read_cpu_features(), allowed=("auto",))


def test_auto_passes_over_int4_for_layer_shapes_it_cannot_take():
    with pytest.raises(ValueError, match="int4 needs"):
        apply_precision(nn.Sequential(nn.Linear(64, 24)), "int4")  # 24 outputs: torch packs int4 rows by 16
    model = apply_fastest_precision(lambda: nn.Sequential(nn.Linear(64, 24)), read_cpu_features())
    assert model_precision(model) == "int8"


def test_two_models_in_one_process_keep_their_own_tile_placement_and_gemm_split(monkeypatch):
    """The placement and a one-tile GEMM's parts are each model's own (its engine's): a second model set
    otherwise in the same process, as a second engine's start-up would, changes neither."""
    from services.inference import tiled_gemm
    from services.inference.kv import SlotKV
    from services.inference.layered import ChunkForward

    first, second = tiny_llama_in("float32"), tiny_llama_in("float32")
    kernel_plan(first).placement, kernel_plan(first).one_tile_parts = FROM_START, 2
    kernel_plan(second).placement, kernel_plan(second).one_tile_parts = BY_POSITION, 1
    costs = [ChunkForward(model, SlotKV(model.config, 1, torch.float32), list(range(300)), 268, 300).cost_tokens
             for model in (first, second)]
    assert costs == [GEMM_TILE_ROWS, 2 * GEMM_TILE_ROWS]  # a tail from its start, and by position
    calls = []
    real_parts = tiled_gemm.one_tile_in_parts
    monkeypatch.setattr(tiled_gemm, "one_tile_in_parts", lambda *args: calls.append(args[2]) or real_parts(*args))
    x = torch.randn(GEMM_TILE_ROWS, 64, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        for model in (first, second):
            with kernel_plan(model).prefill(0):
                model.model.layers[0].mlp.gate_proj(x)
    assert calls == [2]  # the first model's one-tile GEMM in 2 parts, the second's whole


def test_a_prefill_through_one_model_leaves_another_models_forwards_decoding(monkeypatch):
    """Whether a forward is a prefill is its own model's: on the same thread, inside another model's
    prefill, a model's linear layer still takes its decode kernel."""
    from services.inference import decode_linear

    first, second = tiny_llama_in("int8"), tiny_llama_in("int8")
    layer = second.model.layers[0].mlp.gate_proj
    gemm_rows = []
    real = decode_linear.tiled_gemm
    monkeypatch.setattr(decode_linear, "tiled_gemm", lambda x, *args: gemm_rows.append(len(x)) or real(x, *args))
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    with torch.inference_mode():
        decoded = layer.decode_rows(x)
        with kernel_plan(first).prefill(5):
            assert torch.equal(layer(x), decoded)
        assert gemm_rows == []  # the int8 decode kernel
        with kernel_plan(second).prefill(5):
            layer(x)
        assert gemm_rows == [3]  # its own prefill: the tiled float32 GEMM


def test_the_tile_placement_check_tries_the_mask_of_each_layer_type(monkeypatch):
    """A sliding-window layer's mask hides a long prompt's first keys: the check tries it too, so attention
    that rounds a row by its tile's rows only under such a mask still keeps rows placed by position."""
    from services.inference import kernel_checks
    from tests.tiny_models import tiny_model

    unpatched = choose_tile_placement(apply_precision(tiny_model("llama"), "float32"))
    real = kernel_checks.prefill_attention

    def odd_tiles_round_windowed_rows_their_own_way(query, key, value, mask, offset, *args):
        out = real(query, key, value, mask, offset, *args)
        windowed = not bool(mask[..., 0].all())  # some row's first keys hidden
        return out + 1e-3 * (query.shape[2] % 2) if windowed else out

    monkeypatch.setattr(kernel_checks, "prefill_attention", odd_tiles_round_windowed_rows_their_own_way)
    assert choose_tile_placement(apply_precision(tiny_model("gemma3"), "float32")) == BY_POSITION
    assert choose_tile_placement(apply_precision(tiny_model("llama"), "float32")) == unpatched  # causal only
