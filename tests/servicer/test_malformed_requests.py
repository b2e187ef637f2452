"""Bytes that are not a valid request: INVALID_ARGUMENT with a plain message, on every service of the mesh.

Each service kind runs as a real in-process server; a generic client sends raw
bytes, here a string field holding a lone surrogate (invalid UTF-8).
"""
from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2
from nlpmesh.cache.v1 import cache_pb2
from nlpmesh.gateway.v1 import gateway_pb2
from nlpmesh.inference.v1 import inference_pb2
from nlpmesh.template.v1 import template_pb2
from nlpmesh.tokenizer.v1 import tokenizer_pb2

from services.cache.servicer import build_spec as cache_spec
from services.cache.settings import CacheSettings
from services.inference.servicer import build_spec as inference_spec
from services.inference.settings import InferenceSettings
from services.template.servicer import build_spec as template_spec
from services.template.settings import TemplateSettings
from services.tokenizer.servicer import build_spec as tokenizer_spec
from services.tokenizer.settings import TokenizerSettings
from tests.servicer.gateway_mesh import run_mesh
from tests.tiny_llama import tiny_engine

PLACEHOLDER = "QQQ"
LONE_SURROGATE = b"\xed\xa0\x80"  # U+D800 written as if it were UTF-8: not valid UTF-8


def with_bad_utf8(message) -> bytes:
    """``message`` serialized, with its one PLACEHOLDER string turned into invalid UTF-8."""
    raw = message.SerializeToString()
    assert raw.count(PLACEHOLDER.encode()) == 1
    return raw.replace(PLACEHOLDER.encode(), LONE_SURROGATE)


# Per service: (a method, a request whose string field will be made invalid, a normal call to make next).
CASES = {
    "template": ("/nlpmesh.template.v1.TemplateService/Render", template_pb2.RenderRequest(id=PLACEHOLDER),
                 ("/nlpmesh.template.v1.TemplateService/ListTemplates", template_pb2.ListTemplatesRequest())),
    "tokenizer": ("/nlpmesh.tokenizer.v1.TokenizerService/EncodeChat",
                  tokenizer_pb2.EncodeChatRequest(messages=[tokenizer_pb2.Message(role="user", content=PLACEHOLDER)]),
                  ("/nlpmesh.tokenizer.v1.TokenizerService/EncodeChat",
                   tokenizer_pb2.EncodeChatRequest(messages=[tokenizer_pb2.Message(role="user", content="Hi")]))),
    "cache": ("/nlpmesh.cache.v1.CacheService/Invalidate", cache_pb2.InvalidateRequest(tenant=PLACEHOLDER),
              ("/nlpmesh.cache.v1.CacheService/Stats", cache_pb2.StatsRequest())),
    "inference": ("/nlpmesh.inference.v1.InferenceService/Generate", inference_pb2.GenerateRequest(model=PLACEHOLDER),
                  ("/nlpmesh.inference.v1.InferenceService/ModelInfo", inference_pb2.ModelInfoRequest())),
}


async def send_raw(channel: grpc.aio.Channel, method: str, raw: bytes, streaming: bool = False):
    if streaming:
        call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
        return [chunk async for chunk in call(raw, timeout=10)]
    return await channel.unary_unary(method, request_serializer=None, response_deserializer=None)(raw, timeout=10)


async def refused_then_served(channel, method: str, bad, follow_up, streaming: bool = False) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await send_raw(channel, method, with_bad_utf8(bad), streaming)
    next_method, next_request = follow_up
    assert await send_raw(channel, next_method, next_request.SerializeToString()) is not None
    return caught.value


def assert_plain_invalid_argument(error: grpc.aio.AioRpcError) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    message = error.details()
    assert "protobuf" in message
    for leak in ("<class", "DecodeError", "UnicodeDecodeError", "Error parsing", "Traceback", "Unexpected"):
        assert leak not in message


def spec_and_settings(kind: str, redis_url: str):
    if kind == "template":
        return template_spec(TemplateSettings()), TemplateSettings()
    if kind == "tokenizer":
        return tokenizer_spec(TokenizerSettings()), TokenizerSettings()
    if kind == "cache":
        settings = CacheSettings(redis_url=redis_url, key_prefix=f"test:{uuid.uuid4().hex}")
        return cache_spec(settings), settings
    settings = InferenceSettings()
    return inference_spec(settings, engine_factory=lambda _: tiny_engine()), settings


@pytest.mark.parametrize("kind", sorted(CASES))
def test_an_internal_service_refuses_bytes_that_are_not_its_request(inprocess_server, redis_server, kind):
    method, bad, follow_up = CASES[kind]
    spec, settings = spec_and_settings(kind, redis_server)

    async def main():
        async with inprocess_server(spec, settings) as running:
            return await refused_then_served(running.channel, method, bad, follow_up,
                                             streaming=kind == "inference")

    assert_plain_invalid_argument(asyncio.run(main()))


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_the_gateway_refuses_bytes_that_are_not_its_request(inprocess_server, redis_server, method):
    async def scenario(channel, tokenizer, inference):
        return await refused_then_served(
            channel, f"/nlpmesh.gateway.v1.Gateway/{method}", gateway_pb2.GenerateRequest(model=PLACEHOLDER),
            ("/nlpmesh.gateway.v1.Gateway/ListTemplates", gateway_pb2.ListTemplatesRequest()),
            streaming=method == "GenerateStream")

    assert_plain_invalid_argument(run_mesh(inprocess_server, redis_server, scenario, pass_channel=True))


def test_a_health_check_with_bad_bytes_is_invalid_argument_too(inprocess_server):
    async def main():
        async with inprocess_server(template_spec(TemplateSettings()), TemplateSettings()) as running:
            return await refused_then_served(
                running.channel, "/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest(service=PLACEHOLDER),
                ("/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest()))

    assert_plain_invalid_argument(asyncio.run(main()))
