"""The external-engine adapter's mapping (services/inference/external): the /v1/completions request it sends, the
streamed answer it reads, the engine's errors as gRPC statuses without the engine's text, replica choice, and
the engine's load from its /metrics. The engine here is a small aiohttp server on loopback, answering as each
test says; the real one (llama.cpp's server) is in tests/e2e/test_external_engine.py."""
from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from google.rpc import error_details_pb2

from cli.launcher import free_port
from meshkit.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from meshkit.response_format import CHOICE, JSON_SCHEMA, REGEX, ResponseFormat
from meshkit.sampling import Sampling
from modelfiles.catalogue import ENGINE_SAMPLING_FIELDS, ExternalEngine
from services.inference.external.engine import (
    ENGINE_HOP,
    EngineClient,
    EngineUnavailable,
    completion_body,
    error_for_status,
    guided_fields,
    unhonoured,
)
from services.inference.external.load import requests_held
from services.inference.generation_types import Delta, Finished, FinishReason

SECRET_PROMPT = "my card number is 4111"


def engine(*urls: str, **fields) -> ExternalEngine:
    return ExternalEngine("openai", urls or ("http://a:1",), "served", **fields)


def client_for(external: ExternalEngine, *, read_timeout_s: float = 1.0, connect_timeout_s: float = 1.0,
               max_connections: int = 4) -> EngineClient:
    """In a running event loop (the client's session belongs to it)."""
    return EngineClient(external, connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s,
                        replica_down_s=60, max_connections=max_connections, retry_after_s=2.0)


def sse(*chunks: dict | str) -> bytes:
    return "".join(f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n" for c in chunks).encode()


def streamed(body: bytes, status: int = 200, **headers) -> web.Response:
    return web.Response(status=status, body=body, content_type="text/event-stream", headers=headers)


@contextlib.asynccontextmanager
async def engines(*handlers):
    """A loopback HTTP server per handler (an aiohttp web handler, for every path); their base URLs."""
    servers = []
    for handler in handlers:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", handler)
        servers.append(TestServer(app, host="127.0.0.1"))
        await servers[-1].start_server()
    try:
        yield [f"http://127.0.0.1:{server.port}" for server in servers]
    finally:
        for server in servers:
            await server.close()


def closed_url() -> str:
    """A loopback port nothing listens on: connecting is refused."""
    return f"http://127.0.0.1:{free_port()}"


async def items(client: EngineClient, body: dict | None = None, ids=(1, 2, 3)) -> list:
    return [item async for item in client.generate(body or {"stop": []}, list(ids))]


def answer(handler, body: dict | None = None, **options) -> list:
    """What the client makes of one request to an engine answering with ``handler``."""
    async def scenario():
        async with engines(handler) as (url,):
            client = client_for(engine(url), **options)
            try:
                return await items(client, body)
            finally:
                await client.close()
    return asyncio.run(scenario())


def test_the_request_carries_token_ids_and_every_sampling_field_set():
    body = completion_body("served", [5, 6], Sampling(max_new_tokens=9, temperature=0.5, top_p=0.9, top_k=7,
                                                      seed=11, stop=("##",)))
    assert body == {"model": "served", "prompt": [5, 6], "stream": True, "max_tokens": 9, "temperature": 0.5,
                    "top_p": 0.9, "top_k": 7, "seed": 11, "stop": ["##"], "stream_options": {"include_usage": True}}
    greedy = completion_body("served", "text", Sampling(max_new_tokens=4))
    assert "top_k" not in greedy and "seed" not in greedy and "stop" not in greedy
    assert (greedy["temperature"], greedy["top_p"]) == (0.0, 1.0)


def test_fields_the_engine_cannot_honour_are_named_and_unset_ones_pass():
    honoured = ("max_new_tokens", "temperature", "top_p", "stop")
    found = unhonoured(Sampling(top_k=5, seed=1, temperature=0.3), honoured)
    assert [v.field for v in found] == ["sampling.top_k", "sampling.seed"]
    assert unhonoured(Sampling(temperature=0.3, max_new_tokens=5), honoured) == []
    # Never passed on, whatever the entry lists; presence and frequency penalties are by default.
    every = ENGINE_SAMPLING_FIELDS
    found = unhonoured(Sampling(repetition_penalty=1.2, logprobs=0, presence_penalty=0.5), every)
    assert [v.field for v in found] == ["sampling.repetition_penalty", "sampling.logprobs"]
    body = completion_body("served", [5], Sampling(max_new_tokens=2, presence_penalty=0.5, frequency_penalty=-1.0))
    assert (body["presence_penalty"], body["frequency_penalty"]) == (0.5, -1.0)


SCHEMA = '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}'


def test_guided_decoding_reaches_each_kind_of_engine_in_its_own_fields():
    shaped, pattern = ResponseFormat(JSON_SCHEMA, SCHEMA), ResponseFormat(REGEX, "[0-9]+")
    chosen = ResponseFormat(CHOICE, ('yes "sir"', "no\\n"))
    assert guided_fields("vllm", shaped) == {"structured_outputs": {"json": json.loads(SCHEMA)}}
    assert guided_fields("vllm", pattern) == {"structured_outputs": {"regex": "[0-9]+"}}
    assert guided_fields("vllm", chosen) == {"structured_outputs": {"choice": ['yes "sir"', "no\\n"]}}
    assert guided_fields("sglang", shaped) == {"json_schema": SCHEMA}
    assert guided_fields("sglang", chosen) == {"regex": '(yes\\ "sir"|no\\\\n)'}
    assert guided_fields("llama.cpp", shaped) == {"json_schema": json.loads(SCHEMA)}
    assert guided_fields("llama.cpp", chosen) == {"grammar": 'root ::= "yes \\"sir\\"" | "no\\\\n"'}
    assert guided_fields("refuse", shaped) == {} and guided_fields("vllm", None) == {}
    body = completion_body("served", [5], Sampling(max_new_tokens=2, response_format=shaped), "vllm")
    assert body["structured_outputs"] == {"json": json.loads(SCHEMA)}


def test_a_response_format_the_engine_cannot_take_is_refused_naming_it():
    pattern = Sampling(response_format=ResponseFormat(REGEX, "[0-9]+"))
    shaped = Sampling(response_format=ResponseFormat(JSON_SCHEMA, SCHEMA))
    assert [v.field for v in unhonoured(shaped, ENGINE_SAMPLING_FIELDS)] == ["response_format"]  # refuse
    for passing in ("llama.cpp", "gbnf"):
        assert [v.field for v in unhonoured(pattern, ENGINE_SAMPLING_FIELDS, passing)] == ["response_format.regex"]
        assert unhonoured(shaped, ENGINE_SAMPLING_FIELDS, passing) == []
    assert unhonoured(pattern, ENGINE_SAMPLING_FIELDS, "vllm") == []


def test_a_stream_becomes_deltas_then_finished_with_the_engines_usage():
    async def handler(request: web.Request) -> web.Response:
        assert (request.method, request.path) == ("POST", "/v1/completions")
        assert await request.json() == {"stop": []}  # the body as given
        return streamed(b": ping\n\n" + sse(
            {"choices": [{"text": "Hel", "finish_reason": None}]},
            {"choices": [{"text": "lo", "finish_reason": None}]},
            {"choices": [{"text": "", "finish_reason": "length"}]},
            {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}, "[DONE]"))
    assert answer(handler) == [Delta("Hel"), Delta("lo"), Finished(FinishReason.LENGTH, 3, 2)]


def test_a_stop_sequence_the_engine_names_is_a_stop_sequence_finish():
    async def handler(request):
        return streamed(sse({"choices": [{"text": "a", "finish_reason": "stop", "stop_reason": "##"}]}, "[DONE]"))
    assert answer(handler, {"stop": ["##"]})[-1] == Finished(FinishReason.STOP_SEQUENCE, 3, 1)


def test_requests_one_after_another_share_one_kept_alive_connection():
    peers = []

    async def handler(request):
        peers.append(request.transport.get_extra_info("peername"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})  # chunked, as engines send
        await response.prepare(request)
        await response.write(sse({"choices": [{"text": "a", "finish_reason": "stop"}]}, "[DONE]"))
        await asyncio.sleep(0.05)  # the body's end comes a moment after [DONE]
        await response.write_eof()
        return response

    async def scenario():
        async with engines(handler) as (url,):
            client = client_for(engine(url))
            try:
                for _ in range(3):
                    assert (await items(client))[-1].finish_reason == FinishReason.STOP
            finally:
                await client.close()
    asyncio.run(scenario())
    assert len(peers) == 3 and len(set(peers)) == 1  # a connection per request would come from a new port


@pytest.mark.parametrize("body", [sse({"choices": [{"text": "a", "finish_reason": None}]}),  # no finish
                                  sse({"error": {"message": SECRET_PROMPT}}),
                                  b"data: {not json\n\n",
                                  b"data: \xff\xfe\n\n"])
def test_a_broken_or_failing_stream_is_unavailable_without_the_engines_text(body):
    async def handler(request):
        return streamed(body)
    with pytest.raises(Unavailable) as failed:
        answer(handler)
    assert SECRET_PROMPT not in failed.value.message


def test_429_is_resource_exhausted_with_retry_info_from_retry_after_and_no_engine_text():
    async def handler(request):
        return web.json_response({"error": SECRET_PROMPT}, status=429, headers={"Retry-After": "7"})
    with pytest.raises(ResourceExhausted) as refused:
        answer(handler)
    assert refused.value.retry_after_s == 7.0 and SECRET_PROMPT not in refused.value.message
    assert any(d.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for d in refused.value.details())


@pytest.mark.parametrize(("status", "retry_after", "kind", "retry_s"), [
    (429, None, ResourceExhausted, 2.0), (429, "soon", ResourceExhausted, 2.0),
    (503, "3", EngineUnavailable, 3.0), (400, None, InvalidArgument, None), (422, None, InvalidArgument, None),
    (504, None, DeadlineExceeded, None), (401, None, Unavailable, None), (500, None, Unavailable, None),
])
def test_each_http_status_maps_to_its_grpc_error(status, retry_after, kind, retry_s):
    error = error_for_status(status, retry_after, 2.0)
    assert type(error) is kind and f"HTTP {status}" in error.message
    assert getattr(error, "retry_after_s", None) == retry_s
    if kind is DeadlineExceeded:
        assert error.hop == ENGINE_HOP
    if kind is EngineUnavailable:
        assert error.details()[0].Is(error_details_pb2.RetryInfo.DESCRIPTOR)


def test_a_silent_engine_is_deadline_exceeded_naming_the_engine_hop():
    async def handler(request):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.sleep(5)  # headers sent, then nothing
        return response
    with pytest.raises(DeadlineExceeded) as late:
        answer(handler, read_timeout_s=0.2)
    assert late.value.hop == ENGINE_HOP


def test_a_broken_connection_mid_stream_is_unavailable_and_the_replica_is_skipped():
    async def handler(request):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sse({"choices": [{"text": "a", "finish_reason": None}]}))
        request.transport.close()  # the server goes away mid-answer
        return response

    async def scenario():
        async with engines(handler) as (url,):
            client = client_for(engine(url))
            try:
                with pytest.raises(Unavailable, match="broke off"):
                    await items(client)
                return client.order([1, 2, 3])
            finally:
                await client.close()
    assert asyncio.run(scenario())  # still listed, last: skipped for a while


def test_a_full_connection_pool_is_resource_exhausted_and_the_replica_stays_up():
    async def handler(request):
        await asyncio.sleep(0.5)  # holds the one connection past the other's wait
        return streamed(sse({"choices": [{"text": "x", "finish_reason": "stop"}]}, "[DONE]"))

    async def scenario():
        async with engines(handler, handler) as urls:
            client = client_for(engine(*urls), connect_timeout_s=0.2, max_connections=1)
            order = client.order([1, 2, 3])
            holding = asyncio.create_task(items(client))
            await asyncio.sleep(0.05)
            try:
                with pytest.raises(ResourceExhausted) as refused:
                    await items(client)
                assert refused.value.retry_after_s == 2.0 and client.order([1, 2, 3]) == order
                assert (await holding)[-1].finish_reason == FinishReason.STOP
            finally:
                await client.close()
    asyncio.run(scenario())


def test_an_unreachable_replica_is_skipped_for_the_next_and_all_unreachable_is_unavailable():
    served = []

    async def handler(request):
        served.append(request.path)
        return streamed(sse({"choices": [{"text": "x", "finish_reason": "stop"}]}, "[DONE]"))

    async def scenario():
        async with engines(handler) as (reachable,):
            unreachable = closed_url()
            client = client_for(engine(unreachable, reachable))
            try:
                first = client.order([1, 2, 3])[0]
                assert (await items(client))[-1].finish_reason == FinishReason.STOP
                assert served == ["/v1/completions"]
                # The unreachable one, when it came first, is now skipped: tried last.
                assert client.order([1, 2, 3]) == [reachable, unreachable] or first == reachable
            finally:
                await client.close()
            down = client_for(engine(closed_url(), closed_url()))
            try:
                with pytest.raises(Unavailable, match="2 tried"):
                    await items(down)
            finally:
                await down.close()
    asyncio.run(scenario())


def test_one_prefix_goes_to_one_replica_and_prefixes_spread_over_replicas():
    async def scenario():
        client = client_for(engine(*(f"http://r{i}:1" for i in range(4))))
        shared = list(range(100, 164))
        try:
            assert {client.order(shared + [i])[0] for i in range(20)} == {client.order(shared)[0]}
            assert len({client.order([i, i + 1])[0] for i in range(64)}) == 4
        finally:
            await client.close()
    asyncio.run(scenario())


def test_the_engines_load_is_read_from_vllm_metrics_and_absent_elsewhere():
    vllm = ('# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name="m"} 3.0\n'
            '# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{model_name="m"} 2.0\n')
    assert requests_held(vllm) == 5
    assert requests_held("# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 1.0\n") is None


def test_the_load_poller_reads_each_replicas_metrics_and_stops_asking_one_without_them():
    from services.inference.external.load import EngineLoad

    asked = {"vllm": 0, "plain": 0}

    async def vllm(request):
        asked["vllm"] += 1
        return web.Response(text="vllm:num_requests_running 4.0\nvllm:num_requests_waiting 1.0\n")

    async def plain(request):
        asked["plain"] += 1
        return web.Response(status=404)

    async def two_polls():
        async with engines(vllm, plain) as urls, aiohttp.ClientSession() as http:
            load = EngineLoad(http, tuple(urls), poll_s=0.01)
            task = asyncio.create_task(load.run())
            await asyncio.sleep(0.3)
            task.cancel()
            return load.engine_held
    assert asyncio.run(two_polls()) == 5
    assert asked["plain"] == 1 and asked["vllm"] > 1


def test_the_docs_page_lists_every_setting_of_the_adapters_own():
    from pathlib import Path

    from meshkit.settings import ServiceSettings
    from services.inference.external.settings import AdapterSettings

    page = (Path(__file__).resolve().parents[2] / "docs" / "operating" / "external-engine.md").read_text()
    own = set(AdapterSettings.model_fields) - set(ServiceSettings.model_fields) - {"home", "model"}
    missing = [name for name in sorted(own) if f"NLPMESH_INFERENCE_{name.upper()}" not in page
               and f"`_{name.upper()}`" not in page]
    assert missing == []
