"""The engine with the real SmolLM2-135M-Instruct: greedy matches transformers' generate."""
import asyncio

import pytest
import torch

from meshkit.settings import default_home
from services.inference.engine import Engine, eos_token_ids
from services.inference.generation import FinishReason, GenerationRequest, SamplingConfig
from services.inference.loading import load_model
from services.inference.sequence import Sequence
from services.model.store import load_model_files

pytestmark = pytest.mark.model

MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def model_and_tokenizer(request):
    return load_model(load_model_files(default_home()), request.param)


@pytest.fixture(scope="module")
def engine(model_and_tokenizer):
    engine = Engine(*model_and_tokenizer)
    yield engine
    engine.close()


def question_ids(tokenizer) -> list[int]:
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids)


def hf_greedy(model, prompt: list[int]) -> list[int]:
    with torch.inference_mode():
        output = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=MAX_NEW_TOKENS)
    return output[0, len(prompt) :].tolist()


def test_greedy_tokens_equal_transformers_generate(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = question_ids(tokenizer)
    request = GenerationRequest(prompt, SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, top_p=1.0))
    sequence = Sequence(request, model, tokenizer.backend_tokenizer, eos_token_ids(model))
    with torch.inference_mode():
        while sequence.finish_reason is None:
            sequence.step()
    assert sequence.generated == hf_greedy(model, prompt)


def test_greedy_answer_through_the_engine_is_the_decoded_hf_answer(engine, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompt = question_ids(tokenizer)

    async def main():
        stream = engine.submit(GenerationRequest(prompt, SamplingConfig(max_new_tokens=MAX_NEW_TOKENS)))
        items = [item async for item in stream]
        return "".join(item.text for item in items[:-1]), items[-1]

    text, finished = asyncio.run(main())
    expected_ids = hf_greedy(model, prompt)
    assert text.strip()
    assert text == tokenizer.decode(expected_ids, skip_special_tokens=True)
    assert finished.completion_tokens == len(expected_ids)
    assert finished.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
