"""The edge's calls to the gateway, with nlpmesh-client's requests, results and errors.

One channel for the process; each call carries its caller's key (``authorization: Bearer``, forwarded as given),
its ``x-request-id`` and the caller's W3C trace context. No retries here: an OpenAI client retries by itself,
after the Retry-After the edge passes on.
"""
from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from nlpmesh_client import NO_RETRY, Config, Generation, ModelInfo, calls, messages

from services.openai_edge.mapping import Call, EmbeddingCall

TRACE_HEADERS = ("traceparent", "tracestate")


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who asks: the key as sent (None: none), the request id, the trace headers to pass on."""
    api_key: str | None
    request_id: str | None
    trace: tuple[tuple[str, str], ...] = ()


class Gateway:
    def __init__(self, address: str, ca_file: Path | None, timeout_s: float):
        self.config = Config(address=address, ca_file=ca_file, plaintext=ca_file is None, timeout_s=timeout_s,
                             retry=NO_RETRY)
        self._channel: grpc.aio.Channel | None = None

    async def open(self) -> None:
        self._channel = self.config.aio_channel()

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    def attempts(self, who: Caller, budget_ms: int = 0) -> calls.Attempts:
        timeout_s = self.config.timeout_s if not budget_ms else min(self.config.timeout_s, budget_ms / 1000 + 1.0)
        return calls.Attempts(dataclasses.replace(self.config, api_key=who.api_key), timeout_s, who.request_id)

    async def generate(self, call: Call, who: Caller) -> Generation:
        attempts = self.attempts(who, call.budget_ms)
        request = calls.generate_request(call.prompt, call.model, call.sampling, call.cache, call.budget_ms)
        method = calls.unary_method(self._channel, "Generate", messages.GenerateResponse)
        rpc = method(request, timeout=attempts.time_left_s(), metadata=attempts.metadata + who.trace)
        try:
            response = await rpc
        except grpc.RpcError as error:
            raise attempts.failure(error) from None
        return calls.generation(response, attempts, await rpc.initial_metadata(), await rpc.trailing_metadata())

    def stream(self, call: Call, who: Caller) -> GenerationStream:
        attempts = self.attempts(who, call.budget_ms)
        request = calls.generate_request(call.prompt, call.model, call.sampling, call.cache, call.budget_ms)
        rpc = calls.stream_method(self._channel)(request, timeout=attempts.time_left_s(),
                                                 metadata=attempts.metadata + who.trace)
        return GenerationStream(rpc, attempts)

    async def embed(self, call: EmbeddingCall, who: Caller):
        """The gateway's EmbedResponse (its vectors passed on as they are, not unpacked into Python floats)."""
        attempts = self.attempts(who, call.budget_ms)
        method = calls.unary_method(self._channel, "Embed", messages.EmbedResponse)
        try:
            return await method(calls.embed_request(call.texts, call.model, call.budget_ms),
                                timeout=attempts.time_left_s(), metadata=attempts.metadata + who.trace)
        except grpc.RpcError as error:
            raise attempts.failure(error) from None

    async def list_models(self, who: Caller) -> tuple[ModelInfo, ...]:
        attempts = self.attempts(who)
        method = calls.unary_method(self._channel, "ListModels", messages.ListModelsResponse)
        try:
            response = await method(messages.ListModelsRequest(), timeout=attempts.time_left_s(),
                                    metadata=attempts.metadata + who.trace)
        except grpc.RpcError as error:
            raise attempts.failure(error) from None
        return tuple(ModelInfo.from_pb(m) for m in response.models)


class GenerationStream:
    """One GenerateStream: ``chunks()`` yields the gateway's chunks (a failure as nlpmesh-client's error);
    ``result`` is the whole answer after the last one. ``cancel()`` stops the generation."""

    def __init__(self, rpc, attempts: calls.Attempts):
        self._rpc, self._attempts = rpc, attempts
        self._state = calls.StreamState()
        self.result: Generation | None = None

    @property
    def request_id(self) -> str:
        return self._attempts.request_id

    async def chunks(self) -> AsyncIterator:
        try:
            async for chunk in self._rpc:
                self._state.take(chunk)
                yield chunk
        except grpc.RpcError as error:
            raise self._attempts.failure(error) from None
        self.result = self._state.result(self._attempts, await self._rpc.initial_metadata(),
                                         await self._rpc.trailing_metadata())

    def cancel(self) -> None:
        self._rpc.cancel()
