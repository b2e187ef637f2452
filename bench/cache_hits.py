"""Cache-hit latency through the gateway, beside a bare gRPC hop and a bare Redis GET."""
from __future__ import annotations

import asyncio
import time

import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from cli.connect import GatewayAccess


def timed_sync(call, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return samples


def hit_c1(stub, request, count: int) -> list[float]:
    def once():
        reply = stub.Generate(request, timeout=10)
        if not reply.cache_hit:
            raise RuntimeError("expected a cache hit: is the prompt cache up?")
    return timed_sync(once, count)


def hit_c1_interleaved(stubs: dict, request, count: int, block: int = 10) -> dict[str, list[float]]:
    """``count`` hits on each stub, taken in blocks of ``block`` in turn, the order rotating.

    On a shared machine the load moves within seconds: fine-grained turns give
    every gateway the same conditions, and the rotation no gateway the same place.
    """
    names = list(stubs)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for turn in range(count // block):
        shift = turn % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name] += hit_c1(stubs[name], request, block)
    return samples


def empty_rpc_c1(channel, count: int) -> list[float]:
    stub = health_pb2_grpc.HealthStub(channel)
    return timed_sync(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=10), count)


def redis_get_c1(url: str, key: str, count: int) -> list[float]:
    client = redis.Redis.from_url(url)
    client.set(key, b"x" * 1024)
    try:
        return timed_sync(lambda: client.get(key), count)
    finally:
        client.delete(key)
        client.close()


def hit_concurrent(access: GatewayAccess, request, workers: int, per_worker: int) -> tuple[list[float], float]:
    """Latencies of ``workers`` concurrent callers on one channel, and the throughput (req/s)."""

    async def main():
        async with access.aio_channel() as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            await stub.Generate(request, timeout=10)
            samples: list[float] = []

            async def worker():
                for _ in range(per_worker):
                    started = time.perf_counter()
                    reply = await stub.Generate(request, timeout=10)
                    samples.append(time.perf_counter() - started)
                    if not reply.cache_hit:
                        raise RuntimeError("expected a cache hit")

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(workers)))
            return samples, len(samples) / (time.perf_counter() - started)

    return asyncio.run(main())


def generate_request(question: str, max_new_tokens: int, cache_mode: int) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(
        chat=gateway_pb2.Chat(messages=[gateway_pb2.ChatMessage(role="user", content=question)]),
        sampling=gateway_pb2.SamplingParams(max_new_tokens=max_new_tokens),
        cache_mode=cache_mode,
    )
