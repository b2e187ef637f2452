"""``AsyncClient``: the same calls as ``Client`` (same arguments, results and errors), for asyncio.

    async with AsyncClient() as client:
        stream = client.stream("What is a bond ladder?")
        async for delta in stream:
            print(delta, end="")
        print(stream.result.timings)
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from itertools import count

import grpc

from nlpmesh_client import calls, messages
from nlpmesh_client.client import ClientBase
from nlpmesh_client.types import Embeddings, Generation, ModelInfo, Prompt, Sampling, TemplateInfo, TokenCount


class AsyncClient(ClientBase):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._channel = self.config.aio_channel()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def generate(self, prompt: Prompt, *, model: str = "", sampling: Sampling | None = None,
                       cache: str = "use", budget_ms: int = 0, timeout_s: float | None = None,
                       request_id: str | None = None) -> Generation:
        attempts = self._attempts(timeout_s, request_id)
        request = calls.generate_request(prompt, model, sampling, cache, budget_ms)
        response, call = await self._unary("Generate", request, messages.GenerateResponse, attempts)
        return calls.generation(response, attempts, await call.initial_metadata(), await call.trailing_metadata())

    def stream(self, prompt: Prompt, *, model: str = "", sampling: Sampling | None = None, cache: str = "use",
               budget_ms: int = 0, timeout_s: float | None = None, request_id: str | None = None) -> AsyncTextStream:
        attempts = self._attempts(timeout_s, request_id)
        request = calls.generate_request(prompt, model, sampling, cache, budget_ms)
        return AsyncTextStream(calls.stream_method(self._channel), request, attempts)

    async def count_tokens(self, prompt: Prompt, *, model: str = "", timeout_s: float | None = None,
                           request_id: str | None = None) -> TokenCount:
        attempts = self._attempts(timeout_s, request_id)
        request = calls.count_tokens_request(prompt, model)
        response, _ = await self._unary("CountTokens", request, messages.CountTokensResponse, attempts)
        return TokenCount.from_pb(response)

    async def embed(self, texts: Sequence[str], *, model: str = "", budget_ms: int = 0,
                    timeout_s: float | None = None, request_id: str | None = None) -> Embeddings:
        """One vector per text, from an embedding model (empty ``model``: the mesh's default one)."""
        attempts = self._attempts(timeout_s, request_id)
        response, call = await self._unary("Embed", calls.embed_request(texts, model, budget_ms),
                                           messages.EmbedResponse, attempts)
        return calls.embeddings(response, attempts, await call.initial_metadata(), await call.trailing_metadata())

    async def list_templates(self, *, timeout_s: float | None = None) -> tuple[TemplateInfo, ...]:
        response, _ = await self._unary("ListTemplates", messages.ListTemplatesRequest(),
                                        messages.ListTemplatesResponse, self._attempts(timeout_s, None))
        return tuple(TemplateInfo.from_pb(t) for t in response.templates)

    async def list_models(self, *, timeout_s: float | None = None) -> tuple[ModelInfo, ...]:
        response, _ = await self._unary("ListModels", messages.ListModelsRequest(), messages.ListModelsResponse,
                                        self._attempts(timeout_s, None))
        return tuple(ModelInfo.from_pb(m) for m in response.models)

    async def _unary(self, name: str, request, response_type, attempts: calls.Attempts):
        method = calls.unary_method(self._channel, name, response_type)
        for attempt in count(1):
            call = method(request, timeout=attempts.time_left_s(), metadata=attempts.metadata)
            try:
                return await call, call
            except grpc.RpcError as error:
                await asyncio.sleep(attempts.retry_delay_s(error, attempt))
        raise AssertionError("unreachable")


class AsyncTextStream(calls.StreamBase):
    """One GenerateStream: ``async for`` yields the text deltas (once); ``result`` is the whole answer after."""

    def __aiter__(self) -> AsyncIterator[str]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[str]:
        try:
            async for delta in self._attempted():
                yield delta
        finally:
            if self._result is None:  # left early (break, an error): the gateway stops generating
                self.cancel()

    async def _attempted(self) -> AsyncIterator[str]:
        state = calls.StreamState()
        for attempt in count(1):
            self._call = self._method(self._request, timeout=self._attempts.time_left_s(),
                                      metadata=self._attempts.metadata)
            try:
                async for chunk in self._call:
                    if delta := state.take(chunk):
                        yield delta
                break
            except grpc.RpcError as error:
                if state.started:
                    raise self._attempts.failure(error) from None
                await asyncio.sleep(self._attempts.retry_delay_s(error, attempt))
        self._result = state.result(self._attempts, await self._call.initial_metadata(),
                                    await self._call.trailing_metadata())
