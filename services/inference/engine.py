"""The inference engine: one worker thread owns the model; callers get async streams.

    engine = Engine(model, tokenizer, EngineOptions())
    stream = engine.submit(GenerationRequest(prompt_ids, Sampling(max_new_tokens=32)))
    async for item in stream:    # Delta(text)..., then Finished(reason, prompt, completion)
        ...
    engine.close()

Continuous batching: every turn of the worker loop
1. drops cancelled requests (their KV row is free for the next one);
2. admits waiting requests, up to ``max_running``: each is prefilled alone
   (after copying any cached prefix of its prompt into its row) and yields its
   first token;
3. runs ONE forward for all running sequences, one new token each.
A request joins at any step and leaves when it is done, stopped or cancelled,
while the others go on. Each keeps its own sampler, seed, stop sequences and
limits. Rows never see each other's tokens, and the KV layout (services/inference/kv.py)
makes a row's numbers independent of the batch, so greedy output is the same
alone or together.

Results cross to the caller's event loop with ``loop.call_soon_threadsafe``
into a per-request ``asyncio.Queue``.
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
from services.inference import metrics
from services.inference.cpu_features import read_cpu_features
from services.inference.generation_types import Delta, Finished, FinishReason, GenerationRequest
from services.inference.kv import SlotKV
from services.inference.precision import check_row_independence, kernel_paths, prefill_phase
from services.inference.prefix import NO_MATCH, PrefixCache
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
    max_running: int = 8  # sequences decoded together (the batch's KV rows)
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
        prefix_cache: PrefixCache | None = None,
    ):
        self.model_name = model_name
        self.revision = revision
        self.tokenizer = tokenizer
        self.context_length: int = model.config.max_position_embeddings
        self.limits = _limits(model, options)
        self.model = model.eval()
        self._options = options
        _check_kernels(model, options)
        self._eos_ids = eos_token_ids(model)
        self._text_tokenizer = tokenizer.backend_tokenizer  # the fast (Rust) tokenizer
        kv_dtype = model.get_input_embeddings().weight.dtype
        self._kv = SlotKV(model.config, options.max_running, kv_dtype)
        self._prefix = prefix_cache
        if prefix_cache is not None:
            prefix_cache.configure(self._kv.layers, self._kv.kv_heads, self._kv.head_dim, kv_dtype)
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
    def running_count(self) -> int:
        """Requests admitted to the running batch."""
        return len(self._running)

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
        if self._prefix is not None:
            self._prefix.close()

    def _cancel(self, job: Job) -> None:
        job.cancelled = True
        with self._lock:
            if job in self._waiting:  # never started: finish it here and now
                self._waiting.remove(job)
                job.deliver(job.finished(FinishReason.CANCELLED))

    def _work(self) -> None:
        torch.set_num_threads(self._options.threads)
        with torch.inference_mode():
            while (admitted := self._next_round()) is not None:
                self._drop_cancelled()
                for job in admitted:
                    if not job.cancelled:
                        self._start(job)
                if self._kv.used:
                    self._decode_step()
                if not self._running:
                    self._kv.shrink()
        self._fail_remaining()

    def _next_round(self) -> list[Job] | None:
        """The jobs admitted for this turn (maybe none); blocks while idle; None to stop."""
        with self._lock:
            while not self._closing and not self._waiting and not self._running:
                self._lock.wait()
            if self._closing:
                return None
            free = self._options.max_running - len(self._running)
            admitted = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
            self._running += admitted
            return admitted

    def _drop_cancelled(self) -> None:
        for job in [job for job in self._running if job.cancelled]:
            self._retire(job, job.finished(FinishReason.CANCELLED))

    def _start(self, job: Job) -> None:
        """Prefills one admitted request into a free row and emits its first token."""
        job.spans.admitted()
        prompt = job.request.prompt_token_ids
        try:
            sequence = job.sequence = Sequence(job.request, self._text_tokenizer, self._eos_ids)
            row = self._kv.allocate(job)
            keys = self._prefix.keys(job.request.tenant, prompt) if self._prefix else []
            match = self._prefix.match(keys) if keys else NO_MATCH
            if match.kv is not None:
                self._kv.write(row, 0, match.kv)
            logits = self._prefill(row, prompt, match.tokens)
            metrics.PREFILL_TOKENS.inc(len(prompt) - match.tokens)
            sequence.length = len(prompt)
            if keys:
                known = match.tokens // self._prefix.block_tokens
                self._prefix.remember(keys, known, lambda start, end: self._kv.read(row, start, end))
            text = sequence.accept(logits[0])
        except Exception as error:
            # The worker thread has no request context: the line names its request itself.
            log.exception("prefill failed", extra={"request_id": job.request.request_id})
            self._retire(job, error)
            return
        self._emit(job, text)

    def _prefill(self, row: int, prompt: list[int], start: int) -> torch.Tensor:
        """Runs prompt[start:] into ``row`` in one forward; the last position's logits.

        Under ``prefill_phase`` every layer takes the float32 GEMM and attention in
        16-row tiles placed by absolute position, so a row's bits do not depend on how
        many rows there are: the tail after a reused prefix comes out as it would in a
        cold prefill, and the prefix cache never changes a greedy answer.
        """
        positions, mask = self._kv.prefill(row, start, len(prompt) - start)
        with prefill_phase(start):
            return self._forward([prompt[start:]], positions, mask)

    def _decode_step(self) -> None:
        """One forward for every running sequence (rows 0 .. B - 1), one token each."""
        jobs: list[Job] = list(self._kv.owners)
        sequences = [job.sequence for job in jobs]
        try:
            positions, mask = self._kv.decode([sequence.length for sequence in sequences])
            logits = self._forward([[sequence.next_token] for sequence in sequences], positions, mask)
            metrics.BATCH_SIZE.observe(len(jobs))
            texts = []
            for index, sequence in enumerate(sequences):
                sequence.length += 1
                texts.append(sequence.accept(logits[index]))
        except Exception as error:
            log.exception("a decode step failed for %d requests", len(jobs))
            for job in jobs:
                self._retire(job, error)
            return
        for job, text in zip(jobs, texts):
            self._emit(job, text)

    def _forward(self, rows: list[list[int]], positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The last position's logits, (batch, 1, vocab), for a forward the KV rows were set up for."""
        output = self.model(
            input_ids=torch.tensor(rows), position_ids=positions, attention_mask=mask, cache=self._kv, use_cache=True,
            logits_to_keep=1,
        )
        return output.logits[:, -1:, :]

    def _emit(self, job: Job, text: str) -> None:
        sequence = job.sequence
        job.spans.stepped(sequence.finish_reason is not None)
        if text:
            job.deliver(Delta(text))
        if sequence.finish_reason is not None:
            self._retire(job, job.finished(sequence.finish_reason))

    def _retire(self, job: Job, last: Finished | BaseException) -> None:
        if job in self._kv.owners:
            self._kv.free(job)
        with self._lock:
            self._running.remove(job)
        job.spans.finished(last)
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


def _check_kernels(model: PreTrainedModel, options: EngineOptions) -> None:
    """Logs the CPU and the kernels; raises ValueError (RowDependence) when the model's precision
    cannot give a row the same bits whatever the batch on this CPU."""
    features = read_cpu_features()
    threads = torch.get_num_threads()
    torch.set_num_threads(options.threads)  # as the worker will run
    try:
        check_row_independence(model, options.max_running, features)
    finally:
        torch.set_num_threads(threads)
    log.info("CPU %s; kernels: %s", features.summary(), kernel_paths(model))


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
