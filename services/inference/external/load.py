"""The engine's load, for the gateway's admission control: the engine's own count where its /metrics has one
(vLLM's ``vllm:num_requests_running`` and ``vllm:num_requests_waiting``), else the adapter's in-flight count."""
from __future__ import annotations

import asyncio
import logging

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("nlpmesh.inference.openai")

# Per-replica gauges that count the requests an engine holds (vLLM; SGLang names its own the same way).
LOAD_METRICS = ("vllm:num_requests_running", "vllm:num_requests_waiting",
                "sglang:num_running_reqs", "sglang:num_queue_reqs")


def requests_held(metrics_text: str) -> int | None:
    """The requests running and waiting in an engine's Prometheus text; None when it exposes neither."""
    total, seen = 0.0, False
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in LOAD_METRICS:
                total, seen = total + sample.value, True
    return round(total) if seen else None


class EngineLoad:
    """Polls each replica's /metrics; ``engine_held`` is the sum over the replicas that report, or None."""

    def __init__(self, http: aiohttp.ClientSession, urls: tuple[str, ...], poll_s: float):
        self._http = http
        self._urls = urls
        self._poll_s = poll_s
        self._held: dict[str, int] = {}
        self._silent: set[str] = set()  # replicas whose /metrics has no load gauge: not asked again

    @property
    def engine_held(self) -> int | None:
        return sum(self._held.values()) if self._held else None

    async def run(self) -> None:
        if self._poll_s <= 0:
            return
        while True:
            await asyncio.gather(*(self._poll(url) for url in self._urls if url not in self._silent))
            await asyncio.sleep(self._poll_s)

    async def _poll(self, url: str) -> None:
        try:
            async with self._http.get(f"{url}/metrics",
                                      timeout=aiohttp.ClientTimeout(total=self._poll_s or 1.0)) as response:
                status = response.status
                text = await response.text() if status == 200 else ""
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
            self._held.pop(url, None)  # unreachable or unreadable: its load is unknown, not zero
            return
        held = requests_held(text) if status == 200 else None
        if held is None:
            self._held.pop(url, None)
            if status in (200, 404):
                log.info("inference engine %s has no load metrics: the adapter counts its own requests", url)
                self._silent.add(url)
            return
        self._held[url] = held
