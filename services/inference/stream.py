"""The two sides of one request: the engine's Job and the caller's GenerationStream.

The worker thread delivers items to the Job; they cross to the caller's event
loop with ``loop.call_soon_threadsafe`` into the Job's ``asyncio.Queue``, which
the GenerationStream reads.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from services.inference.generation_types import Delta, Finished, FinishReason, GenerationRequest
from services.inference.sequence import Sequence
from services.inference.spans import NO_SPANS


class GenerationStream:
    """An async iterator of Delta items ending with one Finished.

    ``cancel()`` stops the request at its next decode step. Leaving an
    ``async with`` block cancels too, and so does dropping the stream unfinished,
    so a consumer that stops early frees its slot.
    """

    def __init__(self, job: Job, cancel: Callable[[Job], None]):
        self.request = job.request  # with defaults resolved
        self._job = job
        self._cancel = cancel
        self._done = False

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> Delta | Finished:
        if self._done:
            raise StopAsyncIteration
        item = await self._job.queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if isinstance(item, Finished):
            self._done = True
        return item

    def cancel(self) -> None:
        if not self._done and not self._job.cancelled:
            self._cancel(self._job)

    async def __aenter__(self) -> GenerationStream:
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.cancel()

    def __del__(self) -> None:
        # A consumer that dropped the stream unfinished must not keep the model busy.
        self.cancel()


class Job:
    """A request as the engine holds it: the caller's queue and loop, its sequence."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, spans=NO_SPANS):
        self.request = request
        self.submitted = time.monotonic()  # for the queue wait a refusal reports
        # (when, seconds to its first token) as the engine first estimated it, against its deadline (worker thread)
        self.estimate: tuple[float, float] | None = None
        self.spans = spans  # services.inference.spans: queue wait, prefill, decode
        self.queue: asyncio.Queue[Delta | Finished | BaseException] = asyncio.Queue()
        self.cancelled = False
        self.sequence: Sequence | None = None  # made and used by the worker thread only
        self.prefix_keys: list[bytes] = []  # the prompt's prefix-cache keys (worker thread)
        self.prefix_known = 0  # ... of which this many blocks were reused
        self.chunk = None  # the prefill chunk under way (services/inference/layered.py ChunkForward; worker thread)
        self._loop = loop

    def finished(self, reason: FinishReason) -> Finished:
        generated = len(self.sequence.generated) if self.sequence else 0
        logprobs = self.sequence.take_logprobs() if self.sequence else ()
        return Finished(reason, len(self.request.prompt_token_ids), generated, logprobs)

    def deliver(self, item: Delta | Finished | BaseException) -> None:
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening
            self.cancelled = True
