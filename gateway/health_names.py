"""The gateway's grpc.health.v1 service names: what load balancers, the launcher and `nlpmesh health` ask for.

A module of its own, light to import, so the CLI can name them without loading the gateway.
"""
from __future__ import annotations

from nlpmesh.gateway.v1 import gateway_pb2

GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
GENERATION_PATH = ("", GATEWAY_SERVICE)  # follows template, tokenizer and the default model's inference
CACHE_PATH = f"{GATEWAY_SERVICE}/cache"  # cache hits need only the gateway and Redis


def model_health_name(model: str) -> str:
    """The health name of one model's generations (its id: a ListModels id)."""
    return f"{GATEWAY_SERVICE}/models/{model}"
