"""Concurrent Embed requests share forwards: one worker runs a forward while the next requests queue.

No request waits for a batch to fill: a forward starts as soon as the worker is free, with every text queued
by then (up to ``max_batch_texts``, whole requests in arrival order). Under load the queue fills while a
forward runs, so batches grow with the load and a lone caller pays for one forward only. A request whose
deadline passed, or whose caller left, before its forward is dropped without computing it.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram

from meshkit import span_names
from meshkit.errors import DeadlineExceeded, ResourceExhausted

BATCH_TEXTS = Histogram("nlpmesh_embedding_batch_texts", "Texts in one forward of the embedding model.",
                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
QUEUED_TEXTS = Gauge("nlpmesh_embedding_queued_texts", "Texts waiting for a forward.")
TEXTS = Counter("nlpmesh_embedding_texts_total", "Texts embedded.")
FORWARD_SECONDS = Histogram("nlpmesh_embedding_forward_seconds", "One forward of the embedding model.",
                            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))


@dataclass
class _Job:
    ids: list[list[int]]
    future: asyncio.Future
    deadline: float | None  # time.monotonic() past which nobody waits for it
    span_context: trace.SpanContext | None = None
    queued_at: float = field(default_factory=time.monotonic)


def torch_worker() -> ThreadPoolExecutor:
    """The one thread that runs the model: its load, warm-up and every forward. OpenMP keeps a team of threads
    per thread that calls into torch, and an idle team spins for a while: two such threads on a few cores
    slow every forward down, so no other thread of the process runs torch."""
    return ThreadPoolExecutor(1, thread_name_prefix="embedding-forward")


class EmbeddingQueue:
    """``forward(ids) -> [len(ids), dimensions]`` runs on ``worker`` (torch_worker()), never two at once."""

    def __init__(self, forward: Callable[[list[list[int]]], torch.Tensor], worker: ThreadPoolExecutor,
                 max_batch_texts: int, max_queued_texts: int, tracer: trace.Tracer):
        self._forward = forward
        self._max_batch = max_batch_texts
        self._max_queued = max_queued_texts
        self._tracer = tracer
        self._pending: deque[_Job] = deque()
        self._queued_texts = 0
        self._wake = asyncio.Event()
        self._worker = worker
        self._task: asyncio.Task | None = None
        self._recent_forward_s = 0.01  # what a full forward takes lately: the retry hint when full

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._worker.shutdown(wait=False, cancel_futures=True)

    async def embed(self, ids: list[list[int]], time_left_s: float | None) -> torch.Tensor:
        if self._queued_texts + len(ids) > self._max_queued:
            forwards_ahead = self._queued_texts / self._max_batch + 1
            raise ResourceExhausted(f"the embedding queue is full ({self._queued_texts} texts waiting)",
                                    retry_after_s=round(forwards_ahead * self._recent_forward_s, 3),
                                    reason="EMBEDDING_QUEUE_FULL")
        job = _Job(ids, asyncio.get_running_loop().create_future(),
                   None if time_left_s is None else time.monotonic() + time_left_s,
                   trace.get_current_span().get_span_context())
        self._pending.append(job)
        self._queued(len(ids))
        self._wake.set()
        return await job.future  # cancelled with the caller: the worker skips a done future

    def _queued(self, texts: int) -> None:
        self._queued_texts += texts
        QUEUED_TEXTS.set(self._queued_texts)

    def _take_batch(self) -> list[_Job]:
        """Whole jobs from the front, up to the batch's texts (one job, however large, goes alone)."""
        batch: list[_Job] = []
        texts = 0
        now = time.monotonic()
        while self._pending and (not batch or texts + len(self._pending[0].ids) <= self._max_batch):
            job = self._pending.popleft()
            self._queued(-len(job.ids))
            if job.future.done():
                continue
            if job.deadline is not None and now > job.deadline:
                job.future.set_exception(DeadlineExceeded("the deadline passed while the texts waited for a forward",
                                                          hop="embedding"))
                continue
            batch.append(job)
            texts += len(job.ids)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._take_batch()
                if not batch:
                    continue
                ids = [one for job in batch for one in job.ids]
                links = [trace.Link(job.span_context) for job in batch if job.span_context is not None]
                with self._tracer.start_as_current_span(span_names.EMBEDDING_FORWARD, links=links) as span:
                    span.set_attribute(span_names.EMBEDDING_BATCH_TEXTS, len(ids))
                    started = time.perf_counter()
                    try:
                        vectors = await loop.run_in_executor(self._worker, self._forward, ids)
                    except Exception as error:  # every waiting caller learns of it
                        for job in batch:
                            if not job.future.done():
                                job.future.set_exception(error)
                        continue
                elapsed = time.perf_counter() - started
                FORWARD_SECONDS.observe(elapsed)
                BATCH_TEXTS.observe(len(ids))
                TEXTS.inc(len(ids))
                self._recent_forward_s = 0.8 * self._recent_forward_s + 0.2 * elapsed * self._max_batch / len(ids)
                start = 0
                for job in batch:
                    if not job.future.done():
                        job.future.set_result(vectors[start:start + len(job.ids)])
                    start += len(job.ids)
