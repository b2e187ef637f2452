"""Guided decoding with each real model of the catalogue (SmolLM2-135M-Instruct; Gemma 3 270M), in the precision
the service picks on this CPU: 50 greedy and 50 sampled answers held to a JSON Schema (a nested object, an enum,
integer ranges) all parse and validate with ``jsonschema``, while the same greedy prompts without the constraint
fail validation at least once: the mask, not the model, makes them valid."""
import asyncio
import json

import jsonschema
import pytest

from meshkit.response_format import ResponseFormat
from meshkit.sampling import Sampling
from meshkit.settings import default_home
from modelfiles.catalogue import DEFAULT_MODELS_FILE, load_catalogue
from modelfiles.convert import load_model_files
from services.inference.engine import Engine, EngineOptions
from services.inference.generation_types import GenerationRequest
from services.inference.loading import load_model

pytestmark = pytest.mark.model

CATALOGUE = load_catalogue(DEFAULT_MODELS_FILE)
ANSWERS = 50
SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["customer", "priority", "quantity"],
    "properties": {
        "customer": {"type": "object", "additionalProperties": False, "required": ["name", "age"],
                     "properties": {"name": {"type": "string", "maxLength": 30},
                                    "age": {"type": "integer", "minimum": 18, "maximum": 99}}},
        "priority": {"enum": ["low", "normal", "urgent"]},
        "quantity": {"type": "integer", "minimum": 1, "maximum": 20},
    },
}
NAMES = ("Anna", "Ben", "Chloe", "Dev", "Elif", "Farid", "Grace", "Hugo", "Ines", "Jon")


def prompts(tokenizer) -> list[list[int]]:
    texts = [f"{NAMES[i % len(NAMES)]}, aged {20 + i}, orders {1 + i % 7} boxes; "
             f"{('it can wait', 'as usual', 'it is urgent')[i % 3]}. Write the order as JSON." for i in range(ANSWERS)]
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)) for text in texts]


@pytest.fixture(scope="module", params=[CATALOGUE.get(model_id) for model_id in CATALOGUE.ids], ids=CATALOGUE.ids)
def engine(request):
    model, tokenizer = load_model(load_model_files(default_home(), request.param.id), "auto",
                                  allowed=request.param.precisions)
    engine = Engine(model, tokenizer, EngineOptions(max_running=8))
    yield engine
    engine.close()


def answers(engine: Engine, samplings: list[Sampling]) -> list[str]:
    async def one(prompt: list[int], sampling: Sampling) -> str:
        return "".join([item.text async for item in engine.submit(GenerationRequest(prompt, sampling))
                        if hasattr(item, "text")])

    async def run():
        return await asyncio.gather(*(one(prompt, sampling)
                                      for prompt, sampling in zip(prompts(engine.tokenizer), samplings)))
    return asyncio.run(run())


def valid(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def test_fifty_greedy_and_fifty_sampled_answers_held_to_a_schema_all_validate_and_free_ones_do_not(engine):
    held = ResponseFormat("json_schema", json.dumps(SCHEMA))
    greedy = answers(engine, [Sampling(max_new_tokens=96, response_format=held)] * ANSWERS)
    sampled = answers(engine, [Sampling(max_new_tokens=96, temperature=0.9, top_p=0.95, seed=seed,
                                        response_format=held) for seed in range(ANSWERS)])
    invalid = [text for text in greedy + sampled if not valid(text)]
    assert not invalid, f"{len(invalid)} of {2 * ANSWERS} held answers do not validate"
    assert len(set(sampled)) > 1  # sampling still samples inside the schema
    free = answers(engine, [Sampling(max_new_tokens=96)] * ANSWERS)
    assert sum(not valid(text) for text in free) >= 1
