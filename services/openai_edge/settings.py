"""The edge's settings (env: NLPMESH_EDGE_<FIELD>)."""
from __future__ import annotations

from pydantic import Field

from meshkit.settings import DEFAULT_PORTS, ServiceSettings


class EdgeSettings(ServiceSettings, service="edge"):
    # The gateway it calls (gRPC); TLS to it when the mesh runs TLS (tls_ca_file / tls_dir: the mesh CA).
    gateway_addr: str = f"127.0.0.1:{DEFAULT_PORTS['gateway']}"
    # A request body over this is refused with 413 before it is parsed.
    max_body_bytes: int = Field(default=1024 * 1024, gt=0)
    # Every gateway call's deadline, unless the request's nlpmesh.budget_ms is shorter.
    timeout_s: float = Field(default=120.0, gt=0)
    # uvicorn's line per HTTP request (method, path, status; never a body). Off: the gateway logs every call the
    # edge makes, under the same x-request-id, and nlpmesh_edge_requests_total counts each answer.
    access_log: bool = False
    # uvloop here by default: the edge's cost per request is mostly its event loop's (bench/edge.py).
    event_loop: str = "uvloop"
