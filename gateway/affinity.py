"""Prefix-affine routing of generations over the inference replicas.

Requests that share a prompt prefix go to the same replica, so its local prefix-KV
tier (services/inference/prefix.py) keeps hitting; Redis stays the shared tier behind
it. The route key is a hash of the model, the tenant and the prompt's first ``block_tokens`` token
ids (16 by default), which the gateway has from the tokenizer hop: prompts that agree that
far (a system prompt, a template's head) share a replica. It need not equal the inference
service's ``prefix_block_tokens`` (the unit its KV blocks are cut in, 4): a longer route key
only spreads prompts with a short common head over more replicas. A prompt no longer than
``block_tokens`` gets no key, and goes round_robin.

The key picks a replica by consistent hashing (a ring of ``VNODES`` points per
endpoint, so adding or losing a replica moves only its share of the keys) over the
endpoints that are ready: their channel is READY, which with client-side health
checks means SERVING (a draining replica is not). Bounded load (consistent hashing
with bounded loads, Mirrokni et al. 2018): a replica takes the call only while its
generations in flight from this gateway stay within ``ceil(load_factor * (in flight
+ 1) / ready replicas)``, and only if its latest load report (meshkit/wire.py,
on every call) did not say it was full within ``full_hold_s``;
otherwise the next endpoint along the ring, so a hot prefix spills to a neighbour
instead of queueing. Each endpoint has a channel of its own, watched by the same
service config as the balanced channel (gateway/balancing.py).
"""
from __future__ import annotations

import hashlib
import math
import time
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import grpc

from meshkit.wire import InferenceLoad

VNODES = 64


def route_key(token_ids: Sequence[int], block_tokens: int, tenant: str, model: str) -> bytes | None:
    """The hash a prompt is routed on; None when it has no full block to reuse (at least one token is
    always left to prefill, as in the inference service). The model is in it: the same token ids mean
    another prompt to another model, whose replicas hold KV blocks of their own."""
    if block_tokens < 1 or len(token_ids) <= block_tokens:
        return None
    digest = hashlib.blake2b(digest_size=16)
    for part in (model, tenant):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(b"".join(int(t).to_bytes(4, "little", signed=False) for t in token_ids[:block_tokens]))
    return digest.digest()


def _point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class HashRing:
    """Consistent hashing: each endpoint at ``vnodes`` points; a key walks clockwise from its own."""

    def __init__(self, endpoints: Sequence[str], vnodes: int = VNODES):
        self.endpoints = tuple(dict.fromkeys(endpoints))
        points = sorted((_point(f"{endpoint}#{i}".encode()), endpoint)
                        for endpoint in self.endpoints for i in range(vnodes))
        self._hashes = [h for h, _ in points]
        self._owners = [e for _, e in points]

    def walk(self, key: bytes) -> Iterator[str]:
        """Every endpoint once, in ring order from ``key``'s point."""
        if not self._hashes:
            return
        start = bisect_right(self._hashes, _point(key))
        seen: set[str] = set()
        for i in range(len(self._owners)):
            owner = self._owners[(start + i) % len(self._owners)]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == len(self.endpoints):
                    return


@dataclass
class _Endpoint:
    channel: grpc.aio.Channel
    in_flight: int = 0
    load: InferenceLoad | None = None
    seen_at: float = 0.0


class AffineRouter:
    """Picks the inference endpoint of a route key; keeps each endpoint's load."""

    def __init__(self, channels: dict[str, grpc.aio.Channel], load_factor: float = 1.25, full_hold_s: float = 0.5,
                 clock: Callable[[], float] = time.monotonic):
        if load_factor < 1.0:
            raise ValueError("load_factor must be at least 1")
        self._endpoints = {address: _Endpoint(channel) for address, channel in channels.items()}
        self._ring = HashRing(list(channels))
        self._load_factor = load_factor
        self._full_hold_s = full_hold_s
        self._clock = clock

    def update(self, channels: dict[str, grpc.aio.Channel]) -> None:
        """Routes over ``channels`` from now on (a re-resolved name); kept endpoints keep their load."""
        self._endpoints = {address: self._endpoints.get(address) or _Endpoint(channel)
                           for address, channel in channels.items()}
        self._ring = HashRing(list(channels))

    def replace_channels(self, channels: dict[str, grpc.aio.Channel]) -> None:
        """The same endpoints over new channels (new TLS credentials); each keeps its load and calls in flight."""
        for address, channel in channels.items():
            self._endpoints[address].channel = channel

    @property
    def endpoints(self) -> list[str]:
        return list(self._endpoints)

    def channel(self, endpoint: str) -> grpc.aio.Channel:
        return self._endpoints[endpoint].channel

    def ready(self, endpoint: str) -> bool:
        """READY: connected, and SERVING by its health checks."""
        return self._endpoints[endpoint].channel.get_state(try_to_connect=True) == grpc.ChannelConnectivity.READY

    def in_flight(self, endpoint: str) -> int:
        return self._endpoints[endpoint].in_flight

    def pick(self, key: bytes, exclude: frozenset[str] = frozenset()) -> str | None:
        """The endpoint for ``key``: its ring owner, or the next along the ring that is ready and within its
        bounded load; the least loaded ready one when every one is over; None when none is ready."""
        ready = [e for e in self._ring.walk(key) if e not in exclude and self.ready(e)]
        if not ready:
            return None
        total = sum(self._endpoints[e].in_flight for e in ready)
        bound = math.ceil(self._load_factor * (total + 1) / len(ready))
        for endpoint in ready:
            if self._endpoints[endpoint].in_flight + 1 <= bound and not self._full(endpoint):
                return endpoint
        return min(ready, key=lambda e: (self._full(e), self._endpoints[e].in_flight))

    def _full(self, endpoint: str) -> bool:
        state = self._endpoints[endpoint]
        return state.load is not None and state.load.full and self._clock() - state.seen_at < self._full_hold_s

    def observe(self, endpoint: str, load: InferenceLoad | None) -> None:
        # A call may outlive its endpoint's place on the ring (the name stopped resolving to it
        # while the call ran, as a replica draining in a rolling update does): nothing to keep then.
        state = self._endpoints.get(endpoint)
        if load is not None and state is not None:
            state.load, state.seen_at = load, self._clock()

    @contextmanager
    def call(self, endpoint: str) -> Iterator[None]:
        """Counts one generation in flight to ``endpoint`` while the block runs."""
        state = self._endpoints[endpoint]
        state.in_flight += 1
        try:
            yield
        finally:
            state.in_flight -= 1
