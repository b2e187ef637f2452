"""The inference engine: one worker thread owns the model; callers get async streams.

    engine = Engine(model, tokenizer, EngineOptions())
    stream = engine.submit(GenerationRequest(prompt_ids, SamplingConfig(max_new_tokens=32)))
    async for item in stream:    # Delta(text)..., then Finished(reason, prompt, completion)
        ...
    engine.close()

The worker interleaves the running requests round-robin, one decode step each,
every request with its own KV cache. Results cross to the caller's event loop
with ``loop.call_soon_threadsafe`` into a per-request ``asyncio.Queue``.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from meshkit.errors import ResourceExhausted, Unavailable
from services.inference.generation import Delta, Finished, FinishReason, GenerationRequest
from services.inference.sequence import Sequence
from services.inference.spans import job_spans
from services.inference.stream import GenerationStream, Job
from services.inference.validation import RequestLimits, resolve_request

log = logging.getLogger("nlpmesh.inference.engine")

# What a refused caller is told to wait: about one short generation.
RETRY_AFTER_S = 1.0


@dataclass(frozen=True)
class EngineOptions:
    threads: int = 2
    max_queue: int = 64
    max_running: int = 8
    default_max_new_tokens: int = 256
    max_new_tokens_limit: int = 2048
    max_stop_sequences: int = 4
    max_stop_chars: int = 64


class Engine:
    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        options: EngineOptions = EngineOptions(),
        *,
        model_name: str = "",
        revision: str = "",
    ):
        self.model_name = model_name
        self.revision = revision
        self.tokenizer = tokenizer
        self.context_length: int = model.config.max_position_embeddings
        self.limits = _limits(model, options)
        self._model = model.eval()
        self._options = options
        self._eos_ids = eos_token_ids(model)
        self._text_tokenizer = tokenizer.backend_tokenizer  # the fast (Rust) tokenizer
        self._lock = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._closing = False
        self._worker = threading.Thread(target=self._work, name="inference-engine", daemon=True)
        self._worker.start()

    @property
    def active_count(self) -> int:
        """Requests queued or running."""
        return len(self._waiting) + len(self._running)

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiting)

    def submit(self, request: GenerationRequest) -> GenerationStream:
        """Queues a request; call from the event loop that will consume the stream.

        Raises InvalidArgument for a bad request and ResourceExhausted, at once,
        when the engine already holds max_running + max_queue requests.
        """
        request = resolve_request(request, self.limits)
        job = Job(request, asyncio.get_running_loop(), job_spans(request, self.model_name))
        with self._lock:
            if self._closing:
                raise Unavailable("the inference engine is shutting down")
            if self.active_count >= self._options.max_running + self._options.max_queue:
                raise ResourceExhausted("the inference queue is full", retry_after_s=RETRY_AFTER_S)
            self._waiting.append(job)
            self._lock.notify()
        return GenerationStream(job, self._cancel)

    def close(self, timeout: float | None = 10.0) -> None:
        """Stops the worker; requests still held end with Unavailable."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        self._worker.join(timeout)

    def _cancel(self, job: Job) -> None:
        job.cancelled = True
        with self._lock:
            if job in self._waiting:  # never started: finish it here and now
                self._waiting.remove(job)
                job.deliver(job.finished(FinishReason.CANCELLED))

    def _work(self) -> None:
        torch.set_num_threads(self._options.threads)
        with torch.inference_mode():
            while (jobs := self._next_round()) is not None:
                for job in jobs:
                    self._advance(job)
        self._fail_remaining()

    def _next_round(self) -> list[Job] | None:
        """The running jobs after admitting waiting ones; blocks while idle; None to stop."""
        with self._lock:
            while not self._closing and not self._waiting and not self._running:
                self._lock.wait()
            if self._closing:
                return None
            while self._waiting and len(self._running) < self._options.max_running:
                self._running.append(self._waiting.popleft())
            return list(self._running)

    def _advance(self, job: Job) -> None:
        """One decode step for one job, or its end if it was cancelled."""
        if job.cancelled:
            self._retire(job, job.finished(FinishReason.CANCELLED))
            return
        try:
            if job.sequence is None:
                job.spans.admitted()
                job.sequence = Sequence(job.request, self._model, self._text_tokenizer, self._eos_ids)
            text = job.sequence.step()
            job.spans.stepped(job.sequence.finish_reason is not None)
        except Exception as error:
            log.exception("generation failed for request %s", job.request.request_id)
            self._retire(job, error)
            return
        if text:
            job.deliver(Delta(text))
        if job.sequence.finish_reason is not None:
            self._retire(job, job.finished(job.sequence.finish_reason))

    def _retire(self, job: Job, last: Finished | BaseException) -> None:
        with self._lock:
            self._running.remove(job)
        job.spans.finished(last)
        job.sequence = None
        job.deliver(last)

    def _fail_remaining(self) -> None:
        with self._lock:
            jobs = list(self._waiting) + self._running
            self._waiting.clear()
            self._running.clear()
        for job in jobs:
            error = Unavailable("the inference engine shut down")
            job.spans.finished(error)
            job.deliver(error)


def eos_token_ids(model: PreTrainedModel) -> frozenset[int]:
    """The end-of-sequence ids from the model's generation config (an int or a list)."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def _limits(model: PreTrainedModel, options: EngineOptions) -> RequestLimits:
    return RequestLimits(
        context_length=model.config.max_position_embeddings,
        vocab_size=model.config.vocab_size,
        default_max_new_tokens=options.default_max_new_tokens,
        max_new_tokens_limit=options.max_new_tokens_limit,
        max_stop_sequences=options.max_stop_sequences,
        max_stop_chars=options.max_stop_chars,
    )
