"""The order of hops for one request: cache, then template, tokenizer, inference.

Plain orchestration over the Downstream clients and the prompt cache; no
protobuf here. ``stream`` yields text deltas and ends with one ``Outcome``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from gateway.downstream import Downstream
from gateway.hop import Hop
from gateway.inference_pool import InferencePool
from gateway.inference_stream import GenerationEnd, TokenDelta
from gateway.model_routes import ModelRoutes
from gateway.prompt_capture import record_completion, record_prompt
from gateway.request import CacheMode, Chat, PromptRequest, TemplateCall
from gateway.scope import RequestScope
from gateway.template_index import TemplateIndex
from gateway.tenant import Tenant
from gateway.timings import HopTiming
from meshkit.sampling import Sampling
from promptcache.keys import ChatPrompt, PromptCacheKey, TemplatePrompt
from promptcache.redis_tier import CachedAnswer, PromptCache

log = logging.getLogger("nlpmesh.gateway")

# The hops a generated answer needs before its first token, in order.
_PATH_TO_FIRST_TOKEN = (Hop.TEMPLATE, Hop.TOKENIZER, Hop.INFERENCE_TTFT)


@dataclass(frozen=True)
class Outcome:
    text: str
    finish_reason: int
    prompt_tokens: int
    completion_tokens: int
    cache_hit: bool
    model: str
    timings: list[HopTiming]


class Answerer:
    def __init__(self, downstream: Downstream, cache: PromptCache | None, templates: TemplateIndex,
                 models: ModelRoutes, settings):
        self._downstream = downstream
        self._cache = cache
        self._templates = templates
        self._models = models
        self._settings = settings
        self._background: set[asyncio.Task] = set()

    async def stream(self, request: PromptRequest, scope: RequestScope) -> AsyncIterator[TokenDelta | Outcome]:
        capture = self._settings.capture_content
        if capture:
            record_prompt(scope.span, request.prompt)
        pool = self._models.resolve(request.model)
        model = pool.info.model
        sampling = request.sampling
        if not sampling.max_new_tokens:
            sampling = sampling.with_max_new_tokens(pool.info.default_max_new_tokens)
        key = await self._cache_key(request, sampling, pool, scope.tenant)
        if key is not None and request.cache_mode.reads:
            hit = await self._lookup(key, scope)
            if hit is not None:
                if hit.text:
                    yield TokenDelta(hit.text)
                if capture:
                    record_completion(scope.span, hit.text)
                yield Outcome(hit.text, hit.finish_reason, hit.prompt_tokens, hit.completion_tokens,
                              True, model, scope.finish())
                return
        # A miss: admitted, or refused with RetryInfo, before any hop is spent on it.
        with pool.capacity.generation():
            async for event in self._generated(request, key, sampling, pool, scope):
                yield event

    async def _generated(self, request: PromptRequest, key: PromptCacheKey | None, sampling: Sampling,
                         pool: InferencePool, scope: RequestScope) -> AsyncIterator[TokenDelta | Outcome]:
        """A miss's answer: template, tokenizer and inference hops; the answer is stored for next time."""
        capture = self._settings.capture_content
        model = pool.info.model
        # A key names the template version it was derived with: render exactly that
        # one, so the answer stored under the key is the answer to the key.
        prompt = request.prompt
        if key is not None and isinstance(key.prompt, TemplatePrompt):
            prompt = TemplateCall(key.prompt.id, key.prompt.version, key.prompt.variables)
        scope.ensure_can_cover(_PATH_TO_FIRST_TOKEN[0 if isinstance(prompt, TemplateCall) else 1:])
        chat = await self.messages(prompt, scope)
        scope.ensure_can_cover(_PATH_TO_FIRST_TOKEN[1:])
        with scope.hop(Hop.TOKENIZER) as hop:
            token_ids = await self._downstream.encode_chat(chat, model, hop.timeout_s, hop.metadata)
        scope.ensure_can_cover(_PATH_TO_FIRST_TOKEN[2:])  # no inference for a request already lost
        parts: list[str] = []
        end = None
        async for event in self._generate(token_ids, sampling, pool, scope):
            if isinstance(event, TokenDelta):
                parts.append(event.text)
                yield event
            else:
                end = event
        if end is not None:
            await scope.quota_lease.record_tokens(end.completion_tokens)
        if end is None or end.cancelled:
            return
        outcome = Outcome("".join(parts), end.finish_reason, end.prompt_tokens, end.completion_tokens,
                          False, model, scope.finish())
        if key is not None and request.cache_mode.writes:
            self._store_later(key, outcome, scope)
        if capture:
            record_completion(scope.span, outcome.text)
        yield outcome

    async def _generate(self, token_ids: list[int], sampling: Sampling, pool: InferencePool, scope: RequestScope
                        ) -> AsyncIterator[TokenDelta | GenerationEnd]:
        """The inference hop, timing the first token (inference.ttft) inside it."""
        with scope.hop(Hop.INFERENCE) as hop:
            begun = time.perf_counter()
            first_seen = False
            async for event in pool.generate(token_ids, sampling, scope.tenant.id, hop.timeout_s, hop.metadata):
                if not first_seen:  # the first text, or the end when there is none
                    first_seen = True
                    scope.record_first_token(begun, time.perf_counter(), hop.span)
                yield event

    async def _lookup(self, key: PromptCacheKey, scope: RequestScope) -> CachedAnswer | None:
        """A cache lookup bounded by the cache hop's budget: out of budget is a miss, not a failure.

        The hop's span starts only when the lookup goes to Redis: a near-tier hit
        stays in this process, and its request span says so (nlpmesh.cache.tier).
        """
        with scope.hop(Hop.CACHE, deferred_span=True) as hop:
            return await self._cache.lookup(key, timeout_s=hop.timeout_s)

    async def count_tokens(self, prompt: TemplateCall | Chat, requested_model: str, scope: RequestScope
                           ) -> tuple[int, str]:
        model = self._models.resolve(requested_model).info.model
        chat = await self.messages(prompt, scope)
        with scope.hop(Hop.TOKENIZER) as hop:
            count = await self._downstream.count_chat(chat, model, hop.timeout_s, hop.metadata)
        return count, model

    async def messages(self, prompt: TemplateCall | Chat, scope: RequestScope) -> Chat:
        """The chat messages a prompt stands for (a template is rendered)."""
        if isinstance(prompt, Chat):
            return prompt
        with scope.hop(Hop.TEMPLATE) as hop:
            rendered = await self._downstream.render(prompt, hop.timeout_s, hop.metadata)
        return Chat(rendered.messages)

    async def _cache_key(self, request: PromptRequest, sampling: Sampling, pool: InferencePool,
                         tenant: Tenant) -> PromptCacheKey | None:
        """The request's one prompt-cache key, or None when its answer may not be cached.

        The tenant salts the key: one tenant never reads another's answer. The model's id and revision
        are in it: one model never answers from another's entries, nor a new revision from an old one's. A tenant
        without the prompt cache gets no key, so it neither reads nor writes.
        """
        if (self._cache is None or not tenant.prompt_cache or request.cache_mode == CacheMode.BYPASS
                or not sampling.deterministic):
            return None
        prompt = request.prompt
        if isinstance(prompt, TemplateCall):
            version = await self._templates.resolve(prompt.id, prompt.version)
            if version is None:
                return None  # unknown here: the template hop will say NOT_FOUND
            key_prompt = TemplatePrompt(prompt.id, version, prompt.variables)
        else:
            key_prompt = ChatPrompt(prompt.messages)
        return PromptCacheKey(tenant.id, pool.info.model, pool.info.revision, key_prompt, sampling)

    def _store_later(self, key: PromptCacheKey, outcome: Outcome, scope: RequestScope) -> None:
        """Stores the answer off the caller's path; a failure is logged, never raised."""
        answer = CachedAnswer(outcome.text, outcome.finish_reason, outcome.prompt_tokens,
                              outcome.completion_tokens, outcome.model)
        # The task runs in the request's context: the store joins the request's trace.
        task = asyncio.get_running_loop().create_task(self._store(key, answer, scope.background_metadata()))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _store(self, key: PromptCacheKey, answer: CachedAnswer, metadata) -> None:
        try:
            await self._downstream.store(key, answer, self._settings.cache_store_timeout_s, metadata)
        except Exception as error:
            log.warning("prompt cache store failed: %s", type(error).__name__)

    async def drain(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=self._settings.cache_store_timeout_s)
