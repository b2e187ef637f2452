"""Prompts prefilled together in one packed forward (services/inference/layered.py ``PackedForward``) get the
very KV and logits of each prefilled alone, for a tiny model of every family in every precision, on either
tile placement, and on each real model."""
import pytest
import torch

from meshkit.settings import default_home
from modelfiles.catalogue import DEFAULT_MODELS_FILE, load_catalogue
from modelfiles.convert import load_model_files
from services.inference.kernel_plan import kernel_plan
from services.inference.kv import SlotKV
from services.inference.layered import ChunkForward, PackedForward
from services.inference.loading import load_model
from services.inference.precision import apply_precision
from services.inference.tiles import BY_POSITION, FROM_START, PLACEMENTS
from tests.tiny_models import FAMILIES, tiny_model

# (prompt length, chunk start, chunk end): whole short prompts, a prompt's later chunk, a tail after a prefix
CHUNKS = [(41, 0, 41), (75, 32, 64), (9, 0, 9), (70, 64, 70), (100, 37, 100)]


def prompts(model, lengths: list[int]) -> list[list[int]]:
    generator = torch.Generator().manual_seed(sum(lengths))
    return [torch.randint(0, model.config.vocab_size, (n,), generator=generator).tolist() for n in lengths]


def alone_and_packed(model, chunks: list[tuple[int, int, int]], layers_per_run: int | None = None):
    """Each chunk's KV (up to its end) and logits, prefilled alone and packed together; the tokens before a
    chunk's start are put in its row by a prefill of them alone first, in both cases."""
    dtype = model.get_input_embeddings().weight.dtype
    texts = prompts(model, [total for total, _, _ in chunks])
    results = []
    with torch.inference_mode():
        for packed in (False, True):
            kv = SlotKV(model.config, len(chunks), dtype)
            rows = [kv.allocate(index) for index in range(len(chunks))]
            for row, text, (_, start, _) in zip(rows, texts, chunks):
                if start:
                    before = ChunkForward(model, kv, text, 0, start, unwrapped=True)
                    before.run(row, before.layer_count)
            forwards = [ChunkForward(model, kv, text, start, end, unwrapped=True)
                        for text, (_, start, end) in zip(texts, chunks)]
            if packed:
                forward = PackedForward(model, kv, forwards)
                step = layers_per_run or forward.layer_count
                logits = [None] * len(chunks)
                while not forward.done:
                    logits = forward.run(rows, step)
            else:
                logits = [chunk.run(row, chunk.layer_count) for chunk, row in zip(forwards, rows)]
            kvs = [kv.read(row, 0, end) for row, (_, _, end) in zip(rows, chunks)]
            results.append((kvs, logits))
    return results


def assert_same(results) -> None:
    (kv_alone, logits_alone), (kv_packed, logits_packed) = results
    for index, (one, other) in enumerate(zip(kv_alone, kv_packed)):
        assert torch.equal(one, other), f"chunk {index}: KV differs"
    for index, (one, other) in enumerate(zip(logits_alone, logits_packed)):
        assert (one is None) == (other is None), f"chunk {index}"
        assert one is None or torch.equal(one, other), f"chunk {index}: logits differ"


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("precision", ["int8", "int4", "bfloat16", "float32"])
@pytest.mark.parametrize("family", FAMILIES)
def test_chunks_prefilled_together_get_the_kv_and_logits_of_each_alone(family, precision, placement):
    model = apply_precision(tiny_model(family), precision).eval()
    with kernel_plan(model).placement_tried(placement):
        assert_same(alone_and_packed(model, CHUNKS))


def test_a_packed_forward_run_a_few_layers_a_turn_gets_the_bits_of_one_run():
    model = apply_precision(tiny_model(FAMILIES[0]), "int8").eval()
    assert_same(alone_and_packed(model, CHUNKS[:3], layers_per_run=1))


@pytest.mark.parametrize(("placement", "cost"), [(BY_POSITION, 96), (FROM_START, 64)])
def test_a_packed_forward_costs_its_chunks_own_tiles_by_position_and_shared_tiles_from_the_start(placement, cost):
    model = apply_precision(tiny_model(FAMILIES[0]), "int8").eval()
    kv = SlotKV(model.config, 2, torch.bfloat16)
    text = list(range(5, 105))
    chunks = [ChunkForward(model, kv, text, 0, 41, unwrapped=True), ChunkForward(model, kv, text, 0, 9, unwrapped=True)]
    with kernel_plan(model).placement_tried(placement):
        assert PackedForward(model, kv, chunks).cost_tokens == cost  # 41 + 9 tokens: 2 + 1 tiles, or 2 shared


@pytest.mark.model
@pytest.mark.parametrize("model_id", load_catalogue(DEFAULT_MODELS_FILE).ids)
def test_on_each_real_model_prompts_prefilled_together_get_the_bits_of_each_alone(model_id):
    model, _ = load_model(load_model_files(default_home(), model_id), "int8")
    assert_same(alone_and_packed(model, CHUNKS + [(600, 0, 600)]))  # past Gemma 3's 512-token window
