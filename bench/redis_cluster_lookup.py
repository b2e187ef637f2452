"""Prompt-cache hits and prefix-KV reads: one redis-server against a 3-master Redis Cluster.

    PYTHONPATH=$PWD:$PWD/gen .venv/bin/python -m bench.redis_cluster_lookup [--count 2000]

Starts both on loopback (tests/conftest.py, tests/redis_cluster.py), stores answers of
several tenants and one prefix chain in each, then times ``PromptCache.lookup`` hits and
``PrefixCache.match`` (one MGET of the chain, nothing local) in alternating blocks,
so that both see the same machine load. Prints p50 and p99 in microseconds.
"""
from __future__ import annotations

import argparse
import asyncio
import time

import torch

from meshkit.percentile import percentile
from meshkit.sampling import Sampling
from promptcache.keys import PromptCacheKey, TemplatePrompt
from promptcache.redis_tier import CachedAnswer, PromptCache, redis_client
from services.inference.prefix import PrefixCache, RedisBlocks
from tests.conftest import running_redis_server
from tests.redis_cluster import running_redis_cluster

ANSWER = CachedAnswer(text="A bond is a loan to an issuer." * 4, finish_reason=1, prompt_tokens=30,
                      completion_tokens=32, model="m1")
BLOCK, BLOCKS = 16, 8
SHAPE = (2, 30, 3, BLOCK, 64)  # SmolLM2-135M's block: 360 KiB in bfloat16, 720 KiB in float32


def keys(count: int = 16) -> list[PromptCacheKey]:
    return [PromptCacheKey(f"tenant-{n % 4}", "m1", "r1", TemplatePrompt(f"template-{n % 3}", "1", {"n": n}),
                           Sampling(max_new_tokens=32)) for n in range(count)]


async def lookups(cache: PromptCache, count: int) -> list[float]:
    samples, all_keys = [], keys()
    for n in range(count):
        started = time.perf_counter()
        if await cache.lookup(all_keys[n % len(all_keys)]) is None:
            raise RuntimeError("expected a hit")
        samples.append(time.perf_counter() - started)
    return samples


def prefix_reads(url: str, count: int) -> list[float]:
    blocks = RedisBlocks(url, key_prefix="bench:kv", budget_s=2.0)
    writer = PrefixCache(model="m", revision="r", block_tokens=BLOCK, shared=blocks, redis_min_sightings=1)
    writer.configure(SHAPE[1], SHAPE[2], SHAPE[4], torch.float32)
    ids = list(range(1000, 1000 + BLOCKS * BLOCK + 1))
    chain = writer.keys("acme", ids)
    kv = torch.randn((2, SHAPE[1], SHAPE[2], BLOCKS * BLOCK, SHAPE[4]))
    writer.remember(chain, 0, lambda start, end: kv[:, :, :, start:end].clone())
    blocks.flush()
    samples = []
    for _ in range(count):
        reader = PrefixCache(model="m", revision="r", block_tokens=BLOCK, shared=blocks, redis_min_sightings=1)
        reader.configure(SHAPE[1], SHAPE[2], SHAPE[4], torch.float32)
        started = time.perf_counter()
        if reader.match(chain).tokens != BLOCKS * BLOCK:
            raise RuntimeError("expected the whole chain from Redis")
        samples.append(time.perf_counter() - started)
    blocks.close()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--block", type=int, default=100, help="lookups per turn")
    args = parser.parse_args()
    with running_redis_server() as single, running_redis_cluster() as cluster:
        urls = {"single": single.url, "cluster": cluster.url}

        async def run() -> dict[str, list[float]]:
            caches = {name: PromptCache(redis_client(url), "bench:pc", ttl_s=600, timeout_s=1.0)
                      for name, url in urls.items()}
            for cache in caches.values():
                for key in keys():
                    assert await cache.store(key, ANSWER)
            samples: dict[str, list[float]] = {name: [] for name in caches}
            for turn in range(args.count // args.block):
                for name in (list(caches) if turn % 2 == 0 else list(caches)[::-1]):
                    samples[name] += await lookups(caches[name], args.block)
            for cache in caches.values():
                await cache.close()
            return samples

        hits = asyncio.run(run())
        reads = {name: prefix_reads(url, max(args.count // 20, 20)) for name, url in urls.items()}
    for what, samples in (("prompt-cache hit", hits), (f"prefix MGET of {BLOCKS} float32 blocks", reads)):
        for name, values in samples.items():
            micro = sorted(v * 1e6 for v in values)
            print(f"{what:38} {name:8} n={len(micro):5} p50={percentile(micro, 50):8.0f} us "
                  f"p99={percentile(micro, 99):8.0f} us")


if __name__ == "__main__":
    main()
