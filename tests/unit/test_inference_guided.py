"""Guided decoding in the engine (the tiny float32 model, whose free answers are noise): an answer held to a
JSON Schema, a regex or a choice list matches it and ends there, a free row decoding beside a constrained one
keeps its tokens, and a format that does not compile is INVALID_ARGUMENT naming its field."""
import asyncio
import json
import re

import pytest

from meshkit.errors import InvalidArgument
from meshkit.response_format import ResponseFormat
from meshkit.sampling import Sampling
from services.inference import metrics
from services.inference.generation_types import Delta, FinishReason, GenerationRequest
from tests.tiny_models import real_tokenizer, tiny_engine
from tests.unit.test_inference_chunking import float32_tiny

TICKET = {"type": "object", "additionalProperties": False, "required": ["intent", "urgent", "order"],
          "properties": {"intent": {"enum": ["refund", "delivery", "other"]}, "urgent": {"type": "boolean"},
                         "order": {"type": "integer", "minimum": 0, "maximum": 99999}}}
ORDER_ID = r"[A-Z]{2}-[0-9]{4}"


@pytest.fixture(scope="module")
def engine():
    engine = tiny_engine(float32_tiny(), max_running=4)
    yield engine
    engine.close()


def request(response_format: ResponseFormat | None, max_new_tokens: int = 48) -> GenerationRequest:
    return GenerationRequest(real_tokenizer().encode("Classify: my parcel never came, order 1234."),
                             Sampling(max_new_tokens=max_new_tokens, response_format=response_format))


async def answer(engine, req: GenerationRequest) -> tuple[str, object]:
    items = [item async for item in engine.submit(req)]
    return "".join(item.text for item in items if isinstance(item, Delta)), items[-1]


def run(engine, *requests):
    async def main():
        return await asyncio.gather(*(answer(engine, req) for req in requests))
    return asyncio.run(main())


def test_a_json_schema_a_regex_and_a_choice_list_hold_the_answer_and_end_it(engine):
    formats = (ResponseFormat("json_schema", json.dumps(TICKET)), ResponseFormat("regex", ORDER_ID),
               ResponseFormat("choice", ("refund", "delivery (late)", "other")))
    (ticket, ticket_end), (order, order_end), (choice, choice_end) = run(engine, *(request(f) for f in formats))
    parsed = json.loads(ticket)
    assert set(parsed) == {"intent", "urgent", "order"} and parsed["intent"] in ("refund", "delivery", "other")
    assert isinstance(parsed["urgent"], bool) and 0 <= parsed["order"] <= 99999
    assert re.fullmatch(ORDER_ID, order) and choice in formats[2].value
    assert {end.finish_reason for end in (ticket_end, order_end, choice_end)} == {FinishReason.STOP}
    assert order_end.completion_tokens < 48  # ended where the format did, not at max_new_tokens
    (free, _), = run(engine, request(None))
    assert not re.fullmatch(ORDER_ID, free)  # the tiny model's own answer is noise: the mask made the difference


def test_a_free_row_beside_constrained_ones_keeps_its_tokens_and_a_format_compiles_once(engine):
    (alone, alone_end), = run(engine, request(None, 24))
    compiled = metrics.GRAMMARS.labels("compiled")._value.get()
    schema = ResponseFormat("json_schema", json.dumps(TICKET))
    together = run(engine, request(schema), request(None, 24), request(schema))
    assert together[1] == (alone, alone_end)
    assert together[0][0] == together[2][0]  # greedy under one format: the same answer twice
    assert metrics.GRAMMARS.labels("compiled")._value.get() - compiled <= 1  # the second took the compiled one


def test_a_format_that_does_not_compile_is_invalid_argument_naming_its_field(engine):
    bad = ResponseFormat("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "strin"}}}))
    assert [v.field for v in bad.violations()] == ["response_format.json_schema"]
    with pytest.raises(InvalidArgument) as refused:
        run(engine, request(bad))
    assert refused.value.violations[0].field == "response_format.json_schema"
    assert [v.field for v in ResponseFormat("regex", "((").violations()] == ["response_format.regex"]
    assert ResponseFormat("choice", ("x",) * 65).violations()[0].description == "1 to 64 choices"
    assert "((" not in ResponseFormat("regex", "((").violations()[0].description  # never quoted back
