"""nlpmesh-client: a typed client for the nlpmesh gateway (nlpmesh.gateway.v1). See README.md."""
from nlpmesh_client.aio import AsyncClient, AsyncTextStream
from nlpmesh_client.client import Client, TextStream
from nlpmesh_client.config import Config
from nlpmesh_client.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NlpmeshError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from nlpmesh_client.retry import NO_RETRY, RetryPolicy
from nlpmesh_client.types import (
    Embeddings,
    Generation,
    HopTiming,
    Message,
    ModelInfo,
    ResponseFormat,
    Sampling,
    Template,
    TemplateInfo,
    TemplateVariable,
    TokenCount,
    TokenLogprob,
    TopLogprob,
    Usage,
)

__all__ = [
    "NO_RETRY", "AsyncClient", "AsyncTextStream", "Client", "Config", "DeadlineExceeded", "Embeddings", "Generation",
    "HopTiming",
    "InvalidArgument", "Message", "ModelInfo", "NlpmeshError", "NotFound", "PermissionDenied", "ResourceExhausted",
    "ResponseFormat", "RetryPolicy", "Sampling", "Template", "TemplateInfo", "TemplateVariable", "TextStream",
    "TokenCount", "TokenLogprob", "TopLogprob",
    "Unauthenticated", "Unavailable", "Usage",
]
