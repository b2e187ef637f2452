"""The order of hops for one request: cache, then template, tokenizer, inference.

Plain orchestration over the Downstream clients and the prompt cache; no
protobuf here. ``stream`` yields text deltas and ends with one ``Outcome``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator

from gateway.catalog import TemplateIndex
from gateway.downstream import Downstream, GenerationEnd, ModelInfo, TokenDelta, store_request
from gateway.request import CacheMode, Chat, PromptRequest, Sampling, TemplateCall
from gateway.timings import HopClock, HopTiming
from meshkit.errors import NotFound
from services.cache.keys import ChatPrompt, PromptCacheKey, TemplatePrompt
from services.cache.keys import Sampling as KeySampling
from services.cache.store import PromptCache

log = logging.getLogger("nlpmesh.gateway")

# Values match nlpmesh.gateway.v1.FinishReason.
CANCELLED = 4


@dataclass(frozen=True)
class Outcome:
    text: str
    finish_reason: int
    prompt_tokens: int
    completion_tokens: int
    cache_hit: bool
    model: str
    timings: list[HopTiming]


@dataclass(frozen=True)
class CallContext:
    tenant: str
    metadata: tuple  # trace context for downstream calls
    time_left: callable  # () -> seconds left of the caller's deadline, or None


class Answerer:
    def __init__(self, downstream: Downstream, cache: PromptCache | None, templates: TemplateIndex,
                 model: ModelInfo, settings):
        self._downstream = downstream
        self._cache = cache
        self._templates = templates
        self._model = model
        self._settings = settings
        self._background: set[asyncio.Task] = set()

    def resolve_model(self, requested: str) -> str:
        if requested and requested != self._model.model:
            raise NotFound(f"unknown model {requested!r}")
        return self._model.model

    def resolve_sampling(self, sampling: Sampling) -> Sampling:
        if sampling.max_new_tokens:
            return sampling
        return Sampling(self._model.default_max_new_tokens, sampling.temperature, sampling.top_p,
                        sampling.top_k, sampling.seed, sampling.stop)

    def timeout(self, hop_timeout: float, call: CallContext) -> float:
        left = call.time_left()
        return hop_timeout if left is None else max(0.0, min(hop_timeout, left))

    async def stream(self, request: PromptRequest, call: CallContext, clock: HopClock
                     ) -> AsyncIterator[TokenDelta | Outcome]:
        model = self.resolve_model(request.model)
        sampling = self.resolve_sampling(request.sampling)
        key = await self._cache_key(request, sampling, model, call.tenant)
        if key is not None and request.cache_mode.reads:
            with clock.hop("cache"):
                hit = await self._cache.lookup(key)
            if hit is not None:
                if hit.text:
                    yield TokenDelta(hit.text)
                yield Outcome(hit.text, hit.finish_reason, hit.prompt_tokens, hit.completion_tokens,
                              True, model, clock.finish())
                return
        prompt, chat = await self.messages(request.prompt, call, clock)
        with clock.hop("tokenizer"):
            token_ids = await self._downstream.encode_chat(
                chat, model, self.timeout(self._settings.tokenizer_timeout_s, call), call.metadata)
        parts: list[str] = []
        end = None
        begun = time.perf_counter()
        async for event in self._downstream.generate(
            token_ids, sampling, model, call.tenant,
            self.timeout(self._settings.inference_timeout_s, call), call.metadata,
        ):
            if isinstance(event, TokenDelta):
                if not parts:
                    clock.record("inference.ttft", begun)
                parts.append(event.text)
                yield event
            else:
                end = event
        clock.record("inference", begun)
        if end is None or end.finish_reason == CANCELLED:
            return
        if not parts:
            clock.record("inference.ttft", begun)
        outcome = Outcome("".join(parts), end.finish_reason, end.prompt_tokens, end.completion_tokens,
                          False, model, clock.finish())
        if key is not None and request.cache_mode.writes:
            self._store_later(prompt, sampling, model, call, outcome)
        yield outcome

    async def count_tokens(self, prompt: TemplateCall | Chat, requested_model: str, call: CallContext,
                           clock: HopClock) -> tuple[int, str]:
        model = self.resolve_model(requested_model)
        _, chat = await self.messages(prompt, call, clock)
        with clock.hop("tokenizer"):
            count = await self._downstream.count_chat(
                chat, model, self.timeout(self._settings.tokenizer_timeout_s, call), call.metadata)
        return count, model

    async def messages(self, prompt: TemplateCall | Chat, call: CallContext, clock: HopClock
                       ) -> tuple[TemplateCall | Chat, Chat]:
        """The chat messages a prompt stands for (a template is rendered)."""
        if isinstance(prompt, Chat):
            return prompt, prompt
        with clock.hop("template"):
            rendered = await self._downstream.render(
                prompt, self.timeout(self._settings.template_timeout_s, call), call.metadata)
        resolved = TemplateCall(prompt.id, rendered.version, prompt.variables)
        return resolved, Chat(rendered.messages)

    async def _cache_key(self, request: PromptRequest, sampling: Sampling, model: str,
                         tenant: str) -> PromptCacheKey | None:
        if self._cache is None or request.cache_mode == CacheMode.BYPASS or not sampling.deterministic:
            return None
        prompt = request.prompt
        if isinstance(prompt, TemplateCall):
            version = await self._templates.resolve(prompt.id, prompt.version)
            if version is None:
                return None  # unknown here: the template hop will say NOT_FOUND
            key_prompt = TemplatePrompt(prompt.id, version, prompt.variables)
        else:
            key_prompt = ChatPrompt(prompt.messages)
        return PromptCacheKey(tenant, model, self._model.revision, key_prompt, _key_sampling(sampling))

    def _store_later(self, prompt, sampling: Sampling, model: str, call: CallContext, outcome: Outcome) -> None:
        """Stores the answer off the caller's path; a failure is logged, never raised."""
        request = store_request(
            {"tenant": call.tenant, "model": model, "revision": self._model.revision, "prompt": prompt},
            sampling,
            {"text": outcome.text, "finish_reason": outcome.finish_reason, "prompt_tokens": outcome.prompt_tokens,
             "completion_tokens": outcome.completion_tokens, "model": model},
        )
        task = asyncio.get_running_loop().create_task(self._store(request))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _store(self, request) -> None:
        try:
            await self._downstream.store(request, self._settings.cache_store_timeout_s)
        except Exception as error:
            log.warning("prompt cache store failed: %s", error)

    async def drain(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=self._settings.cache_store_timeout_s)


def _key_sampling(sampling: Sampling) -> KeySampling:
    return KeySampling(sampling.max_new_tokens, sampling.temperature, sampling.top_p, sampling.top_k,
                       sampling.seed, sampling.stop)
