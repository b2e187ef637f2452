"""What every call does alike, sync or asyncio: its request id and metadata, its deadline, the retry decision
after a failed attempt, and the result built from the last message and the call's metadata."""
from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable

import grpc

from nlpmesh_client import messages
from nlpmesh_client.config import Config
from nlpmesh_client.errors import NlpmeshError, from_rpc_error
from nlpmesh_client.types import (
    CACHE_MODES,
    Embeddings,
    Generation,
    Prompt,
    Sampling,
    parse_server_timing,
    prompt_to_pb,
)

REQUEST_ID = "x-request-id"
SERVER_TIMING = "server-timing"
VALID_REQUEST_ID = re.compile(r"[!-~]{1,128}")  # what the gateway keeps: printable ASCII, no spaces


class Attempts:
    """One logical call: a request id and one deadline across all its attempts."""

    def __init__(self, config: Config, timeout_s: float | None, request_id: str | None):
        if request_id is not None and not VALID_REQUEST_ID.fullmatch(request_id):
            raise ValueError("request_id: 1 to 128 printable ASCII characters, no spaces (the gateway's rule)")
        self.request_id = request_id or uuid.uuid4().hex
        self.policy = config.retry
        timeout_s = config.timeout_s if timeout_s is None else timeout_s
        if timeout_s <= 0:
            raise ValueError("timeout_s: must be positive")
        self._deadline = time.monotonic() + timeout_s
        self.metadata: tuple[tuple[str, str], ...] = ((REQUEST_ID, self.request_id),)
        if config.api_key:
            self.metadata += (("authorization", f"Bearer {config.api_key}"),)

    def time_left_s(self) -> float:
        return max(self._deadline - time.monotonic(), 0.0)

    def retry_delay_s(self, error: grpc.RpcError, attempt: int) -> float:
        """The wait before the next attempt; raises the tree's exception when there is none."""
        failure = self.failure(error)
        delay = self.policy.delay_s(failure, attempt, self.time_left_s())
        if delay is None:
            raise failure from None
        return delay

    def failure(self, error: grpc.RpcError) -> NlpmeshError:
        return from_rpc_error(error, self.request_id)

    def echoed_request_id(self, initial_metadata: Iterable[tuple[str, str]] | None) -> str:
        return next((v for k, v in initial_metadata or () if k == REQUEST_ID), self.request_id)


def server_timing(trailing_metadata: Iterable[tuple[str, str]] | None) -> dict[str, float]:
    return next((parse_server_timing(v) for k, v in trailing_metadata or () if k == SERVER_TIMING), {})


def generate_request(prompt: Prompt, model: str, sampling: Sampling | None, cache: str, budget_ms: int):
    if cache not in CACHE_MODES:
        raise ValueError(f"cache: one of {', '.join(CACHE_MODES)}")
    request = messages.GenerateRequest(model=model, cache_mode=CACHE_MODES[cache], budget_ms=budget_ms)
    prompt_to_pb(prompt, request)
    (sampling or Sampling()).to_pb(request)
    return request


def embed_request(texts, model: str, budget_ms: int):
    if isinstance(texts, str):
        raise TypeError("texts: a list of strings (one text is [text])")
    return messages.EmbedRequest(texts=list(texts), model=model, budget_ms=budget_ms)


def embeddings(response, attempts: Attempts, initial_metadata, trailing_metadata) -> Embeddings:
    return Embeddings.from_pb(response, attempts.echoed_request_id(initial_metadata), server_timing(trailing_metadata))


def count_tokens_request(prompt: Prompt, model: str):
    request = messages.CountTokensRequest(model=model)
    prompt_to_pb(prompt, request)
    return request


class StreamState:
    """A stream's text so far and its last chunk; whether a retry is still allowed (no text received yet)."""

    def __init__(self):
        self.parts: list[str] = []
        self.logprobs: list = []
        self.final = None

    def take(self, chunk) -> str:
        if chunk.delta:
            self.parts.append(chunk.delta)
        self.logprobs += chunk.token_logprobs
        if chunk.done:
            self.final = chunk
        return chunk.delta

    @property
    def started(self) -> bool:
        return bool(self.parts)

    def result(self, attempts: Attempts, initial_metadata, trailing_metadata) -> Generation:
        if self.final is None:
            raise NlpmeshError(grpc.StatusCode.INTERNAL, "the stream ended without its last chunk",
                               request_id=attempts.request_id)
        return Generation.from_pb(self.final, "".join(self.parts), attempts.echoed_request_id(initial_metadata),
                                  server_timing(trailing_metadata), self.logprobs)


class StreamBase:
    """What a sync and an asyncio GenerateStream share: the call, its request id, and the answer once it ended."""

    def __init__(self, method, request, attempts: Attempts):
        self._method, self._request, self._attempts = method, request, attempts
        self._call = None
        self._result: Generation | None = None

    @property
    def request_id(self) -> str:
        return self._attempts.request_id

    @property
    def result(self) -> Generation:
        if self._result is None:
            raise RuntimeError("the stream has not ended yet: iterate over it first")
        return self._result

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()


def generation(response, attempts: Attempts, initial_metadata, trailing_metadata) -> Generation:
    return Generation.from_pb(response, response.text, attempts.echoed_request_id(initial_metadata),
                              server_timing(trailing_metadata))


def unary_method(channel, name: str, response_type):
    return channel.unary_unary(messages.method(name), request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=response_type.FromString)


def stream_method(channel):
    return channel.unary_stream(messages.method("GenerateStream"), request_serializer=lambda m: m.SerializeToString(),
                                response_deserializer=messages.GenerateChunk.FromString)
