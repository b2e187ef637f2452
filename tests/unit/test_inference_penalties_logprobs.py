"""Repetition, presence and frequency penalties and per-token log-probabilities in the engine (the tiny float32
model): a penalty changes a greedy answer as its definition says, a free row beside a penalised one keeps its
tokens, and each token's log-probability is the model's own at that position."""
import asyncio

import torch

from meshkit.sampling import Sampling
from services.inference.generation_types import Delta, Finished, GenerationRequest
from services.inference.sampling import TokenSampler, _penalise
from tests.tiny_models import real_tokenizer, tiny_engine
from tests.unit.test_inference_chunking import float32_tiny

PROMPT = "The cat sat on the mat. The cat sat on the"


def ask(engine, max_new_tokens: int = 24, **sampling) -> tuple[list[int], list, str, Finished]:
    """(token ids, TokenLogprobs, text, the last item) of one greedy generation that asks for logprobs."""
    request = GenerationRequest(real_tokenizer().encode(PROMPT),
                                Sampling(max_new_tokens=max_new_tokens, logprobs=sampling.pop("logprobs", 3),
                                         **sampling))

    async def run():
        return await drain(engine.submit(request))

    return from_items(asyncio.run(run()))


async def drain(stream) -> list:
    return [item async for item in stream]


def from_items(items) -> tuple[list[int], list, str, Finished]:
    logprobs = [one for item in items for one in item.logprobs]
    text = "".join(item.text for item in items if isinstance(item, Delta))
    return [one.token_id for one in logprobs], logprobs, text, items[-1]


def test_each_token_comes_with_the_models_own_log_probability_and_its_most_likely_alternatives():
    model = float32_tiny()
    engine = tiny_engine(model)
    try:
        ids, logprobs, text, last = ask(engine, logprobs=4)
    finally:
        engine.close()
    assert len(ids) == last.completion_tokens > 0  # every token once, across the deltas and the last item
    prompt = real_tokenizer().encode(PROMPT)
    with torch.inference_mode():
        reference = torch.log_softmax(model(torch.tensor([prompt + ids])).logits[0].float(), dim=-1)
    for index, one in enumerate(logprobs):
        expected = reference[len(prompt) - 1 + index]
        assert abs(one.logprob - float(expected[one.token_id])) < 1e-3
        assert len(one.top) == 4 and one.top[0].token_id == one.token_id  # greedy: the most likely one
        assert [t.logprob for t in one.top] == sorted((t.logprob for t in one.top), reverse=True)
        assert abs(one.top[1].logprob - float(torch.topk(expected, 2).values[1])) < 1e-3
        assert one.token == real_tokenizer().decode([one.token_id])
    assert text == real_tokenizer().decode(ids, skip_special_tokens=True)


def test_the_penalties_move_the_logits_as_defined_over_the_prompt_or_the_answer():
    logits = torch.tensor([[1.0, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    prompt, answer = [0, 2], [5, 5, 7]
    openai = TokenSampler(Sampling(frequency_penalty=0.5, presence_penalty=0.25))
    scores = _penalise(openai._sampling, prompt + answer, len(prompt), logits)
    # The answer's tokens only: count times frequency, plus presence once.
    assert scores.tolist() == [[1.0, 1.0, -1.0, 0.0, 0.0, -1.25, 0.0, -0.75]]
    repetition = _penalise(Sampling(repetition_penalty=2.0), prompt + answer, len(prompt), logits)
    # Prompt and answer: a positive logit divided, a negative one multiplied.
    assert repetition.tolist() == [[0.5, 1.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    assert openai(prompt + answer, logits, len(prompt)) in (0, 1)  # greedy over the penalised logits


def test_a_penalised_answer_differs_and_a_free_row_beside_it_keeps_its_tokens():
    engine = tiny_engine(float32_tiny(), max_running=4)
    try:
        free_ids, free_logprobs, _, _ = ask(engine)
        penalised_ids, _, _, _ = ask(engine, frequency_penalty=2.0, presence_penalty=2.0)

        async def together():
            streams = [engine.submit(GenerationRequest(real_tokenizer().encode(PROMPT),
                                                       Sampling(max_new_tokens=24, logprobs=3, **penalty)))
                       for penalty in ({}, {"frequency_penalty": 2.0, "presence_penalty": 2.0})]
            return await asyncio.gather(*(drain(stream) for stream in streams))

        free_beside, penalised_beside = (from_items(items) for items in asyncio.run(together()))
        repeated_ids, _, _, _ = ask(engine, repetition_penalty=1.8)
    finally:
        engine.close()
    assert len(set(free_ids)) < len(free_ids)  # the tiny model repeats itself unpenalised...
    assert penalised_ids != free_ids and len(set(penalised_ids)) > len(set(free_ids))  # ...and less with a penalty
    assert repeated_ids != free_ids
    assert free_beside[0] == free_ids and penalised_beside[0] == penalised_ids  # each row keeps its own tokens
    for alone, beside in zip(free_logprobs, free_beside[1]):
        assert abs(alone.logprob - beside.logprob) < 1e-4
