"""The inference engine: one worker thread owns the model; callers get async streams.

    engine = Engine(model, tokenizer, EngineOptions())
    stream = engine.submit(GenerationRequest(prompt_ids, Sampling(max_new_tokens=32)))
    async for item in stream:    # Delta(text)..., then Finished(reason, prompt, completion)
        ...
    engine.close()

Continuous batching: every turn of the worker loop
1. drops cancelled requests (their KV row is free for the next one);
2. refuses, before any compute, each waiting request whose first token can no
   longer come by its deadline (``_refuse_late``), and admits waiting requests,
   earliest deadline first, up to ``max_running``, into the prefill line, which
   is kept in earliest-deadline-first order too;
3. prefills chunks of the prompts from the head of that line, packed into one
   forward (services/inference/layered.py ``PackedForward``), under the step's
   token budget (``max_batched_tokens``, vLLM's ``max_num_batched_tokens``):
   each decoding sequence counts one token, the rest goes to prompt tokens, in
   whole GEMM tiles (at least one per turn). Beside decoding streams a turn's
   prefill also keeps to a time budget (``prefill_share`` decode steps): a
   forward's decoder layers are spread over turns. A long prompt is thus
   prefilled over many turns, so it never stalls the running streams for its
   whole duration; with nothing decoding, the prompts in line go whole, packed
   up to ``max_prefill_batch_tokens``. A prompt whose last chunk is done yields
   its first token and joins the batch;
4. runs ONE forward for all decoding sequences, one new token each.
A request joins at any step and leaves when it is done, stopped or cancelled,
while the others go on. Each keeps its own sampler, seed, stop sequences and
limits. Rows never see each other's tokens, and the KV layout (services/inference/kv.py)
makes a row's numbers independent of the batch, so greedy output is the same
alone or together. Chunks end on GEMM tile boundaries and attend over the whole
prompt's width, so a chunked prompt gets the very bits of one forward.

Results cross to the caller's event loop with ``loop.call_soon_threadsafe``
into a per-request ``asyncio.Queue``.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from meshkit.cpu_features import read_cpu_features
from meshkit.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from services.inference import metrics
from services.inference.decode_step import DecodeStep, decode_step_for
from services.inference.families import Family, family_of
from services.inference.generation_types import Delta, Finished, FinishReason, GenerationRequest
from services.inference.guided import GuidedDecoding
from services.inference.kernel_checks import (
    PLACEMENT_NOTES,
    check_row_independence,
    choose_min_tiles,
    choose_one_tile_parts,
    choose_tile_placement,
)
from services.inference.kernel_plan import KernelPlan, kernel_plan
from services.inference.kv import INITIAL_CAPACITY, SlotKV
from services.inference.layered import ChunkForward, PackedForward
from services.inference.precision import kernel_paths, model_precision
from services.inference.prefix import NO_MATCH, PrefixCache
from services.inference.sequence import Sequence
from services.inference.spans import job_spans
from services.inference.stream import GenerationStream, Job
from services.inference.tiles import GEMM_TILE_ROWS, first_row
from services.inference.validation import RequestLimits, resolve_request

log = logging.getLogger("nlpmesh.inference.engine")

# A prefill cost measured longer ago than this, with no prefill under way to measure it again, no longer
# refuses the head of the line: that request runs, and its measurement replaces the old average (else an
# estimate inflated by a spell of load would refuse every request with a deadline, and with no prefill run
# it would never be corrected).
_ESTIMATE_STALE_S = 5.0
_EMA = 0.2  # the weight of the latest measurement in the moving averages of step and layer times

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
    # A turn's token budget: one per decoding sequence, the rest for prompt tokens in
    # whole GEMM tiles (GEMM_TILE_ROWS), at least one tile; 0 prefills every prompt in one forward.
    max_batched_tokens: int = 256
    # With nothing decoding, the prompts in line are prefilled whole, packed into forwards of at most this
    # many prompt tokens (a first prompt longer than that goes alone, in one forward).
    max_prefill_batch_tokens: int = 512
    # Beside decoding streams, a turn's prefill runs at most this many decode steps' time: a chunk's
    # decoder layers are spread over turns to keep to it (at least one layer a turn); 0: no time limit.
    # Smaller keeps a running stream's gaps even, larger gets a long prompt its first token sooner; the
    # default is where the bench (bench/engine_speed.py, "prefill beside decode") found the running
    # stream's p99 gap within a few times its median alone on both CPU kinds.
    prefill_share: float = 0.5
    # KV buffers grown past their initial size for a long prompt are kept until the engine has
    # been idle this long (s): growing them again (allocating, zeroing and copying every layer's
    # buffers) would stall every running stream at each long prompt. 0: dropped as soon as it is idle.
    kv_shrink_idle_s: float = 30.0
    # Guided decoding: formats (schemas, regexes, choice lists) kept compiled, the least recently used
    # dropped beyond this many.
    max_grammars: int = 64


class StepTime(NamedTuple):
    """One decode step's wall time, in seconds, by part (for the bench)."""
    batch: int
    forward: float  # KV and mask set-up and the model's forward
    sampling_and_text: float  # each sequence's next token and the text it releases
    delivery: float  # handing results to the callers' event loops, retiring finished requests


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
        # The layout the engine's forwards follow; a model of another family is refused here, at start.
        self.family: Family = family_of(model.config)
        self.tokenizer = tokenizer
        self.context_length: int = model.config.max_position_embeddings
        self.limits = _limits(model, options)
        self.model = model.eval()
        # How the model's kernels run (the prefill tiles' placement, a one-tile GEMM's parts, whether a
        # forward is a prefill): chosen for this CPU by the start-up checks, held by the model, not the process.
        self.kernels: KernelPlan = kernel_plan(model)
        self._options = options
        self._eos_ids = eos_token_ids(model, tokenizer, self.family)
        # The decode step without transformers' wrappers (bit-identical logits; made in the worker, as
        # joining layers runs torch); None: the model's forward.
        self._decode: DecodeStep | None = None
        self._text_tokenizer = tokenizer.backend_tokenizer  # the fast (Rust) tokenizer
        self._guided: GuidedDecoding | None = None  # made at the first constrained request (prepare_guided)
        self._guided_lock = threading.Lock()
        kv_dtype = model.get_input_embeddings().weight.dtype
        self.device = model.device
        self._kv = SlotKV(model.config, options.max_running, kv_dtype, self.device)
        self._prefix = prefix_cache
        if prefix_cache is not None:
            prefix_cache.configure(self._kv.layers, self._kv.kv_heads, self._kv.head_dim, kv_dtype,
                                   computed_by=_kernels_name(model, kv_dtype))
        self._lock = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []  # admitted: being prefilled, waiting for it, or decoding
        self._prefills: list[Job] = []  # admitted, prompt not yet all in KV: the line, earliest deadline first
        self._batch: _Batch | None = None  # the packed prefill forward under way (its jobs are in the line)
        self._closing = False
        self.worker_threads = 0
        # Recent costs, for the prefill's time budget beside decoding streams (moving averages, seconds):
        self._step_s: float | None = None  # a decode step
        self._layer_s: float | None = None  # one decoder layer of one prefill GEMM tile
        self._layer_measured_at: float | None = None  # when (time.monotonic()) a prefill last measured it
        # Actual over estimated first-token time of recent requests (a moving average): the deadline estimate's
        # correction, learnt from what the estimates missed (packed forwards cost less a tile than one alone).
        self._estimate_bias = 1.0
        # Bumped by forget_costs: a decode step begun before it does not write its cost after it (the step's
        # last tokens reach their callers before its cost is written).
        self._cost_epoch = 0
        # False from an idle engine until its first decode step: the prompts admitted meanwhile
        # (a burst) stall nobody, so they are all prefilled whole before decoding starts.
        self._decoding_started = False
        self.step_times: collections.deque[StepTime] = collections.deque(maxlen=4096)  # the latest decode steps
        # The start-up checks run torch too, so in the worker: its OpenMP team is then the only one the
        # engine makes (services/inference/threads.py). A check that fails is raised here.
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._worker = threading.Thread(target=self._work, name="inference-engine", daemon=True)
        self._worker.start()
        self._started.wait()
        if self._start_error is not None:
            self._worker.join()
            if prefix_cache is not None:
                prefix_cache.close()
            raise self._start_error

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

    def prepare_guided(self) -> GuidedDecoding:
        """Guided decoding's view of the vocabulary (about half a second to make): at the first constrained
        request, or at the service's warm-up so that no request waits for it."""
        with self._guided_lock:
            if self._guided is None:
                self._guided = GuidedDecoding(self.tokenizer, self.model.config.vocab_size, self._eos_ids,
                                              self._options.max_grammars)
            return self._guided

    def forget_costs(self) -> None:
        """Drops the measured costs of a decode step and of a prefill tile (the deadline estimate's basis), as
        after the warm-up: the first forwards pay for lazy set-up, and would make every estimate run long."""
        with self._lock:
            self._step_s = self._layer_s = self._layer_measured_at = None
            self._estimate_bias = 1.0
            self._cost_epoch += 1

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
        try:
            if self.model.device.type == "cpu":
                _check_kernels(self.model, self._options)
                self._decode = decode_step_for(self.model)
                log.info("decode step: %s", "the model's forward" if self._decode is None else self._decode.description)
            else:
                log.info("device %s: the model's own kernels (no batch-invariance check off the CPU)", self.device)
        except BaseException as error:  # refused at start: the constructor raises it
            self._start_error = error
            return
        finally:
            self._started.set()
        torch.set_num_threads(self._options.threads)
        self.worker_threads = torch.get_num_threads()  # the intra-op threads the forwards get (logged)
        log.info("engine worker: %d torch threads", self.worker_threads)
        try:
            with torch.inference_mode():
                while (admitted := self._next_round()) is not None:
                    self._drop_cancelled()
                    self._prefills.extend(job for job in admitted if not job.cancelled)
                    self._prefills.sort(key=_deadline_order)  # stable: first come first among equal deadlines
                    self._prefill_turn()
                    if self._kv.ready and (self._decoding_started or not self._prefills):
                        self._decode_step()
                        self._decoding_started = True
                    if not self._running:
                        self._decoding_started = False
        except BaseException:
            # A fault outside the per-batch handlers ends the worker: nothing may wait on it any more.
            log.exception("the inference engine's worker stopped on an error")
        finally:
            with self._lock:
                self._closing = True  # a later submit is Unavailable, not queued for a worker that is gone
            self._fail_remaining()

    def _next_round(self) -> list[Job] | None:
        """The jobs admitted for this turn (maybe none); blocks while idle; None to stop."""
        with self._lock:
            while not self._closing and not self._waiting and not self._running:
                grown = self._kv.capacity > INITIAL_CAPACITY
                if not self._lock.wait(self._options.kv_shrink_idle_s if grown else None):
                    self._kv.shrink()  # idle that long: give a long prompt's memory back
            if self._closing:
                return None
            self._refuse_late()
            free = self._options.max_running - len(self._running)
            admitted = sorted(self._waiting, key=_deadline_order)[:free]
            for job in admitted:
                self._waiting.remove(job)
            self._running += admitted
            return admitted

    def _drop_cancelled(self) -> None:
        in_flight = self._batch.jobs if self._batch is not None else ()  # retired once their forward is done
        for job in [job for job in self._running if job.cancelled and job not in in_flight]:
            self._retire(job, job.finished(FinishReason.CANCELLED))

    def _refuse_late(self) -> None:
        """Refuses, before any compute is spent on it, each request (waiting for a row, or admitted but not
        begun) whose first token cannot come by its deadline: the prefill ahead of it in earliest-deadline
        order, and its own, at the measured cost of a tile (``_seconds_per_tile``), would end past it. Called
        holding the lock."""
        per_tile = self._seconds_per_tile()
        if per_tile is None:
            return  # nothing measured yet
        now = time.monotonic()
        ahead = 0.0  # tiles of prefill before the next request in line could have its first token
        if self._batch is not None:
            forward = self._batch.forward
            ahead = forward.cost_tokens / GEMM_TILE_ROWS * (forward.layer_count - forward.layer) / forward.layer_count
        line = [job for job in self._prefills if self._batch is None or job not in self._batch.jobs]
        probe = self._estimate_is_stale(now)
        for job in line + sorted(self._waiting, key=_deadline_order):
            prompt = len(job.request.prompt_token_ids)
            own = -(-(prompt - (job.sequence.length if job.sequence else 0)) // GEMM_TILE_ROWS)
            deadline = job.request.deadline
            if job.sequence is None and deadline is not None:
                needed_s = (ahead + own) * per_tile
                if job.estimate is None:
                    job.estimate = (now, needed_s)  # checked against its first token (``_learn_from``)
                if now + needed_s * self._estimate_bias > deadline:
                    if not probe:
                        self._refuse(job, now, needed_s * self._estimate_bias)
                        continue
                    probe = False  # this one runs, and its prefill measures the cost again
                    metrics.ESTIMATE_PROBES.inc()
                    log.info("the prefill cost was measured %.0f s ago and nothing measures it now: one request "
                             "that estimate would refuse runs to measure it again", now - self._layer_measured_at,
                             extra={"request_id": job.request.request_id})
            ahead += own

    def _estimate_is_stale(self, now: float) -> bool:
        """The prefill cost was measured long ago (``_ESTIMATE_STALE_S``), and no prefill under way will measure
        it again: the estimate may not refuse the head of the line. Called holding the lock."""
        if self._layer_measured_at is None or now - self._layer_measured_at <= _ESTIMATE_STALE_S:
            return False
        return self._batch is None and all(job.sequence is None for job in self._prefills)

    def _refuse(self, job: Job, now: float, needed_s: float) -> None:
        waited_ms, left_ms = (now - job.submitted) * 1000, max(job.request.deadline - now, 0) * 1000
        error = DeadlineExceeded(
            f"the inference queue cannot give a first token by the deadline: {waited_ms:.0f} ms waited in the "
            f"queue, about {needed_s * 1000:.0f} ms of prefill to go with {left_ms:.0f} ms left", hop="inference",
            facts={"queue_wait_ms": f"{waited_ms:.0f}", "first_token_estimate_ms": f"{needed_s * 1000:.0f}"})
        metrics.DEADLINE_REFUSALS.inc()
        if job in self._waiting:
            self._waiting.remove(job)
            job.spans.finished(error)
            job.deliver(error)
        else:
            self._retire(job, error, locked=True)

    def _learn_from(self, job: Job) -> None:
        """Moves the deadline estimate's correction towards what ``job``'s first token actually took against
        what was estimated for it when it was first checked."""
        if job.estimate is None:
            return
        checked, estimated_s = job.estimate
        if estimated_s > 0:
            ratio = min(max((time.monotonic() - checked) / estimated_s, 0.25), 2.0)
            self._estimate_bias = _EMA * ratio + (1 - _EMA) * self._estimate_bias

    def _seconds_per_tile(self) -> float | None:
        """What one GEMM tile of prefill costs through every layer, in wall time: measured, and beside
        decoding streams stretched by the share of each turn prefill gets."""
        if self._layer_s is None:
            return None
        tile_s = self._layer_s * len(self.model.base_model.layers)
        metrics.PREFILL_SECONDS_PER_TILE.set(tile_s)
        share = self._share()
        if self._stalls_anyone() and share and self._options.max_batched_tokens and self._step_s is not None:
            tile_s *= (1 + share) / share  # a turn: a decode step and at most ``share`` steps of prefill
        return tile_s

    def _share(self) -> float:
        """Beside decoding streams, how many decode steps' time a turn's prefill may take: ``prefill_share``,
        times the prompts waiting for their first token per decoding stream where more wait than decode. A
        burst arriving beside a few streams is then not held back to keep those few streams' gaps short:
        the time prefill takes weighs the callers waiting for it against the callers it delays."""
        return self._options.prefill_share * max(1.0, len(self._prefills) / max(self._kv.ready, 1))

    def _prefill_budget(self) -> int | None:
        """Prompt tokens this turn may still take beside the decoding rows; None: no limit."""
        if not self._options.max_batched_tokens or not self._stalls_anyone():
            return None  # nothing decodes yet, so nothing can stall
        return self._options.max_batched_tokens - self._kv.ready

    def _stalls_anyone(self) -> bool:
        """Whether prefill work now delays a stream's next token: only once decoding has started."""
        return bool(self._kv.ready) and self._decoding_started

    def _prefill_turn(self) -> None:
        """Prefills from the head of the line within this turn's token budget and, beside decoding
        streams, its time budget (at least one layer of one tile): a packed forward of chunks of the
        prompts in line, spread over turns if need be."""
        spent, started = 0, time.perf_counter()
        while self._prefills:
            if self._batch is None:
                budget = self._prefill_budget()
                self._batch = self._next_batch(None if budget is None else budget - spent, first=spent == 0)
                if self._batch is None:
                    return
            batch = self._batch
            layers = self._layers_this_turn(batch.forward, time.perf_counter() - started, first=spent == 0)
            if layers == 0 or not self._advance(batch, layers):
                return
            spent += batch.forward.cost_tokens
            if self._batch is not None or any(job in self._prefills for job in batch.jobs):
                return  # the budget is spent in the middle of this forward or of a prompt

    def _next_batch(self, left: int | None, first: bool) -> _Batch | None:
        """The next packed forward: a chunk of each prompt from the head of the line while the ``left``
        prompt tokens last (None: nothing decodes, so each prompt whole, while the forward stays within
        ``max_prefill_batch_tokens``); one prompt at a time where the layers run through the model's own
        forward. None when nothing fits."""
        jobs, chunks = [], []
        room = self._options.max_prefill_batch_tokens if left is None else left
        for job in list(self._prefills):
            if chunks and (room <= 0 or self._decode is None):
                break
            if job.sequence is None and not self._begin(job):
                continue  # failed and retired
            start, total = job.sequence.length, len(job.request.prompt_token_ids)
            budget = left if not chunks else room
            end = chunk_end(start, total, budget, first=first and not chunks, placement=self.kernels.placement)
            if end <= start or (chunks and left is None and end < total):
                break  # nothing of it fits (with nothing decoding, later prompts go whole or wait)
            chunk = ChunkForward(self.model, self._kv, job.request.prompt_token_ids, start, end,
                                 unwrapped=self._decode is not None)
            jobs.append(job)
            chunks.append(chunk)
            room -= chunk.cost_tokens
        if not chunks:
            return None
        metrics.PREFILL_BATCH_PROMPTS.observe(len(chunks))
        return _Batch(jobs, PackedForward(self.model, self._kv, chunks))

    def _layers_this_turn(self, chunk: PackedForward, elapsed_s: float, first: bool) -> int:
        """The chunk's layers that fit in what is left of this turn's prefill time: beside decoding
        streams, ``_share()`` times a decode step (both as recently measured); all of them with
        nothing decoding, a share of 0 or chunking off. At least one for the turn's first piece of work."""
        remaining = chunk.layer_count - chunk.layer
        share = self._share()
        if not self._stalls_anyone() or not share or not self._options.max_batched_tokens:
            return remaining  # nothing to stall, no time limit, or no chunking at all
        if self._layer_s is None or self._step_s is None:
            return 1  # a first layer, to measure
        per_layer = self._layer_s * chunk.cost_tokens / GEMM_TILE_ROWS
        layers = min(remaining, int(max(share * self._step_s - elapsed_s, 0) / per_layer))
        return max(layers, 1) if first else layers

    def _begin(self, job: Job) -> bool:
        """A row for the head of the line, with any cached prefix of its prompt copied in."""
        job.spans.admitted()
        try:
            response_format = job.request.sampling.response_format
            guide = self.prepare_guided().guide(response_format) if response_format is not None else None
            sequence = job.sequence = Sequence(job.request, self._text_tokenizer, self._eos_ids, guide)
            row = self._kv.allocate(job)
            keys = self._prefix.keys(job.request.tenant, job.request.prompt_token_ids) if self._prefix else []
            match = self._prefix.match(keys) if keys else NO_MATCH
            if match.kv is not None:
                self._kv.write(row, 0, match.kv)
            sequence.length = match.tokens
            job.prefix_keys, job.prefix_known = keys, match.tokens // self._prefix.block_tokens if keys else 0
        except Exception as error:
            log.exception("prefill failed", extra={"request_id": job.request.request_id})
            self._retire(job, error)
            return False
        return True

    def _advance(self, batch: _Batch, layers: int) -> bool:
        """Runs ``layers`` more layers of the batch's packed forward (services/inference/layered.py). Once it
        is done, each chunk moves its prompt on; a prompt's last one also makes its first token and moves
        the job into the decoding batch. False if it failed.

        In a prefill (``KernelPlan.prefill``) every layer takes the float32 GEMM and attention in
        fixed tiles (services/inference/tiles.py), so a row's bits do not depend on how
        many rows there are: the tail after a reused prefix, or a chunk, alone or packed with
        others, comes out as it would in a cold prefill of the whole prompt, and neither the
        prefix cache, nor chunking, nor other prompts ever change a greedy answer.
        """
        forward = batch.forward
        texts = []
        try:
            started = time.perf_counter()
            logits = forward.run([self._kv.row_of(job) for job in batch.jobs], layers)
            per_layer = (time.perf_counter() - started) / layers * GEMM_TILE_ROWS / forward.cost_tokens
            now = time.monotonic()
            # An average last fed long ago says less than this measurement: it starts over from it.
            fresh = self._layer_measured_at is not None and now - self._layer_measured_at <= _ESTIMATE_STALE_S
            self._layer_s = _EMA * per_layer + (1 - _EMA) * self._layer_s if fresh else per_layer
            self._layer_measured_at = now
            if not forward.done:
                return True
            self._batch = None
            for job, chunk, last in zip(batch.jobs, forward.chunks, logits):
                metrics.PREFILL_TOKENS.inc(chunk.end - chunk.start)
                job.sequence.length = chunk.end
                if chunk.end < chunk.total:
                    continue
                self._prefills.remove(job)
                self._kv.mark_ready(job)
                if job.prefix_keys:
                    row = self._kv.row_of(job)
                    self._prefix.remember(job.prefix_keys, job.prefix_known,
                                          lambda first, last, row=row: self._kv.read(row, first, last))
                texts.append((job, job.sequence.accept(last[0].float().cpu())))
                self._learn_from(job)
        except Exception as error:
            self._batch = None
            for job in batch.jobs:
                # The worker thread has no request context: the line names its request itself.
                log.exception("prefill failed", extra={"request_id": job.request.request_id})
                if job in self._running:
                    self._retire(job, error)
            return False
        for job, text in texts:
            self._emit(job, text)
        return True

    def _decode_step(self) -> None:
        """One forward for every decoding sequence (rows 0 .. B - 1), one token each."""
        jobs: list[Job] = list(self._kv.ready_owners)
        sequences = [job.sequence for job in jobs]
        epoch = self._cost_epoch
        started = time.perf_counter()
        try:
            positions, masks = self._kv.decode([sequence.length for sequence in sequences])
            logits = self._forward([[sequence.next_token] for sequence in sequences], positions, masks)
            forwarded = time.perf_counter()
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
        accepted = time.perf_counter()
        for job, text in zip(jobs, texts):
            self._emit(job, text)
        step = StepTime(len(jobs), forwarded - started, accepted - forwarded, time.perf_counter() - accepted)
        self.step_times.append(step)
        whole = step.forward + step.sampling_and_text + step.delivery
        with self._lock:
            if epoch == self._cost_epoch:  # else forgotten meanwhile (the warm-up's last step): not written back
                self._step_s = whole if self._step_s is None else _EMA * whole + (1 - _EMA) * self._step_s

    def _forward(self, rows: list[list[int]], positions: torch.Tensor, masks: dict[str, torch.Tensor]
                 ) -> torch.Tensor:
        """The last position's logits, (batch, 1, vocab), for a forward the KV rows were set up for."""
        ids = torch.tensor(rows, device=self.device)
        if self._decode is not None:
            return self._decode.forward(ids, positions, masks, self._kv)
        output = self.model(input_ids=ids, position_ids=positions, attention_mask=self.family.model_mask(masks),
                            cache=self._kv, use_cache=True, logits_to_keep=1)
        logits = output.logits[:, -1:, :]
        return logits if logits.device.type == "cpu" else logits.float().cpu()  # one copy a step, for the samplers

    def _emit(self, job: Job, text: str) -> None:
        sequence = job.sequence
        job.spans.stepped(sequence.finish_reason is not None)
        if text:
            job.deliver(Delta(text, sequence.take_logprobs()))
        if sequence.finish_reason is not None:
            self._retire(job, job.finished(sequence.finish_reason))

    def _retire(self, job: Job, last: Finished | BaseException, locked: bool = False) -> None:
        """Ends ``job`` with ``last``; ``locked``: the caller holds the lock."""
        if job in self._kv.owners:
            self._kv.free(job)
        if job in self._prefills:
            self._prefills.remove(job)
        if locked:
            self._running.remove(job)
        else:
            with self._lock:
                self._running.remove(job)
        job.spans.finished(last)
        job.deliver(last)

    def _fail_remaining(self) -> None:
        with self._lock:
            jobs = list(self._waiting) + self._running
            self._waiting.clear()
            self._running.clear()
        self._prefills.clear()
        self._batch = None
        for job in jobs:
            error = Unavailable("the inference engine shut down")
            job.spans.finished(error)
            job.deliver(error)


class _Batch(NamedTuple):
    """A packed prefill forward and the jobs whose chunks it runs, in the same order."""
    jobs: list[Job]
    forward: PackedForward


def _deadline_order(job: Job) -> float:
    """Earliest deadline first; a request without one after every one with one."""
    return job.request.deadline if job.request.deadline is not None else float("inf")


def chunk_end(start: int, total: int, budget: int | None, first: bool, placement: str) -> int:
    """Where a prefill chunk from token ``start`` of a ``total``-token prompt ends, given ``budget``
    tokens (None: no limit): the prompt's end if it fits, else the last boundary of the chunk's GEMM
    tiles within the budget (tiles begin at ``start`` or, placed by position (``placement``), at
    multiples of ``GEMM_TILE_ROWS``); the turn's first chunk gets at least up to the next boundary.
    ``start`` itself when nothing fits."""
    if budget is None or total - start <= budget:
        return total
    base = start - first_row(start, GEMM_TILE_ROWS, placement)  # where the chunk's first tile begins
    end = base + (start - base + max(budget, 0)) // GEMM_TILE_ROWS * GEMM_TILE_ROWS
    if end <= start and first:
        end = base + GEMM_TILE_ROWS
    return min(max(end, start), total)


def _check_kernels(model: PreTrainedModel, options: EngineOptions) -> None:
    """Logs the CPU and the kernels, and puts what this CPU's kernels allow in the model's plan; raises
    ValueError (RowDependence) when the model's precision cannot give a row the same bits whatever the
    batch on this CPU."""
    features = read_cpu_features()
    torch.set_num_threads(options.threads)  # as the worker will run (this is the worker)
    check_row_independence(model, options.max_running, features)
    plan = kernel_plan(model)
    plan.min_tiles = choose_min_tiles(model)
    placement = plan.placement = choose_tile_placement(model)
    parts = plan.one_tile_parts = choose_one_tile_parts(model, torch.get_num_threads())
    log.info("CPU %s; kernels: %s; prefill tiles: %s; a one-tile prefill GEMM in %d part%s%s", features.summary(),
             kernel_paths(model), PLACEMENT_NOTES[placement], parts, "s" if parts > 1 else "",
             "" if plan.min_tiles == 1 else ", else beside a zero tile (one tile alone rounds otherwise here)")


def _kernels_name(model: PreTrainedModel, kv_dtype: torch.dtype) -> str:
    """What computes the KV, for the prefix keys: device, precision and, on a CPU, torch's kernel level
    (AVX2, AVX512, ...): replicas on CPUs of other kinds round differently, so they share no blocks."""
    name = f"{model.device.type}/{model_precision(model) or kv_dtype}"
    return f"{name}/{torch.backends.cpu.get_cpu_capability()}" if model.device.type == "cpu" else name


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, family: Family) -> frozenset[int]:
    """The end-of-sequence ids from the model's generation config (an int or a list), and the family's
    end-of-turn tokens where the tokenizer has them (a converted GGUF's config may name only ``<eos>``)."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
    ids = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    vocab = tokenizer.get_vocab()
    return frozenset(ids | {vocab[token] for token in family.end_of_turn if token in vocab})


def _limits(model: PreTrainedModel, options: EngineOptions) -> RequestLimits:
    return RequestLimits(
        context_length=model.config.max_position_embeddings,
        vocab_size=model.config.vocab_size,
        default_max_new_tokens=options.default_max_new_tokens,
        max_new_tokens_limit=options.max_new_tokens_limit,
        max_stop_sequences=options.max_stop_sequences,
        max_stop_chars=options.max_stop_chars,
    )
