"""The device setting, and the engine on CUDA (bfloat16, SDPA attention).

The CUDA tests run where torch sees a CUDA device and are skipped elsewhere,
with that reason; the device resolution tests run everywhere.
"""
import asyncio

import pytest
import torch

from meshkit.sampling import Sampling
from meshkit.settings import default_home
from modelfiles.convert import load_model_files
from services.inference.device import resolve_device
from services.inference.engine import Engine, EngineOptions
from services.inference.generation_types import Delta, Finished, FinishReason, GenerationRequest
from services.inference.loading import load_model
from services.inference.prefix import PrefixCache
from services.inference.settings import InferenceSettings

HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not HAS_CUDA, reason=f"no CUDA device (torch {torch.__version__}, CUDA build "
                                               f"{torch.version.cuda or 'none'}): the CUDA path is not exercised here")


def test_cpu_is_the_cpu_and_auto_takes_cuda_only_where_there_is_one():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if HAS_CUDA else "cpu")


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a CUDA device")
def test_cuda_without_a_device_is_refused_at_start_with_a_clear_error():
    with pytest.raises(ValueError, match=r"NLPMESH_INFERENCE_DEVICE=cuda.*sees no CUDA device"):
        resolve_device("cuda")


def test_an_unknown_device_is_refused():
    with pytest.raises(ValueError, match="expected one of auto, cpu, cuda"):
        resolve_device("tpu")


def test_the_setting_reads_nlpmesh_inference_device(monkeypatch):
    monkeypatch.setenv("NLPMESH_INFERENCE_DEVICE", "cpu")
    assert InferenceSettings().device == "cpu"


@pytest.fixture(scope="module")
def cuda_model():
    return load_model(load_model_files(default_home()), "int8", "cuda")


def chat(tokenizer, text: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


async def generate(engine: Engine, prompt: list[int], max_new_tokens: int = 16) -> tuple[str, Finished]:
    items = [item async for item in engine.submit(GenerationRequest(prompt, Sampling(max_new_tokens=max_new_tokens)))]
    return "".join(item.text for item in items if isinstance(item, Delta)), items[-1]


@cuda
@pytest.mark.model
def test_on_cuda_the_model_is_bfloat16_and_greedy_answers_stream_and_repeat(cuda_model):
    model, tokenizer = cuda_model
    assert model.device.type == "cuda" and model.dtype == torch.bfloat16
    engine = Engine(model, tokenizer, EngineOptions())
    try:
        prompt = chat(tokenizer, "What is the capital of France?")
        text, finished = asyncio.run(generate(engine, prompt))
        assert text.strip() and finished.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
        assert asyncio.run(generate(engine, prompt))[0] == text
    finally:
        engine.close()


@cuda
@pytest.mark.model
def test_on_cuda_eight_streams_batch_and_a_long_prompt_is_chunked_beside_them(cuda_model):
    model, tokenizer = cuda_model
    engine = Engine(model, tokenizer, EngineOptions(max_batched_tokens=64))
    try:
        prompts = [chat(tokenizer, f"Write about the number {index}.") for index in range(8)]
        long_prompt = tokenizer.encode("The history of printing. " * 80)[:500]

        async def together():
            return await asyncio.gather(*(generate(engine, prompt, 24) for prompt in prompts + [long_prompt]))

        results = asyncio.run(together())
        assert all(finished.completion_tokens >= 1 for _, finished in results)
    finally:
        engine.close()


@cuda
@pytest.mark.model
def test_on_cuda_a_prefix_hit_reuses_the_cached_blocks(cuda_model):
    model, tokenizer = cuda_model
    engine = Engine(model, tokenizer, EngineOptions(), prefix_cache=PrefixCache(model="m", revision="r"))
    try:
        prompt = chat(tokenizer, "You are a patient tutor. " * 20 + "Explain gravity.")
        cold, _ = asyncio.run(generate(engine, prompt))
        hit, _ = asyncio.run(generate(engine, prompt))
        assert cold.strip() and hit.strip()
        assert engine._prefix.local_bytes > 0
    finally:
        engine.close()
