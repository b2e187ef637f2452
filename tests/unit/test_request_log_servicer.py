"""Request ids in a served call's log lines, over a real in-process grpc.aio server.

Every servicer method is wrapped by ``rpc_method``: the lines it logs carry
the caller's ``x-request-id``, and no call's id outlives it.
"""
from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from nlpmesh.inference.v1 import inference_pb2, inference_pb2_grpc

from meshkit.request_log import NO_ID, RequestIdentityFilter, bind_request_id, request_id_from
from meshkit.server import ServiceSpec, create_server, rpc_method
from meshkit.settings import ServiceSettings

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"

log = logging.getLogger("nlpmesh.probe")


class Probe(inference_pb2_grpc.InferenceServiceServicer):
    """Logs a line per call; an ``x-probe`` header picks what else the call does."""

    def __init__(self):
        self.fresh_ids: list[str] = []

    @rpc_method
    async def ModelInfo(self, request, context):
        doing = dict(context.invocation_metadata()).get("x-probe")
        if doing == "fail":
            raise RuntimeError("a bug")
        if doing == "bind":  # as the gateway does: it decides the id inside the handler
            request_id = request_id_from(())
            self.fresh_ids.append(request_id)
            with bind_request_id(request_id):
                log.info("bound")
            return inference_pb2.ModelInfoResponse()
        log.info("model info asked")
        return inference_pb2.ModelInfoResponse()

    @rpc_method
    async def Generate(self, request, context):
        log.info("started")
        for _ in range(3):
            await asyncio.sleep(0.01)  # the other call's lines come in between
            log.info("step")
            yield inference_pb2.GenerateChunk(delta="x")
        log.info("ended")


class Captured(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.addFilter(RequestIdentityFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def records():
    logger = logging.getLogger("nlpmesh")
    handler, level = Captured(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def serve_probe(scenario):
    """Runs ``await scenario(stub, probe)`` against a Probe on a free port."""
    probe = Probe()
    spec = ServiceSpec(name="probe", service_names=("nlpmesh.inference.v1.InferenceService",),
                       register=lambda server: inference_pb2_grpc.add_InferenceServiceServicer_to_server(probe, server))

    async def main():
        server, port, _ = await create_server(spec, ServiceSettings(port=0))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await scenario(inference_pb2_grpc.InferenceServiceStub(channel), probe)
        finally:
            await server.stop(None)

    asyncio.run(main())


def ids(records, message: str | None = None) -> list[str]:
    return [r.request_id for r in records if message is None or r.getMessage() == message]


def test_a_line_logged_by_a_handler_carries_the_request_id_the_client_sent(records):
    async def scenario(stub, probe):
        await stub.ModelInfo(inference_pb2.ModelInfoRequest(), timeout=5,
                             metadata=(("x-request-id", "client-id-1"), ("traceparent", TRACEPARENT)))

    serve_probe(scenario)
    [record] = records
    assert (record.getMessage(), record.request_id, record.trace_id) == ("model info asked", "client-id-1", TRACE_ID)


def test_the_next_call_without_an_id_logs_a_dash_not_the_call_before_s(records):
    async def scenario(stub, probe):
        await stub.ModelInfo(inference_pb2.ModelInfoRequest(), timeout=5, metadata=(("x-request-id", "first"),))
        await stub.ModelInfo(inference_pb2.ModelInfoRequest(), timeout=5)
        await stub.ModelInfo(inference_pb2.ModelInfoRequest(), timeout=5, metadata=(("x-request-id", "x" * 129),))

    serve_probe(scenario)
    assert ids(records) == ["first", NO_ID, NO_ID]


def test_an_id_bound_inside_a_handler_is_not_leaked_to_the_next_call(records):
    async def scenario(stub, probe):
        await stub.ModelInfo(inference_pb2.ModelInfoRequest(), timeout=5, metadata=(("x-probe", "bind"),))
        await stub.ModelInfo(inference_pb2.ModelInfoRequest(), timeout=5)

    serve_probe(scenario)
    probe_ids = ids(records)
    assert len(probe_ids) == 2 and len(probe_ids[0]) == 32
    assert probe_ids[1] == NO_ID


def test_concurrent_streams_each_log_their_own_id_on_every_line(records):
    async def scenario(stub, probe):
        async def stream(request_id: str) -> None:
            call = stub.Generate(inference_pb2.GenerateRequest(), timeout=5, metadata=(("x-request-id", request_id),))
            async for _ in call:
                pass

        await asyncio.gather(stream("stream-a"), stream("stream-b"))
        await stub.ModelInfo(inference_pb2.ModelInfoRequest(), timeout=5)

    serve_probe(scenario)
    stream_records = [r for r in records if r.getMessage() != "model info asked"]
    assert len(stream_records) == 10
    assert sorted(ids(stream_records)) == ["stream-a"] * 5 + ["stream-b"] * 5
    assert ids(records, "model info asked") == [NO_ID]
    messages = [(r.request_id, r.getMessage()) for r in stream_records]
    assert [m for i, m in messages if i == "stream-a"] == ["started", "step", "step", "step", "ended"]


def test_a_bug_s_traceback_is_logged_with_the_call_s_id(records):
    async def scenario(stub, probe):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ModelInfo(inference_pb2.ModelInfoRequest(), timeout=5,
                                 metadata=(("x-request-id", "buggy-call"), ("x-probe", "fail")))
        assert raised.value.code() == grpc.StatusCode.INTERNAL

    serve_probe(scenario)
    [bug] = [r for r in records if r.name == "nlpmesh.server"]
    assert bug.getMessage().startswith("bug in ") and bug.exc_info is not None
    assert bug.request_id == "buggy-call"
