"""What a caller passes (prompts, sampling) and gets back (results), as frozen dataclasses.

Each owns its conversion: ``to_pb`` for what goes out, ``from_pb`` for what comes back.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from nlpmesh_client import messages

CACHE_MODES = {"use": 1, "bypass": 2, "refresh": 3}  # CacheMode: USE, BYPASS, REFRESH


@dataclass(frozen=True)
class Message:
    """One chat turn: role is "system", "user" or "assistant"."""
    role: str
    content: str


@dataclass(frozen=True)
class Template:
    """A call of a versioned prompt template; version "" = the newest."""
    id: str
    variables: Mapping[str, str | int | float | bool] = field(default_factory=dict)
    version: str = ""


# A plain string is one user message.
Prompt = str | Template | Sequence[Message]


@dataclass(frozen=True)
class ResponseFormat:
    """The form an answer must take (guided decoding): make one with ``json_schema``, ``regex`` or ``choice``."""
    kind: str  # "json_schema", "regex" or "choice"
    value: str | tuple[str, ...]

    @classmethod
    def json_schema(cls, schema: Mapping | str) -> ResponseFormat:
        """A JSON Schema (a mapping, or its JSON text): the answer is one JSON value valid against it."""
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema))

    @classmethod
    def regex(cls, pattern: str) -> ResponseFormat:
        """The whole answer matches ``pattern`` (Rust regex syntax)."""
        return cls("regex", pattern)

    @classmethod
    def choice(cls, choices: Sequence[str]) -> ResponseFormat:
        """The answer is exactly one of ``choices``."""
        return cls("choice", tuple(choices))

    def to_pb(self, pb) -> None:
        if self.kind == "choice":
            pb.choice.choices.extend(self.value)
        else:
            setattr(pb, self.kind, self.value)

    @classmethod
    def from_pb(cls, pb) -> ResponseFormat | None:
        kind = pb.WhichOneof("format")
        if kind is None:
            return None
        return cls(kind, tuple(pb.choice.choices) if kind == "choice" else getattr(pb, kind))


@dataclass(frozen=True)
class Sampling:
    """How to generate; every zero means the server's default (greedy, 256 new tokens)."""
    max_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 0.0  # 0 = unset (1: none)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k most likely
    # The answer's form (guided decoding); None: free text, or the template version's declared form.
    # The wire carries it beside the sampling, as GenerateRequest.response_format.
    response_format: ResponseFormat | None = None

    def to_pb(self, request) -> None:
        sampling = request.sampling
        sampling.max_new_tokens, sampling.temperature = self.max_new_tokens, self.temperature
        sampling.top_p, sampling.top_k = self.top_p, self.top_k
        if self.seed is not None:
            sampling.seed = self.seed
        sampling.stop.extend(self.stop)
        sampling.repetition_penalty = self.repetition_penalty
        sampling.presence_penalty, sampling.frequency_penalty = self.presence_penalty, self.frequency_penalty
        if self.logprobs is not None:
            sampling.logprobs = self.logprobs
        if self.response_format is not None:
            self.response_format.to_pb(request.response_format)


def prompt_to_pb(prompt: Prompt, request) -> None:
    """Sets the ``prompt`` oneof of a GenerateRequest or CountTokensRequest."""
    if isinstance(prompt, str):
        prompt = [Message("user", prompt)]
    if isinstance(prompt, Template):
        request.template.id, request.template.version = prompt.id, prompt.version
        request.template.variables.update(dict(prompt.variables))
        return
    if not prompt or not all(isinstance(m, Message) for m in prompt):
        raise TypeError("prompt: a string, a Template, or a non-empty sequence of Message")
    for message in prompt:
        request.chat.messages.add(role=message.role, content=message.content)


@dataclass(frozen=True)
class HopTiming:
    """One hop of a request against its budget, as the gateway measured it."""
    hop: str
    elapsed_ms: float
    budget_ms: float
    over_budget: bool

    @classmethod
    def from_pb(cls, pb) -> HopTiming:
        return cls(pb.hop, pb.elapsed_ms, pb.budget_ms, pb.over_budget)


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model, with the most likely tokens at its position."""
    token_id: int
    token: str
    logprob: float
    top: tuple[TopLogprob, ...]

    @classmethod
    def from_pb(cls, pb) -> TokenLogprob:
        return cls(pb.token_id, pb.token, pb.logprob,
                   tuple(TopLogprob(t.token_id, t.token, t.logprob) for t in pb.top))


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Generation:
    """One whole answer, from ``generate`` or a finished ``stream``.

    ``timings`` come in the response; ``server_timing`` is the ``server-timing`` trailer parsed
    (hop -> elapsed ms), the same figures as the gateway sends them to any HTTP-minded caller.
    """
    text: str
    finish_reason: str  # "stop", "length", "stop_sequence", "cancelled"
    usage: Usage
    cache_hit: bool
    model: str
    trace_id: str
    timings: tuple[HopTiming, ...]
    request_id: str
    server_timing: Mapping[str, float]
    logprobs: tuple[TokenLogprob, ...] = ()  # Sampling.logprobs set: every generated token's, in order

    @classmethod
    def from_pb(cls, pb, text: str, request_id: str, server_timing: Mapping[str, float],
                logprobs=None) -> Generation:
        """``pb``: a GenerateResponse, or the last GenerateChunk of a stream (``logprobs``: the whole stream's)."""
        reason = messages.FINISH_REASON.values_by_number[pb.finish_reason].name.removeprefix("FINISH_REASON_")
        return cls(text, reason.lower(), Usage(pb.usage.prompt_tokens, pb.usage.completion_tokens), pb.cache_hit,
                   pb.model, pb.trace_id, tuple(HopTiming.from_pb(t) for t in pb.timings), request_id,
                   server_timing, tuple(TokenLogprob.from_pb(one) for one in (pb.token_logprobs if logprobs is None
                                                                                else logprobs)))


@dataclass(frozen=True)
class TokenCount:
    prompt_tokens: int
    model: str

    @classmethod
    def from_pb(cls, pb) -> TokenCount:
        return cls(pb.prompt_tokens, pb.model)


@dataclass(frozen=True)
class Embeddings:
    """Embed's answer: one vector per text, in the order given."""
    vectors: tuple[tuple[float, ...], ...]
    model: str
    dimensions: int
    prompt_tokens: int
    trace_id: str
    timings: tuple[HopTiming, ...]
    request_id: str
    server_timing: Mapping[str, float]

    @classmethod
    def from_pb(cls, pb, request_id: str, server_timing: Mapping[str, float]) -> Embeddings:
        return cls(tuple(tuple(one.values) for one in pb.embeddings), pb.model, pb.dimensions, pb.usage.prompt_tokens,
                   pb.trace_id, tuple(HopTiming.from_pb(t) for t in pb.timings), request_id, server_timing)


@dataclass(frozen=True)
class TemplateVariable:
    name: str
    required: bool
    description: str


@dataclass(frozen=True)
class TemplateInfo:
    id: str
    version: str
    description: str
    variables: tuple[TemplateVariable, ...]
    response_format: ResponseFormat | None = None  # the form this version's answers take, if it declares one

    @classmethod
    def from_pb(cls, pb) -> TemplateInfo:
        return cls(pb.id, pb.version, pb.description,
                   tuple(TemplateVariable(v.name, v.required, v.description) for v in pb.variables),
                   ResponseFormat.from_pb(pb.response_format))


@dataclass(frozen=True)
class ModelInfo:
    id: str
    revision: str
    context_length: int
    engine: str
    ready: bool
    default: bool
    task: str = "generation"  # or "embedding" (Embed)

    @classmethod
    def from_pb(cls, pb) -> ModelInfo:
        return cls(pb.id, pb.revision, pb.context_length, pb.engine, pb.ready, pb.default, pb.task or "generation")


def parse_server_timing(value: str) -> dict[str, float]:
    """``template;dur=0.41;desc="budget 100", cache;dur=0.62`` -> {"template": 0.41, "cache": 0.62}.
    Entries without a readable ``dur`` are left out."""
    timings = {}
    for entry in value.split(","):
        name, *params = (part.strip() for part in entry.split(";"))
        for param in params:
            key, _, number = param.partition("=")
            if name and key == "dur":
                with contextlib.suppress(ValueError):
                    timings[name] = float(number)
    return timings
