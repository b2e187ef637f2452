"""The inference service's Prometheus metrics: load on the engine and speed per request.

Queue depth and active sequences are read from the engine at scrape time.
Time to first token and tokens per second are measured where the servicer
streams, i.e. as the caller sees them (queue wait included in the first).
"""
from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

from services.inference.generation_types import Delta, Finished, FinishReason

QUEUE_DEPTH = Gauge("nlpmesh_inference_queue_depth", "Requests waiting for a decode slot.")
ACTIVE_SEQUENCES = Gauge("nlpmesh_inference_active_sequences", "Requests queued or generating.")
TTFT = Histogram(
    "nlpmesh_inference_time_to_first_token_seconds",
    "From a request's arrival at the engine to its first text (queue wait and prefill included).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
TOKENS_PER_SECOND = Histogram(
    "nlpmesh_inference_tokens_per_second",
    "One request's decode rate: tokens after the first over the time after the first.",
    buckets=(1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 500, 1000),
)
COMPLETION_TOKENS = Counter("nlpmesh_inference_completion_tokens_total", "Tokens generated.")
PROMPT_TOKENS = Counter("nlpmesh_inference_prompt_tokens_total", "Prompt tokens prefilled.")
FINISHED = Counter("nlpmesh_inference_requests_finished_total", "Generations ended, by finish reason.",
                   ["finish_reason"])

_finished = {reason: FINISHED.labels(reason.name.lower()) for reason in FinishReason}


_watched: list = []  # the engine the gauges read, if any


def watch_engine(engine) -> None:
    """Reads the gauges from ``engine`` at each scrape (the last engine watched wins)."""
    _watched[:] = [engine]
    QUEUE_DEPTH.set_function(lambda: engine.queue_depth)
    ACTIVE_SEQUENCES.set_function(lambda: engine.active_count)


def unwatch_engine(engine) -> None:
    """Stops reading ``engine`` (a closed engine must not be kept alive by the gauges)."""
    if _watched and _watched[0] is engine:
        _watched.clear()
        QUEUE_DEPTH.set_function(lambda: 0)
        ACTIVE_SEQUENCES.set_function(lambda: 0)


class GenerationTimer:
    """Watches one request's stream: ``seen(item)`` for each item the engine yields."""

    __slots__ = ("_finished", "_first", "_submitted")

    def __init__(self):
        self._submitted = time.perf_counter()
        self._first: float | None = None
        self._finished = False

    def abandoned(self) -> None:
        """The stream ended without its Finished item (the caller went away): a cancelled request.

        Its tokens are not counted: only the engine knows how many it made.
        """
        if not self._finished:
            self._finished = True
            _finished[FinishReason.CANCELLED].inc()

    def seen(self, item: Delta | Finished) -> None:
        now = time.perf_counter()
        if isinstance(item, Delta):
            if self._first is None:
                self._first = now
                TTFT.observe(now - self._submitted)
            return
        self._finished = True
        if self._first is None and item.completion_tokens > 0:
            # Tokens but no text (e.g. held back by a stop sequence): first token at the end.
            self._first = now
            TTFT.observe(now - self._submitted)
        COMPLETION_TOKENS.inc(item.completion_tokens)
        PROMPT_TOKENS.inc(item.prompt_tokens)
        _finished[item.finish_reason].inc()
        if item.completion_tokens > 1 and self._first is not None and now > self._first:
            TOKENS_PER_SECOND.observe((item.completion_tokens - 1) / (now - self._first))


# Recorded by the engine's worker thread.
BATCH_SIZE = Histogram(
    "nlpmesh_inference_batch_size", "Sequences in each batched decode step.",
    buckets=(1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32),
)
PREFILL_TOKENS = Counter("nlpmesh_inference_prefill_tokens_total", "Prompt tokens run through the model.")
PREFIX_LOOKUPS = Counter(
    "nlpmesh_inference_prefix_lookups_total",
    "Prefix KV lookups by tier (local, redis) and result (hit, miss, error: Redis failed or cooling down).",
    ["tier", "result"],
)
PREFIX_TOKENS_REUSED = Counter(
    "nlpmesh_inference_prefix_tokens_reused_total", "Prompt tokens whose prefill was skipped, by tier.", ["tier"])
PREFILL_BATCH_PROMPTS = Histogram(
    "nlpmesh_inference_prefill_batch_prompts", "Prompts whose chunks went through each packed prefill forward.",
    buckets=(1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32),
)
DEADLINE_REFUSALS = Counter(
    "nlpmesh_inference_deadline_refusals_total",
    "Requests refused before any compute: their first token could not come by their deadline.")
GRAMMARS = Counter(
    "nlpmesh_inference_guided_grammars_total",
    "Guided decoding's formats by outcome: compiled (a cache miss) or hit (a compiled one reused).", ["outcome"])
ESTIMATE_PROBES = Counter(
    "nlpmesh_inference_deadline_estimate_probes_total",
    "Requests the deadline estimate would have refused, run anyway because that estimate was measured long ago "
    "and no prefill was under way to measure it again.")
PREFILL_SECONDS_PER_TILE = Gauge(
    "nlpmesh_inference_prefill_seconds_per_tile",
    "The measured cost of one prefill GEMM tile through every layer (a moving average), which deadline "
    "refusals estimate from.")
