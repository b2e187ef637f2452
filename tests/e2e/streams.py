"""Streamed generations against a gateway, each recorded as an ``Outcome``: the chaos tests' load.

Every loop here is bounded in calls and in time and stops by itself; all traffic goes to
the mesh's loopback address.
"""
from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from meshkit.percentile import percentile
from tests.polling import wait_until

OK = grpc.StatusCode.OK


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    started: float  # time.monotonic() at the call
    seconds: float  # from the call to its end (its status, or the last chunk)
    chunks: int = 0  # messages received before the end
    first_chunk_s: float | None = None  # from the call to its first message, if any came
    retry_after_s: float | None = None  # RetryInfo's delay, when the status carried one
    reason: str = ""  # ErrorInfo's reason, when the status carried one
    hop: str = ""  # ErrorInfo's metadata "hop": where a DEADLINE_EXCEEDED ran out of time


def finance_request(max_new_tokens: int, question: str | None = None,
                    cache_mode=gateway_pb2.CACHE_MODE_BYPASS) -> gateway_pb2.GenerateRequest:
    """A short generation through every hop (template, tokenizer, inference); without ``question``
    one no other call asked (no prompt-cache or prefix hit past the template's own text)."""
    variables = struct_pb2.Struct()
    variables.update({"question": question or f"Name one use of AI in banking. (ref {uuid.uuid4().hex[:8]})"})
    return gateway_pb2.GenerateRequest(
        template=gateway_pb2.TemplateCall(id="finance_question", variables=variables),
        sampling=gateway_pb2.SamplingParams(max_new_tokens=max_new_tokens),
        cache_mode=cache_mode,
    )


def stream_once(stub, request, timeout_s: float, cancel_after_chunks: int | None = None,
                cancel_after_s: float | None = None, on_first_chunk: Callable[[], None] | None = None) -> Outcome:
    """One GenerateStream to its end, or cancelled by this client after so many chunks or seconds."""
    began, started = time.monotonic(), time.perf_counter()
    call = stub.GenerateStream(request, timeout=timeout_s)
    timer = threading.Timer(cancel_after_s, call.cancel) if cancel_after_s is not None else None
    if timer is not None:
        timer.start()
    chunks, first_chunk_s = 0, None
    if cancel_after_chunks == 0:
        call.cancel()
    try:
        for _ in call:
            chunks += 1
            if first_chunk_s is None:
                first_chunk_s = time.perf_counter() - started
                if on_first_chunk is not None:
                    on_first_chunk()
            if cancel_after_chunks is not None and chunks >= cancel_after_chunks:
                call.cancel()
        return Outcome(OK, began, time.perf_counter() - started, chunks, first_chunk_s)
    except grpc.RpcError as error:
        return failed(error, began, time.perf_counter() - started, chunks, first_chunk_s)
    finally:
        if timer is not None:
            timer.cancel()


def failed(error: grpc.RpcError, started: float, seconds: float, chunks: int = 0,
           first_chunk_s: float | None = None) -> Outcome:
    retry_after, reason, hop = None, "", ""
    status = rpc_status.from_call(error) if error.code() != grpc.StatusCode.CANCELLED else None
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            retry_after = info.retry_delay.ToTimedelta().total_seconds()
        elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, hop = reason or info.reason, hop or info.metadata.get("hop", "")
    return Outcome(error.code(), started, seconds, chunks, first_chunk_s, retry_after, reason, hop)


@dataclass
class Load:
    """``workers`` callers on one channel, each streaming one generation after another.

    Each stops after ``max_calls`` calls or ``max_s`` seconds, or when ``stop()`` is called.
    A failed call is followed by a short pause, so a service that is down is not hammered.
    """

    channel: grpc.Channel
    workers: int = 2
    max_new_tokens: int = 6
    timeout_s: float = 20.0
    max_calls: int = 40
    max_s: float = 60.0
    outcomes: list[Outcome] = field(default_factory=list)
    streaming: int = 0  # calls between their first chunk and their end, now
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        deadline = time.monotonic() + self.max_s
        stub = gateway_pb2_grpc.GatewayStub(self.channel)

        def caller() -> None:
            for _ in range(self.max_calls):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                outcome = stream_once(stub, finance_request(self.max_new_tokens), self.timeout_s,
                                      on_first_chunk=lambda: self._count_streaming(1))
                if outcome.first_chunk_s is not None:
                    self._count_streaming(-1)
                self.outcomes.append(outcome)
                if outcome.code != OK:
                    self._stop.wait(0.2)

        self._threads = [threading.Thread(target=caller, daemon=True) for _ in range(self.workers)]
        for thread in self._threads:
            thread.start()
        return self

    def _count_streaming(self, change: int) -> None:
        with self._lock:
            self.streaming += change

    def wait_for_streaming(self, timeout_s: float = 60.0) -> None:
        """Until a call is receiving tokens, bounded in time."""
        wait_until(lambda: self.streaming > 0, timeout_s, 0.01, what="a call receiving tokens")

    def wait_for_calls(self, count: int, timeout_s: float = 60.0) -> None:
        """Until ``count`` calls have ended (the load is under way), bounded in time."""
        wait_until(lambda: len(self.outcomes) >= count, timeout_s, 0.05, what=f"{count} calls ended")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s + 5)

    def __exit__(self, *exc) -> None:
        self.stop()


def codes(outcomes: list[Outcome]) -> dict[str, int]:
    """How many calls ended with each status, by name."""
    counted: dict[str, int] = {}
    for outcome in outcomes:
        counted[outcome.code.name] = counted.get(outcome.code.name, 0) + 1
    return counted


def seconds_summary(outcomes: list[Outcome]) -> str:
    times = [o.seconds for o in outcomes]
    if not times:
        return "none"
    return f"n={len(times)} p50={percentile(times, 50) * 1000:.0f}ms max={max(times) * 1000:.0f}ms"


def cancel_points(seed: int, count: int, max_chunks: int, max_s: float) -> list[tuple[int | None, float | None]]:
    """Where each of ``count`` streams is cancelled: after some chunks, or after some seconds (seeded)."""
    chooser = random.Random(seed)
    return [(chooser.randint(0, max_chunks), None) if chooser.random() < 0.5 else (None, chooser.uniform(0, max_s))
            for _ in range(count)]
