"""Where an internal service's replicas are, and how gRPC balances and retries calls among them.

An address names one endpoint (``127.0.0.1:50055``), every endpoint a name resolves
to (``dns:///inference:50055``, as under compose and Kubernetes), or a list of
endpoints (``ipv4:127.0.0.1:50055,127.0.0.1:50065``, or the plain comma list
``127.0.0.1:50055,127.0.0.1:50065``, which ``grpc_target`` turns into that).

Balancing is gRPC's own: the channel's service config selects ``round_robin`` and
client-side health checking (``healthCheckConfig``), so a replica is in rotation only
while its grpc.health.v1 Watch for the service's name says SERVING. A replica that
drains (SIGTERM: meshkit/server.py turns every health name NOT_SERVING before the
server stops) leaves the rotation at once; one that restarts comes back when it is
SERVING again. Retries are gRPC's too (gRFC A6): the idempotent calls named in
``RETRIED_METHODS`` retry on UNAVAILABLE, at most ``MAX_ATTEMPTS`` attempts within the
call's own deadline, with retry throttling so a mesh-wide outage is not multiplied.
Inference ``Generate`` is not retried by gRPC: its load report comes back in the
initial metadata, which commits a gRPC retry, and a stream may be retried only
while no token has reached the caller (gateway/downstream.py does that).
"""
from __future__ import annotations

import ipaddress
import json

from nlpmesh.cache.v1 import cache_pb2
from nlpmesh.embedding.v1 import embedding_pb2
from nlpmesh.inference.v1 import inference_pb2
from nlpmesh.template.v1 import template_pb2
from nlpmesh.tokenizer.v1 import tokenizer_pb2

MAX_ATTEMPTS = 3
# At most this many endpoints in one list: a typo must not open thousands of connections.
MAX_ENDPOINTS = 64

TEMPLATE_SERVICE = template_pb2.DESCRIPTOR.services_by_name["TemplateService"].full_name
TOKENIZER_SERVICE = tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"].full_name
CACHE_SERVICE = cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name
INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
EMBEDDING_SERVICE = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name

# The calls that may run twice with the same effect: template render, tokenizer encode/count,
# cache lookup/store (a store writes the same answer under the same key).
RETRIED_METHODS: dict[str, tuple[str, ...]] = {
    TEMPLATE_SERVICE: ("Render", "ListTemplates"),
    TOKENIZER_SERVICE: ("EncodeChat", "CountChat", "Decode"),
    CACHE_SERVICE: ("Lookup", "Store"),
    INFERENCE_SERVICE: (),
    EMBEDDING_SERVICE: ("Embed", "ModelInfo"),  # no side effects: another replica may answer
}

RETRY_POLICY = {
    "maxAttempts": MAX_ATTEMPTS,
    # Short: hop budgets are tens of milliseconds; the call's deadline bounds every attempt.
    "initialBackoff": "0.005s",
    "maxBackoff": "0.05s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
# A channel stops retrying while failures outnumber successes (tokens < maxTokens / 2), so an
# outage of every replica costs one attempt per call, not three.
RETRY_THROTTLING = {"maxTokens": 10, "tokenRatio": 0.1}


def service_config(service: str) -> str:
    """The service config (JSON) of a channel to ``service`` (its full proto name)."""
    config: dict = {
        "loadBalancingConfig": [{"round_robin": {}}],
        # The name each service sets SERVING once ready and NOT_SERVING while it drains.
        "healthCheckConfig": {"serviceName": service},
    }
    methods = RETRIED_METHODS.get(service, ())
    if methods:
        config["methodConfig"] = [{"name": [{"service": service, "method": m} for m in methods],
                                   "retryPolicy": RETRY_POLICY}]
        config["retryThrottling"] = RETRY_THROTTLING
    return json.dumps(config, separators=(",", ":"))


def endpoints(address: str) -> list[str]:
    """The ``host:port`` endpoints an address lists; a ``dns:///`` name is one entry (its resolver's business)."""
    address = address.strip()
    if not address:
        raise ValueError("an empty service address")
    if address.startswith(("dns:", "unix:")):
        return [address]
    body = address
    for scheme in ("ipv4:", "ipv6:"):
        if address.startswith(scheme):
            body = address[len(scheme):]
    parts = [part.strip() for part in body.split(",")]
    if any(not part for part in parts):
        raise ValueError(f"an empty endpoint in the address list {address!r}")
    if len(parts) > MAX_ENDPOINTS:
        raise ValueError(f"{len(parts)} endpoints in one address; at most {MAX_ENDPOINTS}")
    return parts


def dns_name(address: str) -> tuple[str, int] | None:
    """(host, port) of a ``dns:`` address (``dns:///inference:50055``, ``dns:inference:50055``; an authority,
    ``dns://8.8.8.8/name:port``, is the resolver's business and ignored here); None for any other."""
    address = address.strip()
    if not address.startswith("dns:"):
        return None
    rest = address[len("dns:"):]
    if rest.startswith("//"):
        rest = rest[2:].partition("/")[2]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{address!r}: expected dns:///host:port")
    return host.strip("[]"), int(port)


def endpoint_of(host: str, port: int) -> str:
    """``host:port``, IPv6 in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def grpc_target(address: str) -> str:
    """The gRPC target for ``address``: a comma list of IP endpoints becomes ``ipv4:`` (or ``ipv6:``).

    A list of host names cannot be one target: use ``dns:///name:port``, whose resolver
    returns every address of the name.
    """
    address = address.strip()
    if address.startswith(("dns:", "unix:", "ipv4:", "ipv6:")) or "," not in address:
        endpoints(address)  # the same checks
        return address
    parts = endpoints(address)
    families = {_family(part, address) for part in parts}
    if len(families) > 1:
        raise ValueError(f"the address list {address!r} mixes IPv4 and IPv6 endpoints")
    return f"{families.pop()}:{','.join(parts)}"


def _family(endpoint: str, address: str) -> str:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{endpoint!r} in {address!r} is not host:port")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(f"{endpoint!r} in {address!r}: a list takes IP addresses; for a host name with "
                         "several addresses use dns:///name:port") from None
    return "ipv4" if ip.version == 4 else "ipv6"
