"""capture_content on the gateway: off, no span holds the request's text; on, its request span does."""
import uuid

import pytest
from google.protobuf import struct_pb2
from nlpmesh.gateway.v1 import gateway_pb2

from meshkit import span_names
from tests.servicer.gateway_mesh import run_mesh
from tests.servicer.test_gateway_servicer import stored

REQUEST_SPAN = "nlpmesh.gateway.v1.Gateway/Generate"


def spans_of_a_miss_and_a_hit(inprocess_server, redis_server, finished_spans, canary: str, **settings):
    async def scenario(stub, tokenizer, inference):
        finished_spans.clear()
        variables = struct_pb2.Struct()
        variables.update({"question": f"What is {canary}?"})
        request = gateway_pb2.GenerateRequest(
            template=gateway_pb2.TemplateCall(id="finance_question", variables=variables),
            sampling=gateway_pb2.SamplingParams(max_new_tokens=3))
        replies = [await stub.Generate(request, timeout=10)]
        await stored(redis_server, f"test:{canary}")
        return [*replies, await stub.Generate(request, timeout=10)]

    replies = run_mesh(inprocess_server, redis_server, scenario, key_prefix=f"test:{canary}", **settings)
    assert not replies[0].cache_hit and replies[-1].cache_hit
    return replies, finished_spans.get_finished_spans()


def test_off_no_span_carries_the_prompt_or_the_answer(inprocess_server, redis_server, finished_spans):
    canary = f"canary-{uuid.uuid4().hex}"
    _, spans = spans_of_a_miss_and_a_hit(inprocess_server, redis_server, finished_spans, canary)
    for span in spans:
        assert canary not in span.to_json(), span.name
        assert span_names.GEN_AI_PROMPT not in span.attributes and span_names.GEN_AI_COMPLETION not in span.attributes


@pytest.mark.parametrize("hit", [False, True], ids=["miss", "hit"])
def test_on_the_request_span_carries_the_prompt_and_the_answer(inprocess_server, redis_server, finished_spans, hit):
    canary = f"canary-{uuid.uuid4().hex}"
    replies, spans = spans_of_a_miss_and_a_hit(inprocess_server, redis_server, finished_spans, canary,
                                               capture_content=True)
    request_spans = [s for s in spans if s.name == REQUEST_SPAN]
    span = request_spans[-1] if hit else request_spans[0]
    assert canary in span.attributes[span_names.GEN_AI_PROMPT]
    assert span.attributes[span_names.GEN_AI_COMPLETION] == replies[-1 if hit else 0].text != ""
    others = [s for s in spans if s.name != REQUEST_SPAN]
    assert all(canary not in s.to_json() for s in others)  # the one place
