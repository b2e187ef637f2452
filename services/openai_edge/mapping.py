"""OpenAI's request bodies onto the gateway's GenerateRequest, and the gateway's answers back into OpenAI's JSON.

Every field of a body is either mapped or refused: a field the edge cannot honour (``n`` > 1, ``tools``, ...) is a
400 naming it, never ignored. The extension field ``nlpmesh`` carries what OpenAI's API has no word for:

    "nlpmesh": {"template": {"id": "finance_question", "version": "", "variables": {...}},
                "cache": "use" | "bypass" | "refresh", "budget_ms": 2000}

A template replaces ``messages`` (chat) or ``prompt`` (completions), which must then be absent or empty.
"""
from __future__ import annotations

import array
import base64
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nlpmesh_client import Generation, Message, ResponseFormat, Sampling, Template, TokenLogprob
from nlpmesh_client.types import CACHE_MODES

MAX_TOP_LOGPROBS = 20  # OpenAI's bound for chat
MAX_COMPLETION_LOGPROBS = 5  # and for completions
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# The fields each endpoint honours; any other is refused by name.
COMMON_FIELDS = frozenset({"model", "stream", "stream_options", "temperature", "top_p", "max_tokens", "stop", "seed",
                           "presence_penalty", "frequency_penalty", "n", "nlpmesh"})
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "logprobs"}
EXTENSION_FIELDS = frozenset({"template", "cache", "budget_ms"})
EMBEDDING_FIELDS = frozenset({"input", "model", "encoding_format", "dimensions", "user", "nlpmesh"})
ENCODING_FORMATS = ("float", "base64")
FINISH_REASONS = {"stop": "stop", "stop_sequence": "stop", "length": "length", "cancelled": "stop"}


class BadRequest(Exception):
    """A body the edge refuses: HTTP 400 with OpenAI's error JSON; ``param`` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


@dataclass(frozen=True)
class Call:
    """One generation, as the gateway is asked for it."""
    prompt: str | Template | tuple[Message, ...]
    model: str
    sampling: Sampling
    cache: str
    budget_ms: int
    stream: bool
    include_usage: bool
    chat: bool


def parse_json(body: bytes) -> dict:
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("the body is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise BadRequest("the body must be a JSON object")
    return parsed


def chat_call(body: Mapping) -> Call:
    given = _given(body, CHAT_FIELDS)
    template = _template(given)
    messages = given.get("messages") or []
    if template is not None:
        if messages:
            raise BadRequest("messages: give either messages or nlpmesh.template, not both", "messages")
        prompt = template
    else:
        prompt = _messages(messages)
    logprobs = None
    if _typed(given, "logprobs", bool, False):
        logprobs = _bounded_int(given, "top_logprobs", 0, MAX_TOP_LOGPROBS, 0)
    elif "top_logprobs" in given:
        raise BadRequest("top_logprobs: needs logprobs: true", "top_logprobs")
    if "max_tokens" in given and "max_completion_tokens" in given:
        raise BadRequest("max_tokens and max_completion_tokens: give one", "max_completion_tokens")
    max_field = "max_completion_tokens" if "max_completion_tokens" in given else "max_tokens"
    return _call(given, prompt, logprobs, _response_format(given.get("response_format")), max_field, chat=True)


def completion_call(body: Mapping) -> Call:
    """A completion's prompt is sent as one user message: the model's chat template applies."""
    given = _given(body, COMPLETION_FIELDS)
    template = _template(given)
    prompt = given.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if template is not None:
        if prompt:
            raise BadRequest("prompt: give either prompt or nlpmesh.template, not both", "prompt")
        chosen: str | Template = template
    elif isinstance(prompt, str) and prompt:
        chosen = prompt
    else:
        raise BadRequest("prompt: one non-empty string (a list of several prompts is not supported)", "prompt")
    logprobs = _bounded_int(given, "logprobs", 0, MAX_COMPLETION_LOGPROBS, None)
    return _call(given, chosen, logprobs, None, "max_tokens", chat=False)


@dataclass(frozen=True)
class EmbeddingCall:
    """One /v1/embeddings request, as the gateway's Embed is asked for it."""
    texts: tuple[str, ...]
    model: str
    encoding_format: str  # float: lists of numbers; base64: each vector's float32 bytes (little-endian)
    dimensions: int | None  # what the caller expects; the model's own length is the only one served
    budget_ms: int


def embedding_call(body: Mapping) -> EmbeddingCall:
    """``input`` is a string or a list of strings; token-id arrays are refused (the mesh tokenizes)."""
    given = _given(body, EMBEDDING_FIELDS)
    texts = given.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts or not all(isinstance(text, str) for text in texts):
        raise BadRequest("input: a string or a non-empty list of strings (token arrays are not supported)", "input")
    encoding = given.get("encoding_format", "float")
    if encoding not in ENCODING_FORMATS:
        raise BadRequest(f"encoding_format: one of {', '.join(ENCODING_FORMATS)}", "encoding_format")
    _typed(given, "user", str, "")
    extension = given.get("nlpmesh") or {}
    if not isinstance(extension, dict) or set(extension) - {"budget_ms"}:
        raise BadRequest("nlpmesh: only budget_ms applies to embeddings", "nlpmesh")
    return EmbeddingCall(tuple(texts), _typed(given, "model", str, ""), encoding,
                         _bounded_int(given, "dimensions", 1, 1 << 16, None),
                         _bounded_int(extension, "budget_ms", 1, 2**31, 0, "nlpmesh."))


def embeddings(call: EmbeddingCall, response) -> dict:
    """OpenAI's embeddings list from the gateway's EmbedResponse."""
    if call.encoding_format == "base64":
        data = [base64.b64encode(_little_endian_floats(one.values)).decode("ascii") for one in response.embeddings]
    else:
        data = [list(one.values) for one in response.embeddings]
    tokens = response.usage.prompt_tokens
    return {"object": "list", "model": response.model,
            "data": [{"object": "embedding", "index": i, "embedding": vector} for i, vector in enumerate(data)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def _little_endian_floats(values) -> bytes:
    packed = array.array("f", values)
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes()


def _given(body: Mapping, allowed: frozenset[str]) -> dict:
    """The body's fields that are not null; a field outside ``allowed`` is refused by name."""
    given = {k: v for k, v in body.items() if v is not None}
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise BadRequest(f"not supported by this server: {', '.join(unknown)}", unknown[0])
    if given.get("n", 1) != 1:
        raise BadRequest("n: only 1 is supported", "n")
    return given


def _call(given: dict, prompt, logprobs: int | None, response_format: ResponseFormat | None, max_field: str,
          chat: bool) -> Call:
    extension = given.get("nlpmesh") or {}
    cache = extension.get("cache", "use")
    if cache not in CACHE_MODES:
        raise BadRequest(f"nlpmesh.cache: one of {', '.join(CACHE_MODES)}", "nlpmesh.cache")
    stop = given.get("stop", ())
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise BadRequest("stop: a string or a list of strings", "stop")
    stream = _typed(given, "stream", bool, False)
    options = given.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise BadRequest("stream_options: only include_usage is supported", "stream_options")
    if options and not stream:
        raise BadRequest("stream_options: only with stream: true", "stream_options")
    seed = given.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise BadRequest("seed: a non-negative integer", "seed")
    sampling = Sampling(
        max_new_tokens=_bounded_int(given, max_field, 1, 2**31, 0),
        temperature=_number(given, "temperature"), top_p=_number(given, "top_p"), seed=seed, stop=tuple(stop),
        presence_penalty=_number(given, "presence_penalty"), frequency_penalty=_number(given, "frequency_penalty"),
        logprobs=logprobs, response_format=response_format)
    model = _typed(given, "model", str, "")
    return Call(prompt, model, sampling, cache, _bounded_int(extension, "budget_ms", 1, 2**31, 0, "nlpmesh."),
                stream, options.get("include_usage", True) is not False, chat)


def _template(given: dict) -> Template | None:
    extension = given.get("nlpmesh")
    if extension is None:
        return None
    if not isinstance(extension, dict):
        raise BadRequest("nlpmesh: an object", "nlpmesh")
    unknown = sorted(set(extension) - EXTENSION_FIELDS)
    if unknown:
        raise BadRequest(f"not supported by this server: {', '.join('nlpmesh.' + u for u in unknown)}",
                         "nlpmesh." + unknown[0])
    template = extension.get("template")
    if template is None:
        return None
    if not isinstance(template, dict) or set(template) - {"id", "version", "variables"} or \
            not isinstance(template.get("id"), str) or not template["id"]:
        raise BadRequest("nlpmesh.template: {id, version (optional), variables (optional)}", "nlpmesh.template")
    variables = template.get("variables") or {}
    if not isinstance(variables, dict) or not all(
            isinstance(v, (str, int, float, bool)) for v in variables.values()):
        raise BadRequest("nlpmesh.template.variables: an object of strings, numbers and booleans",
                         "nlpmesh.template.variables")
    return Template(template["id"], variables, str(template.get("version") or ""))


def _messages(messages) -> tuple[Message, ...]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: a non-empty list (or nlpmesh.template)", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}]: an object", f"messages[{i}]")
        unknown = sorted(set(message) - {"role", "content", "name"})
        if unknown:
            raise BadRequest(f"messages[{i}]: not supported by this server: {', '.join(unknown)}",
                             f"messages[{i}].{unknown[0]}")
        role = ROLES.get(message.get("role"))
        if role is None:
            raise BadRequest(f"messages[{i}].role: one of {', '.join(ROLES)}", f"messages[{i}].role")
        out.append(Message(role, _content(message.get("content"), i)))
    return tuple(out)


def _content(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise BadRequest(f"messages[{i}].content: a string or text parts (other parts are not supported)",
                     f"messages[{i}].content")


def _response_format(value) -> ResponseFormat | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat.json_schema({"type": "object"})
    if kind == "json_schema":
        schema = (value.get("json_schema") or {}).get("schema") if isinstance(value.get("json_schema"), dict) \
            else None
        if not isinstance(schema, dict):
            raise BadRequest("response_format.json_schema.schema: a JSON Schema object",
                             "response_format.json_schema.schema")
        return ResponseFormat.json_schema(schema)
    raise BadRequest("response_format.type: one of text, json_object, json_schema", "response_format.type")


def _typed(given: Mapping, name: str, kind: type, default):
    value = given.get(name, default)
    if not isinstance(value, kind):
        raise BadRequest(f"{name}: a {kind.__name__}", name)
    return value


def _number(given: Mapping, name: str) -> float:
    value = given.get(name, 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BadRequest(f"{name}: a number", name)
    return float(value)


def _bounded_int(given: Mapping, name: str, low: int, high: int, default, prefix: str = ""):
    if name not in given:
        return default
    value = given[name]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise BadRequest(f"{prefix}{name}: an integer in [{low}, {high}]", prefix + name)
    return value


# The answers: OpenAI's JSON, with the mesh's own facts under "nlpmesh".

def usage(generation: Generation) -> dict:
    prompt, completion = generation.usage.prompt_tokens, generation.usage.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def extension(generation: Generation) -> dict:
    return {"cache_hit": generation.cache_hit, "request_id": generation.request_id, "trace_id": generation.trace_id,
            "server_timing": dict(generation.server_timing)}


def chat_logprobs(tokens: Sequence[TokenLogprob]) -> dict:
    return {"content": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode()),
                         "top_logprobs": [{"token": o.token, "logprob": o.logprob, "bytes": list(o.token.encode())}
                                          for o in t.top]} for t in tokens]}


def completion_logprobs(tokens: Sequence[TokenLogprob]) -> dict:
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t.token)
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{o.token: o.logprob for o in t.top} for t in tokens], "text_offset": offsets}


def answer(call: Call, generation: Generation, response_id: str) -> dict:
    """The whole answer of a non-streamed call."""
    reason = FINISH_REASONS.get(generation.finish_reason, "stop")
    logprobs = None
    if call.sampling.logprobs is not None:
        logprobs = (chat_logprobs if call.chat else completion_logprobs)(generation.logprobs)
    if call.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": generation.text, "refusal": None},
                  "logprobs": logprobs, "finish_reason": reason}
    else:
        choice = {"index": 0, "text": generation.text, "logprobs": logprobs, "finish_reason": reason}
    return {"id": response_id, "object": "chat.completion" if call.chat else "text_completion",
            "created": int(time.time()), "model": generation.model, "choices": [choice], "usage": usage(generation),
            "system_fingerprint": None, "nlpmesh": extension(generation)}


def chunk(call: Call, response_id: str, created: int, model: str, delta: str | None,
          logprobs: Sequence[TokenLogprob] = (), finish_reason: str | None = None, first: bool = False) -> dict:
    """One streamed chunk: a text delta, or (``finish_reason`` set) the end of the choice."""
    lp = None
    if call.sampling.logprobs is not None and logprobs:
        lp = (chat_logprobs if call.chat else completion_logprobs)(logprobs)
    reason = None if finish_reason is None else FINISH_REASONS.get(finish_reason, "stop")
    if call.chat:
        body = {} if delta is None else {"content": delta}
        if first:
            body["role"] = "assistant"
        choice = {"index": 0, "delta": body, "logprobs": lp, "finish_reason": reason}
    else:
        choice = {"index": 0, "text": delta or "", "logprobs": lp, "finish_reason": reason}
    return {"id": response_id, "object": "chat.completion.chunk" if call.chat else "text_completion",
            "created": created, "model": model, "choices": [choice], "system_fingerprint": None}


def usage_chunk(call: Call, response_id: str, created: int, generation: Generation) -> dict:
    """The last chunk: no choices, the usage (and the mesh's facts)."""
    return {"id": response_id, "object": "chat.completion.chunk" if call.chat else "text_completion",
            "created": created, "model": generation.model, "choices": [], "usage": usage(generation),
            "system_fingerprint": None, "nlpmesh": extension(generation)}


def models(listed) -> dict:
    return {"object": "list", "data": [{"id": m.id, "object": "model", "created": 0, "owned_by": "nlpmesh"}
                                       for m in listed]}
