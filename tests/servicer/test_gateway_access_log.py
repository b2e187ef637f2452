"""The gateway's access log over real in-process channels: one line per call, with what each call was
(a miss, a cache hit, a coalesced follower, a refusal, a stream), and none with the setting off."""
from __future__ import annotations

import asyncio
import logging
import uuid

import grpc
import pytest
from nlpmesh.gateway.v1 import gateway_pb2

from meshkit.request_log import FIELDS
from tests.servicer.fakes import FakeInference
from tests.servicer.gateway_mesh import run_mesh
from tests.servicer.test_gateway_coalescing import question


@pytest.fixture
def access_lines(caplog):
    """The access lines logged, as their fields with the request id."""
    caplog.set_level(logging.INFO, logger="nlpmesh.access")

    def lines() -> list[dict]:
        return [{**getattr(record, FIELDS), "request_id": record.request_id} for record in caplog.records
                if record.name == "nlpmesh.access"]

    return lines


def test_each_call_leaves_one_line_saying_miss_hit_coalesced_or_its_refusal(inprocess_server, redis_server,
                                                                            access_lines):
    async def scenario(stub, tokenizer, inference):
        request = question()
        first = await stub.Generate(request, timeout=30, metadata=(("x-request-id", "miss-1"),))
        await asyncio.sleep(0.5)  # the store lands after the answer
        await stub.Generate(request, timeout=30, metadata=(("x-request-id", "hit-1"),))
        shared = question()
        await asyncio.gather(*(stub.Generate(shared, timeout=30, metadata=(("x-request-id", f"burst-{i}"),))
                               for i in range(3)))
        async for _ in stub.GenerateStream(question(), timeout=30, metadata=(("x-request-id", "stream-1"),)):
            pass
        unknown = gateway_pb2.GenerateRequest(template=gateway_pb2.TemplateCall(id="no_such_template"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.Generate(unknown, timeout=30, metadata=(("x-request-id", "refused-1"),))
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        return first

    first = run_mesh(inprocess_server, redis_server, scenario, inference=FakeInference(first_token_delay_s=0.3))
    by_id = {line["request_id"]: line for line in access_lines()}
    assert len(access_lines()) == len(by_id) == 7  # one line per call
    miss = by_id["miss-1"]
    assert (miss["method"], miss["status"], miss["cache"], miss["tenant"]) == ("Generate", "OK", "miss", "public")
    assert (miss["template"], miss["model"]) == ("finance_question", first.model)
    assert miss["template_version"] not in ("", "-")
    assert (miss["prompt_tokens"], miss["completion_tokens"]) == (first.usage.prompt_tokens,
                                                                  first.usage.completion_tokens)
    assert set(miss["hops"]) == {t.hop for t in first.timings} - {"total"}
    assert by_id["hit-1"]["cache"] == "hit" and set(by_id["hit-1"]["hops"]) == {"cache"}
    burst = sorted(by_id[f"burst-{i}"]["cache"] for i in range(3))
    assert burst == ["coalesced", "coalesced", "miss"]
    assert (by_id["stream-1"]["method"], by_id["stream-1"]["status"]) == ("GenerateStream", "OK")
    refused = by_id["refused-1"]
    assert (refused["status"], refused["template"], refused["cache"]) == ("NOT_FOUND", "no_such_template", "-")
    assert "template" in refused["hops"]  # the hop that failed


def test_the_access_log_off_writes_no_line(inprocess_server, redis_server, access_lines):
    async def scenario(stub, tokenizer, inference):
        await stub.Generate(question(), timeout=30, metadata=(("x-request-id", f"off-{uuid.uuid4().hex}"),))

    run_mesh(inprocess_server, redis_server, scenario, access_log=False)
    assert access_lines() == []
