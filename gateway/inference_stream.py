"""One inference stream as the gateway sees it: its events, one attempt at it, and when to try again.

``Downstream.generate`` (gateway/downstream.py) composes these with its routing:
each attempt is one ``Generate`` call to one replica (or the balanced channel);
``InferenceRetries`` decides whether a failed attempt goes to another replica;
``InferenceAttempt.end`` says whose place to count free when the call ends
without the replica reporting its end.
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
from nlpmesh.inference.v1 import inference_pb2

from gateway import balancing
from meshkit.wire import InferenceLoad


@dataclass(frozen=True)
class TokenDelta:
    text: str
    # SamplingParams.logprobs set: the tokens generated since the previous event, as the inference service sent
    # them (nlpmesh.inference.v1.TokenLogprob, the gateway's TokenLogprob field for field).
    logprobs: tuple = ()


@dataclass(frozen=True)
class GenerationEnd:
    finish_reason: int  # nlpmesh.inference.v1.FinishReason, passed on as the gateway's (equal values: a test checks)
    prompt_tokens: int
    completion_tokens: int
    logprobs: tuple = ()  # those of tokens no delta carried

    @property
    def cancelled(self) -> bool:
        """The generation ended because its caller went away: its text is not an answer."""
        return self.finish_reason == inference_pb2.FINISH_REASON_CANCELLED


def events_of(chunk: inference_pb2.GenerateChunk) -> list[TokenDelta | GenerationEnd]:
    """What one chunk of the stream tells the caller: its text, then its end."""
    events: list[TokenDelta | GenerationEnd] = []
    if chunk.delta:
        events.append(TokenDelta(chunk.delta, tuple(chunk.logprobs)))
    if chunk.done:
        logprobs = () if chunk.delta else tuple(chunk.logprobs)
        events.append(GenerationEnd(chunk.finish_reason, chunk.prompt_tokens, chunk.completion_tokens, logprobs))
    return events


class InferenceAttempt:
    """One ``Generate`` call: its events, the load reports it carries, and whether the replica reported its end.

    ``observe(metadata)`` reads a load report (None without one) and passes it on.
    """

    def __init__(self, call, observe: Callable[[object], InferenceLoad | None]):
        self._call = call
        self._observe = observe
        self.yielded = False  # an event reached the caller: the attempt may not be retried
        self._started: InferenceLoad | None = None  # the report the call began with: which replica holds it
        self._end_reported = False

    async def events(self) -> AsyncIterator[TokenDelta | GenerationEnd]:
        """The stream's events; the call's AioRpcError when it fails, after its load report is observed."""
        try:
            self._started = self._observe(await self._call.initial_metadata())
            async for chunk in self._call:
                for event in events_of(chunk):
                    self.yielded = True
                    yield event
            self._end_reported = True
            self._observe(await self._call.trailing_metadata())
        except grpc.aio.AioRpcError as error:  # a refusal reports the load too
            # A replica that reports its load on an error ended the call itself; without a
            # report (cancelled, or out of time here) ``end`` counts its place free.
            self._end_reported = self._observe(error.trailing_metadata()) is not None
            raise

    def end(self) -> str | None:
        """Cancels the call (a no-op once it is over), so the engine stops this sequence. The replica whose
        place it held when the replica will never report its end (counted free at once), else None."""
        self._call.cancel()
        if self._end_reported or self._started is None:
            return None
        return self._started.replica


@dataclass
class InferenceRetries:
    """Whether a failed stream goes to another replica: only UNAVAILABLE before any event reached the
    caller, at most ``balancing.MAX_ATTEMPTS`` attempts, and only before ``deadline`` (``clock`` seconds)."""

    deadline: float
    clock: Callable[[], float] = time.monotonic
    attempts: int = 0  # attempts that failed so far
    tried: set[str] = field(default_factory=set)  # endpoints that failed, passed over by prefix-affine routing

    def time_left(self) -> float:
        return max(0.0, self.deadline - self.clock())

    def retry(self, error: grpc.aio.AioRpcError, attempt: InferenceAttempt, endpoint: str | None) -> bool:
        """Counts the failed attempt; True when the stream is to be tried again."""
        self.attempts += 1
        if (error.code() != grpc.StatusCode.UNAVAILABLE or attempt.yielded
                or self.attempts >= balancing.MAX_ATTEMPTS or self.clock() >= self.deadline):
            return False
        if endpoint is not None:
            self.tried.add(endpoint)
        return True
