"""The gateway's message classes, built at import from the serialized contract in ``_contract``.

A pool of the package's own, so that a process that also imports stubs generated from protos/ (the
mesh's own code) holds both without a clash.
"""
from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2

from nlpmesh_client._contract import GATEWAY_PROTO

PACKAGE = "nlpmesh.gateway.v1"
SERVICE = f"{PACKAGE}.Gateway"


def _pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    struct_file = descriptor_pb2.FileDescriptorProto()
    struct_pb2.DESCRIPTOR.CopyToProto(struct_file)
    pool.Add(struct_file)
    pool.AddSerializedFile(GATEWAY_PROTO)
    return pool


_POOL = _pool()


def _message(name: str) -> type:
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"{PACKAGE}.{name}"))


GenerateRequest = _message("GenerateRequest")
GenerateResponse = _message("GenerateResponse")
GenerateChunk = _message("GenerateChunk")
CountTokensRequest = _message("CountTokensRequest")
CountTokensResponse = _message("CountTokensResponse")
ListTemplatesRequest = _message("ListTemplatesRequest")
ListTemplatesResponse = _message("ListTemplatesResponse")
ListModelsRequest = _message("ListModelsRequest")
ListModelsResponse = _message("ListModelsResponse")
EmbedRequest = _message("EmbedRequest")
EmbedResponse = _message("EmbedResponse")
FINISH_REASON = _POOL.FindEnumTypeByName(f"{PACKAGE}.FinishReason")
CACHE_MODE = _POOL.FindEnumTypeByName(f"{PACKAGE}.CacheMode")


def method(name: str) -> str:
    """The gRPC method path of one of the gateway's RPCs."""
    return f"/{SERVICE}/{name}"
