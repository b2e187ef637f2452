"""The order of hops for one request: cache, then template, tokenizer, inference.

Plain orchestration over the Downstream clients and the prompt cache; no
protobuf here. ``stream`` yields text deltas and ends with one ``Outcome``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from meshkit.errors import NotFound
from meshkit.tracing.propagation import current_metadata, outgoing_metadata
from promptcache.keys import ChatPrompt, PromptCacheKey, TemplatePrompt
from promptcache.keys import Sampling as KeySampling
from promptcache.redis_tier import CachedAnswer, PromptCache
from services.gateway.budgets import BudgetPolicy, ObservedLatency, RequestBudget
from services.gateway.downstream import Downstream, GenerationEnd, ModelInfo, TokenDelta, store_request
from services.gateway.request import CacheMode, Chat, PromptRequest, Sampling, TemplateCall
from services.gateway.template_index import TemplateIndex
from services.gateway.timings import HopClock, HopTiming

log = logging.getLogger("nlpmesh.gateway")

# Values match nlpmesh.gateway.v1.FinishReason.
CANCELLED = 4

# The hops a generated answer needs before its first token, in order.
_PATH_TO_FIRST_TOKEN = ("template", "tokenizer", "inference.ttft")


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
    time_left: Callable[[], float | None]  # seconds left of the caller's deadline, or None


class Answerer:
    def __init__(self, downstream: Downstream, cache: PromptCache | None, templates: TemplateIndex,
                 model: ModelInfo, policy: BudgetPolicy, settings):
        self._downstream = downstream
        self._cache = cache
        self._templates = templates
        self._model = model
        self._policy = policy
        self._observed = ObservedLatency()
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

    def start_budget(self, prompt: TemplateCall | Chat, budget_ms: int, call: CallContext,
                     clock: HopClock) -> RequestBudget:
        """The request's budget, from its start: the shortest of deadline, budget_ms and policy."""
        template_id = prompt.id if isinstance(prompt, TemplateCall) else None
        budget = RequestBudget(self._policy.for_template(template_id), self._observed, call.time_left(),
                               budget_ms, started=clock.started)
        clock.budget, clock.observed = budget, self._observed
        return budget

    async def stream(self, request: PromptRequest, call: CallContext, clock: HopClock
                     ) -> AsyncIterator[TokenDelta | Outcome]:
        model = self.resolve_model(request.model)
        sampling = self.resolve_sampling(request.sampling)
        budget = self.start_budget(request.prompt, request.budget_ms, call, clock)
        key = await self._cache_key(request, sampling, model, call.tenant)
        if key is not None and request.cache_mode.reads:
            hit = await self._lookup(key, budget, clock)
            if hit is not None:
                if hit.text:
                    yield TokenDelta(hit.text)
                yield Outcome(hit.text, hit.finish_reason, hit.prompt_tokens, hit.completion_tokens,
                              True, model, clock.finish())
                return
        budget.ensure_can_cover(_PATH_TO_FIRST_TOKEN[0 if isinstance(request.prompt, TemplateCall) else 1:])
        prompt, chat = await self.messages(request.prompt, budget, clock)
        budget.ensure_can_cover(_PATH_TO_FIRST_TOKEN[1:])
        with clock.hop("tokenizer") as span:
            token_ids = await self._downstream.encode_chat(
                chat, model, budget.deadline_s("tokenizer"), outgoing_metadata(span))
        budget.ensure_can_cover(_PATH_TO_FIRST_TOKEN[2:])  # no inference for a request already lost
        parts: list[str] = []
        end = None
        async for event in self._generate(token_ids, sampling, model, call, budget, clock):
            if isinstance(event, TokenDelta):
                parts.append(event.text)
                yield event
            else:
                end = event
        if end is None or end.finish_reason == CANCELLED:
            return
        outcome = Outcome("".join(parts), end.finish_reason, end.prompt_tokens, end.completion_tokens,
                          False, model, clock.finish())
        if key is not None and request.cache_mode.writes:
            self._store_later(prompt, sampling, model, call, outcome)
        yield outcome

    async def _generate(self, token_ids: list[int], sampling: Sampling, model: str, call: CallContext,
                        budget: RequestBudget, clock: HopClock) -> AsyncIterator[TokenDelta | GenerationEnd]:
        """The inference hop, timing the first token (inference.ttft) inside it."""
        with clock.hop("inference") as span:
            begun = time.perf_counter()
            first_seen = False
            async for event in self._downstream.generate(token_ids, sampling, model, call.tenant,
                                                         budget.deadline_s("inference"), outgoing_metadata(span)):
                if not first_seen:  # the first text, or the end when there is none
                    first_seen = True
                    clock.record_span("inference.ttft", begun, time.perf_counter(), span)
                yield event

    async def _lookup(self, key: PromptCacheKey, budget: RequestBudget, clock: HopClock) -> CachedAnswer | None:
        """A cache lookup bounded by the cache hop's budget: out of budget is a miss, not a failure.

        The hop's span starts only when the lookup goes to Redis: a near-tier hit
        stays in this process, and its request span says so (nlpmesh.cache.tier).
        """
        with clock.hop("cache", deferred_span=True):
            return await self._cache.lookup(key, timeout_s=budget.deadline_s("cache"))

    async def count_tokens(self, prompt: TemplateCall | Chat, requested_model: str, call: CallContext,
                           clock: HopClock) -> tuple[int, str]:
        model = self.resolve_model(requested_model)
        budget = self.start_budget(prompt, 0, call, clock)
        _, chat = await self.messages(prompt, budget, clock)
        with clock.hop("tokenizer") as span:
            count = await self._downstream.count_chat(chat, model, budget.deadline_s("tokenizer"),
                                                      outgoing_metadata(span))
        return count, model

    async def messages(self, prompt: TemplateCall | Chat, budget: RequestBudget, clock: HopClock
                       ) -> tuple[TemplateCall | Chat, Chat]:
        """The chat messages a prompt stands for (a template is rendered)."""
        if isinstance(prompt, Chat):
            return prompt, prompt
        with clock.hop("template") as span:
            rendered = await self._downstream.render(prompt, budget.deadline_s("template"), outgoing_metadata(span))
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
            # The task runs in the request's context: the store joins the request's trace.
            await self._downstream.store(request, self._settings.cache_store_timeout_s, current_metadata())
        except Exception as error:
            log.warning("prompt cache store failed: %s", error)

    async def drain(self) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=self._settings.cache_store_timeout_s)


def _key_sampling(sampling: Sampling) -> KeySampling:
    return KeySampling(sampling.max_new_tokens, sampling.temperature, sampling.top_p, sampling.top_k,
                       sampling.seed, sampling.stop)
