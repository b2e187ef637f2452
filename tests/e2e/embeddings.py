"""Embed once the gateway has learnt the embedding model (in the background, after the mesh is ready)."""
from __future__ import annotations

import grpc
from nlpmesh.gateway.v1 import gateway_pb2

from tests.polling import wait_until


def embed_when_ready(stub, request: gateway_pb2.EmbedRequest, metadata=(), timeout_s: float = 60.0):
    """The first answer to ``request`` that is not UNAVAILABLE (the model not learnt yet); other errors raise."""
    def attempt():
        try:
            return stub.Embed(request, timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                return None
            raise

    return wait_until(attempt, timeout_s, 0.2, what="the gateway to learn the embedding model")
