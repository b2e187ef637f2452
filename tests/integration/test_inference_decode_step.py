"""The engine's decode step (services/inference/decode_step.py) gives the very logits of the model's forward,
for a tiny model of every family it runs."""
import pytest
import torch
from torch import nn

from meshkit.settings import default_home
from modelfiles.catalogue import DEFAULT_MODELS_FILE, load_catalogue
from modelfiles.convert import load_model_files
from services.inference.decode_linear import DecodeKernel
from services.inference.decode_step import decode_step_for
from services.inference.families import family_of
from services.inference.joined_linear import JoinedLinear
from services.inference.kv import SlotKV
from services.inference.layered import ChunkForward
from services.inference.loading import load_model
from services.inference.precision import apply_precision
from tests.tiny_models import FAMILIES, tiny_llama, tiny_model


def compare(model: nn.Module, lengths: list[int]) -> None:
    """Fills KV rows with a prefill of random tokens, then one decode step both ways on the same rows."""
    step = decode_step_for(model)
    assert step is not None
    family = family_of(model.config)
    dtype = model.get_input_embeddings().weight.dtype
    generator = torch.Generator().manual_seed(len(lengths))
    kv = SlotKV(model.config, len(lengths), dtype)
    vocab = model.config.vocab_size
    with torch.inference_mode():
        for row, length in enumerate(lengths):
            kv.allocate(row)
            positions, masks = kv.prefill(row, 0, length)
            model(input_ids=torch.randint(0, vocab, (1, length), generator=generator), position_ids=positions,
                  attention_mask=family.model_mask(masks), cache=kv, use_cache=True, logits_to_keep=1)
            kv.mark_ready(row)
        ids = torch.randint(0, vocab, (len(lengths), 1), generator=generator)
        positions, masks = kv.decode(lengths)
        expected = model(input_ids=ids, position_ids=positions, attention_mask=family.model_mask(masks), cache=kv,
                         use_cache=True, logits_to_keep=1).logits
        positions, masks = kv.decode(lengths)  # the same token written again at the same columns
        got = step.forward(ids, positions, masks, kv)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


def compare_prefill(model: nn.Module, length: int, starts: list[int]) -> None:
    """A prompt prefilled in chunks through the model's layers and through ``decoder_layer``: the same
    KV and last logits, bit for bit."""
    dtype = model.get_input_embeddings().weight.dtype
    prompt = torch.randint(0, model.config.vocab_size, (length,), generator=torch.Generator().manual_seed(1)).tolist()
    results = []
    with torch.inference_mode():
        for unwrapped in (False, True):
            kv = SlotKV(model.config, 1, dtype)
            kv.allocate(0)
            for start, end in zip(starts, starts[1:] + [length]):
                chunk = ChunkForward(model, kv, prompt, start, end, unwrapped=unwrapped)
                logits = chunk.run(0, chunk.layer_count)
            results.append((kv.read(0, 0, length), logits))
    (kv_wrapped, logits_wrapped), (kv_unwrapped, logits_unwrapped) = results
    assert torch.equal(kv_unwrapped, kv_wrapped)
    assert torch.equal(logits_unwrapped, logits_wrapped)


@pytest.mark.parametrize("precision", ["int8", "int4", "bfloat16", "float32"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_prefill_through_the_unwrapped_layers_leaves_the_kv_and_logits_of_the_models_layers(family, precision):
    model = apply_precision(tiny_model(family), precision).eval()
    compare_prefill(model, 75, [0, 32, 64])
    compare_prefill(model, 40, [0])


@pytest.mark.parametrize("precision", ["int8", "int4", "bfloat16", "float32"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_decode_step_gives_the_models_own_logits_bit_for_bit(family, precision):
    model = apply_precision(tiny_model(family), precision).eval()
    compare(model, [5])
    compare(model, [3, 17, 40])


@pytest.mark.parametrize("family", FAMILIES)
def test_a_model_whose_linear_layers_are_not_the_engines_keeps_its_own_forward(family):
    assert decode_step_for(tiny_model(family)) is None  # plain nn.Linear: the model's forward
    assert decode_step_for(nn.Sequential(nn.Linear(4, 4))) is None


@pytest.mark.model
@pytest.mark.parametrize("model_id", load_catalogue(DEFAULT_MODELS_FILE).ids)
def test_on_each_real_model_the_decode_step_gives_the_models_own_logits_bit_for_bit(model_id):
    model, _ = load_model(load_model_files(default_home(), model_id), "int8")
    compare(model, [30])
    compare(model, [12, 40, 7, 100, 64, 33, 90, 18])
    compare(model, [700, 20])  # past Gemma 3's 512-token sliding window
    compare_prefill(model, 300, [0, 128, 268])


@pytest.mark.parametrize("final", [True, False])
def test_a_prefills_last_layer_computes_the_last_rows_output_only_and_nothing_before_the_prompts_last_chunk(final):
    model = apply_precision(tiny_llama(), "int8").eval()
    rows_into = {}
    for index, layer in enumerate(model.model.layers):
        layer.mlp.down_proj.register_forward_hook(
            lambda module, args, output, index=index: rows_into.setdefault(index, []).append(args[0].shape[1]))
    prompt = list(range(5, 75))
    end = len(prompt) if final else 64
    kv = SlotKV(model.config, 1, torch.bfloat16)
    kv.allocate(0)
    with torch.inference_mode():
        chunk = ChunkForward(model, kv, prompt, 32, end, unwrapped=True)
        logits = chunk.run(0, chunk.layer_count)
    assert rows_into[0] == [end - 32]
    assert rows_into.get(chunk.layer_count - 1) == ([1] if final else None)
    assert (logits is not None) == final


@pytest.mark.parametrize("family", FAMILIES)
def test_projections_are_joined_only_where_the_joined_kernel_keeps_each_ones_bits(family, monkeypatch):
    assert decode_step_for(apply_precision(tiny_model(family), "float32").eval())._joined is None  # tiled GEMM
    assert decode_step_for(apply_precision(tiny_model(family), "int8").eval())._joined is not None  # row by row
    real = DecodeKernel.decode_rows

    def joined_rounds_its_own_way(self, flat):
        out = real(self, flat)
        return out + 1e-2 if isinstance(self, JoinedLinear) else out

    monkeypatch.setattr(DecodeKernel, "decode_rows", joined_rounds_its_own_way)
    model = apply_precision(tiny_model(family), "int8").eval()
    assert decode_step_for(model)._joined is None
    compare(model, [3, 17, 40])  # the per-projection path: still the model's own logits
