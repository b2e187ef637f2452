"""``Client``: the gateway's RPCs as blocking calls with typed results.

    with Client() as client:   # NLPMESH_ADDR, NLPMESH_API_KEY, NLPMESH_CA
        answer = client.generate(Template("finance_question", {"question": "What is a bond?"}))
        print(answer.text, answer.server_timing)

Every call has a deadline (``timeout_s``, retries included), an ``x-request-id`` (made unless given), and
retries RESOURCE_EXHAUSTED and UNAVAILABLE as ``RetryPolicy`` says. A failure raises ``NlpmeshError``.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from itertools import count
from pathlib import Path

import grpc

from nlpmesh_client import calls, messages
from nlpmesh_client.config import DEFAULT_TIMEOUT_S, Config
from nlpmesh_client.retry import RetryPolicy
from nlpmesh_client.types import Embeddings, Generation, ModelInfo, Prompt, Sampling, TemplateInfo, TokenCount


class ClientBase:
    """What both clients take: the arguments, else the environment (``Config.resolve``), or a whole Config."""

    def __init__(self, address: str | None = None, *, api_key: str | None = None, ca_file: str | Path | None = None,
                 plaintext: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S, retry: RetryPolicy | None = None,
                 config: Config | None = None):
        self.config = config or Config.resolve(address, api_key, ca_file, plaintext=plaintext, timeout_s=timeout_s,
                                               retry=retry or RetryPolicy())

    def _attempts(self, timeout_s: float | None, request_id: str | None) -> calls.Attempts:
        return calls.Attempts(self.config, timeout_s, request_id)


class Client(ClientBase):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._channel = self.config.channel()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompt: Prompt, *, model: str = "", sampling: Sampling | None = None, cache: str = "use",
                 budget_ms: int = 0, timeout_s: float | None = None, request_id: str | None = None) -> Generation:
        """The whole answer. ``cache``: "use", "bypass" or "refresh"."""
        attempts = self._attempts(timeout_s, request_id)
        request = calls.generate_request(prompt, model, sampling, cache, budget_ms)
        response, call = self._unary("Generate", request, messages.GenerateResponse, attempts)
        return calls.generation(response, attempts, call.initial_metadata(), call.trailing_metadata())

    def stream(self, prompt: Prompt, *, model: str = "", sampling: Sampling | None = None, cache: str = "use",
               budget_ms: int = 0, timeout_s: float | None = None, request_id: str | None = None) -> TextStream:
        """The answer as it is produced: iterate for the text deltas, then read ``.result``."""
        attempts = self._attempts(timeout_s, request_id)
        request = calls.generate_request(prompt, model, sampling, cache, budget_ms)
        return TextStream(calls.stream_method(self._channel), request, attempts)

    def count_tokens(self, prompt: Prompt, *, model: str = "", timeout_s: float | None = None,
                     request_id: str | None = None) -> TokenCount:
        attempts = self._attempts(timeout_s, request_id)
        request = calls.count_tokens_request(prompt, model)
        response, _ = self._unary("CountTokens", request, messages.CountTokensResponse, attempts)
        return TokenCount.from_pb(response)

    def embed(self, texts: Sequence[str], *, model: str = "", budget_ms: int = 0, timeout_s: float | None = None,
              request_id: str | None = None) -> Embeddings:
        """One vector per text, from an embedding model (empty ``model``: the mesh's default one)."""
        attempts = self._attempts(timeout_s, request_id)
        response, call = self._unary("Embed", calls.embed_request(texts, model, budget_ms), messages.EmbedResponse,
                                     attempts)
        return calls.embeddings(response, attempts, call.initial_metadata(), call.trailing_metadata())

    def list_templates(self, *, timeout_s: float | None = None) -> tuple[TemplateInfo, ...]:
        response, _ = self._unary("ListTemplates", messages.ListTemplatesRequest(), messages.ListTemplatesResponse,
                                  self._attempts(timeout_s, None))
        return tuple(TemplateInfo.from_pb(t) for t in response.templates)

    def list_models(self, *, timeout_s: float | None = None) -> tuple[ModelInfo, ...]:
        response, _ = self._unary("ListModels", messages.ListModelsRequest(), messages.ListModelsResponse,
                                  self._attempts(timeout_s, None))
        return tuple(ModelInfo.from_pb(m) for m in response.models)

    def _unary(self, name: str, request, response_type, attempts: calls.Attempts):
        method = calls.unary_method(self._channel, name, response_type)
        for attempt in count(1):
            try:
                return method.with_call(request, timeout=attempts.time_left_s(), metadata=attempts.metadata)
            except grpc.RpcError as error:
                time.sleep(attempts.retry_delay_s(error, attempt))
        raise AssertionError("unreachable")


class TextStream(calls.StreamBase):
    """One GenerateStream: iterating yields the text deltas (once); ``result`` is the whole answer after."""

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self._deltas()
        finally:
            if self._result is None:  # left early (break, an error): the gateway stops generating
                self.cancel()

    def _deltas(self) -> Iterator[str]:
        state = calls.StreamState()
        for attempt in count(1):
            self._call = self._method(self._request, timeout=self._attempts.time_left_s(),
                                      metadata=self._attempts.metadata)
            try:
                for chunk in self._call:
                    if delta := state.take(chunk):
                        yield delta
                break
            except grpc.RpcError as error:
                if state.started:  # text was received: a retry would repeat it
                    raise self._attempts.failure(error) from None
                time.sleep(self._attempts.retry_delay_s(error, attempt))
        self._result = state.result(self._attempts, self._call.initial_metadata(), self._call.trailing_metadata())
