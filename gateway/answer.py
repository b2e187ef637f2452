"""The order of hops for one request: cache, then template, tokenizer, inference.

Plain orchestration over the Downstream clients and the prompt cache; no
protobuf here. ``stream`` yields text deltas and ends with one ``Outcome``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from gateway.coalescing import Coalescer
from gateway.coalescing_replicas import HeldLease, LeaseTimes, ReplicaCoalescing
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
from meshkit.response_format import ResponseFormat
from meshkit.sampling import Sampling
from promptcache.keys import ChatPrompt, PromptCacheKey, TemplatePrompt
from promptcache.leases import GenerationLeases
from promptcache.near_tier import NearCache
from promptcache.redis_tier import CachedAnswer, PromptCache

log = logging.getLogger("nlpmesh.gateway")

# The hops a generated answer needs before the inference hop, in order. Whether the first token can come
# in the time left is the inference service's to judge: its engine knows its queue and its prefill rate,
# and refuses before any compute (DEADLINE_EXCEEDED naming the inference hop). A median of past first
# tokens would go on refusing short budgets long after a burst that raised it had passed.
_PATH_TO_FIRST_TOKEN = (Hop.TEMPLATE, Hop.TOKENIZER)


@dataclass(frozen=True)
class Miss:
    """A request the prompt cache did not answer, with what its generation needs."""

    request: PromptRequest
    key: PromptCacheKey | None  # None: its answer is not one to share (sampled, or CACHE_MODE_BYPASS)
    cached: bool  # its answer may be stored (a key, a prompt cache, a tenant that uses it)
    sampling: Sampling  # the request's, with the model's default max_new_tokens filled in
    pool: InferencePool


@dataclass(frozen=True)
class Outcome:
    text: str
    finish_reason: int
    prompt_tokens: int
    completion_tokens: int
    cache_hit: bool
    model: str
    timings: list[HopTiming]
    logprobs: tuple = ()  # those of tokens no TokenDelta carried (the inference service's TokenLogprob)


class Answerer:
    def __init__(self, downstream: Downstream, cache: PromptCache | None, templates: TemplateIndex,
                 models: ModelRoutes, settings):
        self._downstream = downstream
        self._cache = cache
        self._templates = templates
        self._models = models
        self._settings = settings
        self._background: set[asyncio.Task] = set()
        self._coalescer = Coalescer() if settings.coalescing == "on" else None
        self._replicas = replica_coalescing(cache, settings) if self._coalescer is not None else None

    async def stream(self, request: PromptRequest, scope: RequestScope) -> AsyncIterator[TokenDelta | Outcome]:
        capture = self._settings.capture_content
        if capture:
            record_prompt(scope.span, request.prompt)
        async for event in self._answer(request, scope):
            if capture and isinstance(event, Outcome):
                record_completion(scope.span, event.text)
            yield event

    async def _answer(self, request: PromptRequest, scope: RequestScope) -> AsyncIterator[TokenDelta | Outcome]:
        pool = self._models.resolve(request.model)
        sampling = request.sampling
        if not sampling.max_new_tokens:
            sampling = sampling.with_max_new_tokens(pool.info.default_max_new_tokens)
        key = await self._request_key(request, sampling, pool, scope.tenant)
        cached = key is not None and self._cache is not None and scope.tenant.prompt_cache
        miss = Miss(request, key, cached, sampling, pool)
        if cached and request.cache_mode.reads:
            hit = await self._lookup(key, scope)
            if hit is not None:
                async for event in _answered_by(hit, pool.info.model, scope):
                    yield event
                return
        if key is None or self._coalescer is None:  # sampled, or BYPASS: a generation of its own
            events = self._made(miss, scope)
        else:
            events = self._coalescer.stream(key, scope, functools.partial(self._made, miss))
        async for event in events:
            yield event

    async def _made(self, miss: Miss, scope: RequestScope) -> AsyncIterator[TokenDelta | Outcome]:
        """A miss's answer: generated here (under a lease on its key when replicas share Redis), or the one
        another replica stored while this one waited for it (gateway/coalescing_replicas.py)."""
        lease = None
        if miss.cached and self._replicas is not None:
            found = await self._replicas.lead_or_wait(miss.key, scope, may_wait=miss.request.cache_mode.reads)
            if isinstance(found, CachedAnswer):
                async for event in _answered_by(found, miss.pool.info.model, scope):
                    yield event
                return
            lease = found
        stored = False  # an answer went to the store, which releases the lease after it
        try:
            # Admitted, or refused with RetryInfo, before any hop is spent on it.
            with miss.pool.capacity.generation():
                async for event in self._generated(miss, scope, lease):
                    stored = isinstance(event, Outcome) and miss.cached and miss.request.cache_mode.writes
                    yield event
        finally:
            if lease is not None and not stored:  # released now, off the caller's path
                self._in_background(lease.release())

    async def _generated(self, miss: Miss, scope: RequestScope, lease: HeldLease | None
                         ) -> AsyncIterator[TokenDelta | Outcome]:
        """Template, tokenizer and inference hops; the answer is stored for next time (then ``lease`` released)."""
        request, key, pool = miss.request, miss.key, miss.pool
        # A key names the template version it was derived with: render exactly that
        # one, so the answer stored under the key is the answer to the key.
        prompt = request.prompt
        if key is not None and isinstance(key.prompt, TemplatePrompt):
            prompt = TemplateCall(key.prompt.id, key.prompt.version, key.prompt.variables)
        scope.ensure_can_cover(_PATH_TO_FIRST_TOKEN[0 if isinstance(prompt, TemplateCall) else 1:])
        chat, declared_format = await self._rendered(prompt, scope)
        sampling = miss.sampling
        if sampling.response_format is None and declared_format is not None:
            # The version's declared form; the key names that version, so the answer stored under it has that form.
            sampling = dataclasses.replace(sampling, response_format=declared_format)
        scope.ensure_can_cover(_PATH_TO_FIRST_TOKEN[1:])
        with scope.hop(Hop.TOKENIZER) as hop:
            token_ids = await self._downstream.encode_chat(chat, pool.info.model, hop.timeout_s, hop.metadata)
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
                          False, pool.info.model, scope.finish(), end.logprobs)
        if miss.cached and request.cache_mode.writes:
            self._store_later(key, outcome, scope, lease)
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
        return (await self._rendered(prompt, scope))[0]

    async def _rendered(self, prompt: TemplateCall | Chat, scope: RequestScope
                        ) -> tuple[Chat, ResponseFormat | None]:
        """The chat messages a prompt stands for, and the response format its template version declares."""
        if isinstance(prompt, Chat):
            return prompt, None
        with scope.hop(Hop.TEMPLATE) as hop:
            rendered = await self._downstream.render(prompt, hop.timeout_s, hop.metadata)
        return Chat(rendered.messages), rendered.response_format

    async def _request_key(self, request: PromptRequest, sampling: Sampling, pool: InferencePool,
                           tenant: Tenant) -> PromptCacheKey | None:
        """The request's one prompt-cache key, or None when its answer is not one to share.

        The key is what the prompt cache stores an answer under and what identical requests in flight share
        one generation by (gateway/coalescing.py). The tenant salts it: one tenant never reads another's
        answer, nor joins another's generation. The model's id and revision are in it: one model never answers
        from another's entries, nor a new revision from an old one's. Sampled requests (neither greedy nor
        seeded), those asking for log-probabilities (the cache keeps none) and CACHE_MODE_BYPASS ones (they ask
        for a generation of their own) get none.
        """
        if request.cache_mode == CacheMode.BYPASS or not sampling.cacheable:
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

    def _store_later(self, key: PromptCacheKey, outcome: Outcome, scope: RequestScope,
                     lease: HeldLease | None) -> None:
        """Stores the answer off the caller's path, then releases ``lease``; a failure is logged, never raised."""
        answer = CachedAnswer(outcome.text, outcome.finish_reason, outcome.prompt_tokens,
                              outcome.completion_tokens, outcome.model)
        # The task runs in the request's context: the store joins the request's trace.
        self._in_background(self._store(key, answer, scope.background_metadata(), lease))

    def _in_background(self, work) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _store(self, key: PromptCacheKey, answer: CachedAnswer, metadata, lease: HeldLease | None) -> None:
        try:
            await self._downstream.store(key, answer, self._settings.cache_store_timeout_s, metadata)
        except Exception as error:
            log.warning("prompt cache store failed: %s", type(error).__name__)
        finally:
            if lease is not None:  # after the store: a replica waiting for the answer finds it, or generates
                await lease.release()

    async def drain(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=self._settings.cache_store_timeout_s)


async def _answered_by(answer: CachedAnswer, model: str, scope: RequestScope) -> AsyncIterator[TokenDelta | Outcome]:
    """A stored answer as a stream: its text, then its outcome (a cache hit)."""
    if answer.text:
        yield TokenDelta(answer.text)
    yield Outcome(answer.text, answer.finish_reason, answer.prompt_tokens, answer.completion_tokens, True, model,
                  scope.finish())


def replica_coalescing(cache: PromptCache | NearCache | None, settings) -> ReplicaCoalescing | None:
    """Coalescing across the replicas sharing the prompt cache's Redis; None without one."""
    if cache is None:
        return None
    backing = cache.backing if isinstance(cache, NearCache) else cache
    leases = GenerationLeases(backing.redis, backing.prefix, settings.coalescing_redis_timeout_s)
    return ReplicaCoalescing(leases, LeaseTimes(settings.coalescing_lease_s, settings.coalescing_wait_s,
                                                settings.coalescing_poll_s))
