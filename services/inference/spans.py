"""The spans of one traced generation: queue wait, prefill, decode.

The engine's worker thread has no trace context of its own, so the caller's
context travels in ``GenerationRequest.trace_context`` and every span here is
started with it explicitly. The queue wait is recorded when the request is
admitted (from its submit time), so no span stays open across threads.
Decode is one span for all of a request's decode steps, not one per token.
Requests without a trace context (warm-up, tests) get ``NO_SPANS``.
"""
from __future__ import annotations

import time

from opentelemetry import trace

from meshkit import span_names as names
from meshkit.tracing.stand_in import start_span_later, tracer_now
from services.inference.generation_types import Finished, GenerationRequest


class JobSpans:
    def __init__(self, request: GenerationRequest, model_name: str):
        self._parent = request.trace_context
        sampling = request.sampling
        self._attributes = {
            names.GEN_AI_SYSTEM: names.GEN_AI_SYSTEM_VALUE,
            names.GEN_AI_PROVIDER_NAME: names.GEN_AI_SYSTEM_VALUE,
            names.GEN_AI_OPERATION_NAME: names.GEN_AI_OPERATION_VALUE,
            names.GEN_AI_REQUEST_MODEL: model_name,
            names.GEN_AI_REQUEST_MAX_TOKENS: sampling.max_new_tokens,
            names.GEN_AI_REQUEST_TEMPERATURE: sampling.temperature,
            names.GEN_AI_REQUEST_TOP_P: sampling.top_p,
            names.GEN_AI_REQUEST_TOP_K: sampling.top_k,
            names.GEN_AI_USAGE_INPUT_TOKENS: len(request.prompt_token_ids),
        }
        self._queued_ns = time.time_ns()
        self._open: trace.Span | None = None
        self._prefilling = False

    def admitted(self) -> None:
        """The request got a slot: its queue wait ends and its prefill starts."""
        now = time.time_ns()
        self._start(names.INFERENCE_QUEUE_WAIT, self._queued_ns).end(end_time=now)
        self._open = self._start(names.INFERENCE_PREFILL, now)
        self._prefilling = True

    def stepped(self, done: bool) -> None:
        """After each decode step: the first one ends the prefill and starts decode."""
        if not self._prefilling or done:  # done at once: finished() ends the prefill
            return
        self._prefilling = False
        now = time.time_ns()
        self._open.end(end_time=now)
        self._open = None if done else self._start(names.INFERENCE_DECODE, now)

    def finished(self, last: Finished | BaseException) -> None:
        """The request ended: the open span gets the usage (or the error) and ends."""
        span, self._open = self._open, None
        if span is None:
            return
        if isinstance(last, Finished):
            span.set_attribute(names.GEN_AI_USAGE_OUTPUT_TOKENS, last.completion_tokens)
            span.set_attribute(names.FINISH_REASON, last.finish_reason.name.lower())
        else:
            span.set_status(trace.Status(trace.StatusCode.ERROR, type(last).__name__))
        span.end()

    def _start(self, name: str, start_ns: int) -> trace.Span:
        # The adapter's spans are made off the stream's path (meshkit/tracing/stand_in.py); the built-in
        # engine's, on its worker thread, at once.
        return start_span_later(tracer_now("inference"), name, self._parent, attributes=self._attributes,
                                start_ns=start_ns)


class _NoSpans:
    def admitted(self) -> None:
        pass

    def stepped(self, done: bool) -> None:
        pass

    def finished(self, last) -> None:
        pass


NO_SPANS = _NoSpans()


def job_spans(request: GenerationRequest, model_name: str) -> JobSpans | _NoSpans:
    return NO_SPANS if request.trace_context is None else JobSpans(request, model_name)
