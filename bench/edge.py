"""A cache hit through the OpenAI-compatible edge beside the same cache hit through the gateway's gRPC API, on one
mesh, turns interleaved (`python -m bench.run --only edge`).

    grpc          a bare gRPC stub's Generate on the gateway (as bench/cache_hits.py times it)
    edge_http     POST /v1/chat/completions on the edge over one kept-alive connection of the standard library's
                  http.client, the bare HTTP counterpart of the bare stub: the edge's cost, not a client library's
    edge_openai   the same through the official `openai` package (its client-side parsing included)

The issue's goal: edge_http's p50 at most 2x grpc's.
"""
from __future__ import annotations

import json
import ssl
import time
from http.client import HTTPConnection, HTTPSConnection
from urllib.parse import urlsplit

import openai
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from bench import cache_hits
from bench.stats import summary_ms
from cli.launcher import LocalMesh

QUESTION = "What are the applications of real-time AI in the financial industry?"
MAX_NEW_TOKENS = 32
GOAL_RATIO = 2.0


def bench(mesh: LocalMesh, rounds: int, per_round: int, block: int = 10) -> dict:
    access = mesh.gateway_access()
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": MAX_NEW_TOKENS}
    request = cache_hits.generate_request(QUESTION, MAX_NEW_TOKENS, gateway_pb2.CACHE_MODE_USE)
    headers = {"content-type": "application/json"}
    if access.api_key:
        headers["authorization"] = f"Bearer {access.api_key}"
    payload = json.dumps(body).encode()
    verify = str(mesh.tls_dir / "ca.crt") if mesh.tls_dir else True
    channel = access.channel()
    url = urlsplit(mesh.edge_url())
    http = (HTTPSConnection(url.hostname, url.port, timeout=30,
                                        context=ssl.create_default_context(cafile=verify))
            if url.scheme == "https" else HTTPConnection(url.hostname, url.port, timeout=30))
    sdk = openai.OpenAI(base_url=mesh.edge_url() + "/v1", api_key=access.api_key or "none", max_retries=0,
                        http_client=openai.DefaultHttpxClient(verify=verify))
    stub = gateway_pb2_grpc.GatewayStub(channel)

    def edge_http():
        http.request("POST", "/v1/chat/completions", body=payload, headers=headers)
        reply = http.getresponse()
        text = reply.read()
        if reply.status != 200 or not json.loads(text)["nlpmesh"]["cache_hit"]:
            raise RuntimeError(f"expected a cache hit through the edge: {reply.status} {text[:200]!r}")

    def edge_openai():
        if not sdk.chat.completions.create(model="", **body).model_extra["nlpmesh"]["cache_hit"]:
            raise RuntimeError("expected a cache hit through the edge (openai)")

    def grpc_hit():
        if not stub.Generate(request, timeout=10).cache_hit:
            raise RuntimeError("expected a cache hit: is the prompt cache up?")

    variants = {"grpc": grpc_hit, "edge_http": edge_http, "edge_openai": edge_openai}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    try:
        stub.Generate(cache_hits.generate_request(QUESTION, MAX_NEW_TOKENS, gateway_pb2.CACHE_MODE_REFRESH),
                      timeout=300)  # the answer, into the cache
        _until_hit(grpc_hit)
        for call in variants.values():  # warm connections and tiers
            cache_hits.timed_sync(call, 100)
        names = list(variants)
        for index in range(rounds):
            print(f"[bench] edge: round {index + 1}/{rounds}", flush=True)
            for turn in range(per_round // block):
                shift = turn % len(names)
                for name in names[shift:] + names[:shift]:
                    samples[name] += cache_hits.timed_sync(variants[name], block)
    finally:
        http.close()
        sdk.close()
        channel.close()
    result = {name: summary_ms(values) for name, values in samples.items()}
    base = result["grpc"]["p50_ms"]
    for name in ("edge_http", "edge_openai"):
        result[name]["ratio_to_grpc_p50"] = result[name]["p50_ms"] / base
    result["goal_ratio"] = GOAL_RATIO
    return result


def _until_hit(call) -> None:
    for _ in range(100):
        try:
            call()
            return
        except RuntimeError:
            time.sleep(0.05)
    raise RuntimeError("the answer never reached the prompt cache")


def lines(result: dict) -> list[str]:
    out = [f"{'cache hit: edge vs gRPC (client side)':<38}{'n':>7}{'p50 ms':>10}{'p99 ms':>10}  notes"]
    for name in ("grpc", "edge_http", "edge_openai"):
        row = result[name]
        notes = f"{row['ratio_to_grpc_p50']:.2f}x gRPC's p50" if "ratio_to_grpc_p50" in row else ""
        if name == "edge_http":
            notes += f" (goal <= {result['goal_ratio']:.0f}x)"
        out.append(f"{name:<38}{row['n']:>7}{row['p50_ms']:>10.3f}{row['p99_ms']:>10.3f}  {notes}")
    return out
