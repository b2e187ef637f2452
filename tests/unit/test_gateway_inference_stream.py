"""One inference stream's attempts and retries (gateway/inference_stream.py) with a fake call and a frozen clock."""
import asyncio

import grpc
import pytest
from nlpmesh.inference.v1 import inference_pb2

from gateway import balancing
from gateway.inference_stream import GenerationEnd, InferenceAttempt, InferenceRetries, TokenDelta
from meshkit.wire import LOAD_HEADER, REPLICA_HEADER, InferenceLoad


def report(active: int, replica: str = "replica-a") -> tuple[tuple[str, str], ...]:
    return ((LOAD_HEADER, f"{active}/8"), (REPLICA_HEADER, replica))


STARTED = report(1)


def rpc_error(code=grpc.StatusCode.UNAVAILABLE, trailing=()) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), "failed")


class FakeCall:
    """A Generate call: its chunks, then its end, or ``error`` after the chunks."""

    def __init__(self, chunks=(), error: grpc.aio.AioRpcError | None = None, started=STARTED):
        self.chunks = list(chunks)
        self.error = error
        self.started = started
        self.cancelled = False

    async def initial_metadata(self):
        return self.started

    async def trailing_metadata(self):
        return report(0)

    def __aiter__(self):
        return self._stream()

    async def _stream(self):
        for chunk in self.chunks:
            yield chunk
        if self.error is not None:
            raise self.error

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class Observed:
    def __init__(self):
        self.loads: list[InferenceLoad | None] = []

    def __call__(self, metadata) -> InferenceLoad | None:
        self.loads.append(InferenceLoad.from_metadata(metadata))
        return self.loads[-1]


def drain(attempt: InferenceAttempt, stop_after: int | None = None) -> list:
    async def main():
        events = []
        stream = attempt.events()
        try:
            async for event in stream:
                events.append(event)
                if stop_after is not None and len(events) == stop_after:
                    break
        finally:
            await stream.aclose()
        return events

    return asyncio.run(main())


DONE = inference_pb2.GenerateChunk(delta="!", done=True, finish_reason=inference_pb2.FINISH_REASON_STOP,
                                   prompt_tokens=3, completion_tokens=2)


def test_a_stream_that_ends_yields_its_text_and_end_and_frees_no_place_itself():
    call = FakeCall([inference_pb2.GenerateChunk(delta="Hi"), DONE])
    observed = Observed()
    attempt = InferenceAttempt(call, observed)
    assert drain(attempt) == [TokenDelta("Hi"), TokenDelta("!"), GenerationEnd(1, 3, 2)]
    assert observed.loads == [InferenceLoad(1, 8, "replica-a"), InferenceLoad(0, 8, "replica-a")]
    assert attempt.end() is None and call.cancelled  # the replica reported its end


def test_a_refusal_with_a_load_report_was_ended_by_the_replica_and_frees_no_place_here():
    attempt = InferenceAttempt(FakeCall(error=rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, report(8))), Observed())
    with pytest.raises(grpc.aio.AioRpcError):
        drain(attempt)
    assert attempt.end() is None


def test_a_failure_without_a_report_frees_the_place_of_the_replica_the_call_started_on():
    attempt = InferenceAttempt(FakeCall(error=rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED)), Observed())
    with pytest.raises(grpc.aio.AioRpcError):
        drain(attempt)
    assert attempt.end() == "replica-a"


def test_a_caller_that_goes_away_mid_stream_cancels_the_call_and_frees_its_place():
    call = FakeCall([inference_pb2.GenerateChunk(delta="Hi"), DONE])
    attempt = InferenceAttempt(call, Observed())
    assert drain(attempt, stop_after=1) == [TokenDelta("Hi")]
    assert attempt.yielded
    assert attempt.end() == "replica-a" and call.cancelled


def test_a_call_that_never_started_frees_no_place():
    attempt = InferenceAttempt(FakeCall(error=rpc_error(), started=()), Observed())
    with pytest.raises(grpc.aio.AioRpcError):
        drain(attempt)
    assert attempt.end() is None


class Clock:
    def __init__(self):
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def failed_attempt(yielded: bool = False) -> InferenceAttempt:
    attempt = InferenceAttempt(FakeCall(), Observed())
    attempt.yielded = yielded
    return attempt


def test_unavailable_before_any_token_is_retried_elsewhere_up_to_the_attempt_limit():
    retries = InferenceRetries(deadline=60.0, clock=Clock())
    outcomes = [retries.retry(rpc_error(), failed_attempt(), f"10.0.0.{n}:1") for n in range(balancing.MAX_ATTEMPTS)]
    assert outcomes == [True] * (balancing.MAX_ATTEMPTS - 1) + [False]
    assert retries.tried == {f"10.0.0.{n}:1" for n in range(balancing.MAX_ATTEMPTS - 1)}


@pytest.mark.parametrize("why", ["a token reached the caller", "another status", "the deadline passed"])
def test_a_stream_is_not_retried_when(why):
    clock = Clock()
    retries = InferenceRetries(deadline=60.0, clock=clock)
    error, attempt = rpc_error(), failed_attempt()
    if why == "a token reached the caller":
        attempt = failed_attempt(yielded=True)
    elif why == "another status":
        error = rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED)
    else:
        clock.now = 60.0
    assert not retries.retry(error, attempt, "10.0.0.1:1")
    assert retries.time_left() == (0.0 if why == "the deadline passed" else 10.0)
