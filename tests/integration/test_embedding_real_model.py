"""The embedding service's encoder on the real all-MiniLM-L6-v2 folder (make setup unpacks it), against
sentence-transformers on the same folder, in float32 and bfloat16: vectors within cosine 0.999, a text's vector the same alone or in a
batch of others (padding does not leak), the lean BERT forward (services/embedding/bert.py) equal to the model's own,
and the token limit the folder declares."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from meshkit.settings import default_home
from services.embedding.bert import BertStack
from services.embedding.encoder import SentenceEncoder, TextTooLong

pytestmark = [pytest.mark.model]

FOLDER = default_home() / "models" / "minilm"
TEXTS = [
    "Where is my order 48213? It was due last Tuesday.",
    "hello",
    "The patient reports mild chest pain after exercise; no history of cardiac events. " * 4,
    "Was ist ein Anleihe-Kupon? Erklären Sie es einfach.",
    "¿Dónde está mi pedido?",
    "A bond pays a fixed coupon until it matures; its price moves against interest rates.",
    "🙂 emoji and symbols: €, ©, ∑",
    "x",
] * 5  # 40 texts: more than one forward of 32


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def encoder(request):
    """Both precisions on every machine (bfloat16 runs emulated, slower, where the CPU lacks it: still right)."""
    if not (FOLDER / "modules.json").is_file():
        pytest.fail(f"{FOLDER} is missing: run `make setup` (python -m modelfiles convert --model minilm)")
    return SentenceEncoder(FOLDER, max_batch_texts=32, precision=request.param)


def test_vectors_match_sentence_transformers(encoder):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(FOLDER), device="cpu").encode(TEXTS, batch_size=32)
    ours = encoder.embed(encoder.tokenize(TEXTS)).numpy()
    cosine = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    assert ours.shape == (len(TEXTS), 384)
    assert cosine.min() >= 0.999, cosine.min()
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # the folder's Normalize module


def test_a_text_embeds_the_same_alone_and_beside_longer_ones(encoder):
    ids = encoder.tokenize(TEXTS[:8])
    together = encoder.embed(ids).numpy()
    for index, one in enumerate(ids):
        alone = encoder.embed([one]).numpy()[0]
        assert float(alone @ together[index]) >= (0.99999 if encoder.precision == "float32" else 0.9999), index


def test_the_bert_stack_gives_the_models_own_hidden_states(encoder):
    """BertStack (the path the encoder takes for this folder) against BertModel.forward, on a padded batch and on
    one text alone (no mask): within the precision's rounding at every text token."""
    assert encoder.forward_path == "BertStack"
    model = encoder._model
    ids = encoder.tokenize(TEXTS[:8])
    longest = max(len(one) for one in ids)
    input_ids = torch.zeros(len(ids), longest, dtype=torch.long)
    mask = torch.zeros(len(ids), longest, dtype=torch.long)
    for row, one in enumerate(ids):
        input_ids[row, :len(one)], mask[row, :len(one)] = torch.tensor(one), 1
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if encoder.precision == "float32" else {"atol": 2e-2, "rtol": 2e-2}
    with torch.inference_mode():
        theirs = model(input_ids=input_ids, attention_mask=mask, token_type_ids=torch.zeros_like(input_ids))
        ours = BertStack(model)(input_ids, mask)
        words = mask.bool()
        torch.testing.assert_close(ours[words].float(), theirs.last_hidden_state[words].float(), **tolerance)
        alone = torch.tensor([ids[0]])
        theirs_alone = model(input_ids=alone, attention_mask=torch.ones_like(alone),
                             token_type_ids=torch.zeros_like(alone)).last_hidden_state
        torch.testing.assert_close(BertStack(model)(alone, None).float(), theirs_alone.float(), **tolerance)


def test_auto_takes_bfloat16_only_where_the_cpu_multiplies_it():
    from meshkit.cpu_features import CpuFeatures
    from services.embedding.encoder import resolve_precision

    assert resolve_precision("auto", CpuFeatures("AVX2", frozenset({"avx2"}))) == "float32"
    assert resolve_precision("auto", CpuFeatures("AVX512", frozenset({"avx512f", "amx_bf16"}))) == "bfloat16"
    assert resolve_precision("auto", CpuFeatures("AVX512", frozenset({"avx512f", "avx512_bf16"}))) == "bfloat16"
    assert resolve_precision("float32", CpuFeatures("AVX512", frozenset({"amx_bf16"}))) == "float32"
    with pytest.raises(ValueError):
        resolve_precision("int8", CpuFeatures("AVX2", frozenset()))


def test_the_token_limit_is_the_folders_and_names_each_text_over_it(encoder):
    assert encoder.max_tokens == 256  # sentence_bert_config.json max_seq_length
    with pytest.raises(TextTooLong) as over:
        encoder.tokenize(["fine", "word " * 300, "ok", "word " * 255])
    assert [index for index, _ in over.value.over] == [1, 3] and over.value.over[0][1] == 302
