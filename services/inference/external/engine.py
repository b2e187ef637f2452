"""An OpenAI-compatible engine over HTTP: the request it is sent, its streamed answer, its errors as the mesh's.

One aiohttp session per engine holds the kept-alive connections to all its replicas. A request goes
to the replica its prompt's first tokens pick (rendezvous hashing, so a prefix goes where its KV is
cached), and to the next one if that one cannot be reached; a replica that could not be reached is
skipped for a while. Nothing the engine writes in an error (which could quote a prompt) reaches a
caller or a log: only its HTTP status.
"""
from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import aiohttp
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from meshkit.errors import (
    DeadlineExceeded,
    FieldViolation,
    InvalidArgument,
    MeshError,
    ResourceExhausted,
    Unavailable,
    _pack,
)
from meshkit.response_format import CHOICE, JSON_SCHEMA, REGEX, ResponseFormat
from meshkit.sampling import Sampling
from modelfiles.catalogue import ENGINE_SAMPLING_FIELDS, ExternalEngine
from services.inference.generation_types import Delta, Finished, FinishReason

log = logging.getLogger("nlpmesh.inference.openai")

ENGINE_HOP = "inference-engine"  # the hop a DEADLINE_EXCEEDED from the engine names
AFFINITY_TOKENS = 64  # the prompt tokens that pick a replica: a shared system prompt goes to one replica
MAX_RETRY_AFTER_S = 300.0  # a Retry-After beyond this is capped
_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "eos": FinishReason.STOP}


class EngineUnavailable(Unavailable):
    """UNAVAILABLE, with a RetryInfo when the engine said when to come back (503 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def details(self):
        if self.retry_after_s is None:
            return []
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(max(1, round(self.retry_after_s * 1000)))
        return [_pack(error_details_pb2.RetryInfo(retry_delay=delay))]


def unhonoured(sampling: Sampling, honoured: Sequence[str], passing: str = "refuse") -> list[FieldViolation]:
    """The sampling fields a request sets (away from their defaults) that the engine cannot honour:
    those its entry does not list, repetition_penalty and logprobs, which the adapter never passes on, and a
    response_format the entry's ``passing`` (its endpoint's response_format) cannot carry."""
    unset = Sampling()
    found = [FieldViolation(f"sampling.{name}", "this model's engine does not support it; leave it unset")
             for name in (*ENGINE_SAMPLING_FIELDS, "repetition_penalty", "logprobs")
             if name not in honoured and getattr(sampling, name) != getattr(unset, name)]
    wanted = sampling.response_format
    if wanted is not None and passing == "refuse":
        found.append(FieldViolation("response_format", "guided decoding is not passed on to this model's engine"))
    elif wanted is not None and wanted.kind == REGEX and passing in ("llama.cpp", "gbnf"):
        found.append(FieldViolation(wanted.field, "this model's engine takes no regular expression (llama.cpp's "
                                                  "grammars); use json_schema or choice"))
    return found


def guided_fields(passing: str, wanted: ResponseFormat | None) -> dict:
    """The /v1/completions fields that carry ``wanted`` to an engine of kind ``passing`` (unhonoured has
    refused what it cannot carry)."""
    if wanted is None or passing == "refuse":
        return {}
    if passing == "vllm":  # vLLM >= 0.11: StructuredOutputsParams
        key = {JSON_SCHEMA: "json", REGEX: "regex", CHOICE: "choice"}[wanted.kind]
        value = json.loads(wanted.value) if wanted.kind == JSON_SCHEMA else wanted.value
        return {"structured_outputs": {key: list(value) if wanted.kind == CHOICE else value}}
    if passing == "sglang":  # json_schema as JSON text; a choice as a regex of its alternatives
        if wanted.kind == JSON_SCHEMA:
            return {"json_schema": wanted.value}
        return {"regex": wanted.value if wanted.kind == REGEX else "(" + "|".join(map(re.escape, wanted.value)) + ")"}
    if wanted.kind == CHOICE:
        return {"grammar": choice_gbnf(wanted.value)}
    if passing == "llama.cpp":  # llama.cpp's server converts the schema itself
        return {"json_schema": json.loads(wanted.value)}
    return {"grammar": json_schema_gbnf(wanted.value)}


def choice_gbnf(choices: Sequence[str]) -> str:
    """A GBNF grammar whose only sentences are ``choices``."""
    def literal(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r") + '"'

    return "root ::= " + " | ".join(literal(choice) for choice in choices)


def json_schema_gbnf(schema: str) -> str:
    """llama.cpp's own JSON Schema to GBNF conversion (llama-cpp-python's ``llama_grammar``), for an engine that
    takes nothing but a grammar; the adapter checks at start that it is installed (``check_passing``)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return json_schema_to_gbnf(schema)


def check_passing(passing: str) -> None:
    """RuntimeError (the adapter does not start) when ``passing`` needs a converter that is not installed."""
    if passing == "gbnf" and importlib.util.find_spec("llama_cpp") is None:
        raise RuntimeError("endpoint.response_format = \"gbnf\" converts JSON Schemas with llama-cpp-python's "
                           "llama_grammar: install llama-cpp-python beside the adapter, or use \"refuse\"")


def completion_body(served_model: str, prompt: list[int] | str, sampling: Sampling, passing: str = "refuse") -> dict:
    """The /v1/completions request for a resolved request (max_new_tokens and top_p filled in)."""
    body: dict = {"model": served_model, "prompt": prompt, "stream": True, "max_tokens": sampling.max_new_tokens,
                  "temperature": sampling.temperature, "top_p": sampling.top_p or 1.0,
                  "stream_options": {"include_usage": True}}
    if sampling.top_k:
        body["top_k"] = sampling.top_k
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(sampling, name):
            body[name] = getattr(sampling, name)
    body.update(guided_fields(passing, sampling.response_format))
    return body


def retry_after_s(value: str | None, default_s: float) -> float:
    """Retry-After's delay in seconds (only the delay-seconds form; a date or nonsense gives the default)."""
    try:
        seconds = float(value) if value is not None else default_s
    except ValueError:
        return default_s
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S) if seconds == seconds else default_s


def error_for_status(status: int, retry_after: str | None, default_retry_s: float) -> MeshError:
    """The mesh's error for an engine's HTTP refusal; its body is never read into it."""
    if status == 429:
        return ResourceExhausted(f"the inference engine is at capacity (HTTP {status}); retry later",
                                 retry_after_s=retry_after_s(retry_after, default_retry_s), reason="ENGINE_AT_CAPACITY")
    if status == 503:
        return EngineUnavailable(f"the inference engine is unavailable (HTTP {status})",
                                 retry_after_s=retry_after_s(retry_after, default_retry_s))
    if status in (400, 422):
        return InvalidArgument(f"the inference engine refused the request as invalid (HTTP {status})")
    if status in (408, 504):
        return DeadlineExceeded(f"the inference engine timed out (HTTP {status})", hop=ENGINE_HOP)
    if status in (401, 403):
        return Unavailable(f"the inference engine refused the adapter's credentials (HTTP {status}); "
                           f"check the catalogue entry's token")
    if status == 404:
        return Unavailable(f"the inference engine has no such model or path (HTTP {status}); "
                           f"check the catalogue entry's endpoint")
    return Unavailable(f"the inference engine failed (HTTP {status})")


def _ssl_context(engine: ExternalEngine) -> ssl.SSLContext | bool:
    return ssl.create_default_context(cafile=str(engine.ca_file)) if engine.ca_file else True


@dataclass
class _Replica:
    url: str
    down_until: float = 0.0  # monotonic: skipped until then


class EngineClient:
    """The engine's replicas behind one pooled HTTP client (an aiohttp session: its connections kept alive).

    Made in the event loop that uses it. At most ``max_connections`` requests are in flight at once; one that
    finds them all busy for ``connect_timeout_s`` is refused (this adapter's limit, not a replica's fault).
    """

    def __init__(self, engine: ExternalEngine, *, connect_timeout_s: float, read_timeout_s: float,
                 replica_down_s: float, max_connections: int, retry_after_s: float):
        self.engine = engine
        self._replicas = [_Replica(url) for url in engine.urls]
        self._down_s = replica_down_s
        self._retry_after_s = retry_after_s
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._slots = asyncio.Semaphore(max_connections)
        token = engine.token()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # No limit in the connector: the slots bound the generations, and /metrics and /v1/models polls
        # never wait behind them.
        self.http = aiohttp.ClientSession(
            headers=headers, connector=aiohttp.TCPConnector(limit=0, ssl=_ssl_context(engine)),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s))

    async def close(self) -> None:
        await self.http.close()

    def order(self, prompt_token_ids: Sequence[int]) -> list[str]:
        """The replicas to try for this prompt, best first: rendezvous hashing on its first tokens, the ones
        recently unreachable last."""
        key = b"".join(token.to_bytes(4, "little") for token in prompt_token_ids[:AFFINITY_TOKENS])
        ranked = sorted(self._replicas, key=lambda r: hashlib.blake2b(key + r.url.encode(), digest_size=8).digest())
        now = time.monotonic()
        return [r.url for r in ranked if r.down_until <= now] + [r.url for r in ranked if r.down_until > now]

    def _mark_down(self, url: str) -> None:
        for replica in self._replicas:
            if replica.url == url:
                replica.down_until = time.monotonic() + self._down_s

    async def _slot(self) -> None:
        """One of the ``max_connections`` slots, waiting ``connect_timeout_s`` at most when all are busy."""
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            raise ResourceExhausted("the adapter's connections to the inference engine are all in use",
                                    retry_after_s=self._retry_after_s, reason="ENGINE_AT_CAPACITY") from None

    async def generate(self, body: dict, prompt_token_ids: Sequence[int]) -> AsyncIterator[Delta | Finished]:
        """The engine's answer, as it streams. Leaving the iteration early (the caller cancelled, the deadline
        passed) closes the HTTP response, and with it the engine's generation."""
        await self._slot()
        try:
            for url in self.order(prompt_token_ids):
                try:
                    async with self.http.post(f"{url}/v1/completions", json=body) as response:
                        if response.status != 200:
                            raise error_for_status(response.status, response.headers.get("Retry-After"),
                                                   self._retry_after_s)
                        async for item in self._items(response, len(prompt_token_ids), body.get("stop") or ()):
                            yield item
                        return
                except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
                    log.warning("inference engine replica %s unreachable; trying the next", url)
                    self._mark_down(url)
                except aiohttp.SocketTimeoutError:
                    raise DeadlineExceeded(f"the inference engine sent nothing for {self._read_timeout_s:g} s",
                                           hop=ENGINE_HOP) from None
                except aiohttp.ClientError as error:  # the connection broke or closed mid-answer
                    self._mark_down(url)
                    raise Unavailable("the inference engine's stream broke off") from error
            raise Unavailable(f"no replica of the inference engine can be reached ({len(self._replicas)} tried)")
        finally:
            self._slots.release()

    async def _items(self, response: aiohttp.ClientResponse, prompt_tokens: int, stop: Sequence[str]
                     ) -> AsyncIterator[Delta | Finished]:
        completion_tokens, usage, finish, done = 0, None, None, False
        try:
            async for raw in response.content:  # line by line
                if done or not raw.startswith(b"data:"):
                    continue  # blank separators, ": ping" comments, event names; after [DONE], the body's end
                data = raw[5:].strip()
                if data == b"[DONE]":
                    # Read on to the end of the body: a connection whose response was left unread is closed,
                    # not kept alive, and the next request would open a new one.
                    done = True
                    continue
                try:
                    chunk = json.loads(data)
                except ValueError:  # not JSON, or not UTF-8
                    raise Unavailable("the inference engine sent a stream the adapter cannot read") from None
                if not isinstance(chunk, dict) or "error" in chunk:
                    raise Unavailable("the inference engine reported an error mid-stream")
                usage = chunk.get("usage") or usage
                for choice in chunk.get("choices") or ():
                    text = choice.get("text") or ""
                    if text:
                        completion_tokens += 1
                        yield Delta(text)
                    if choice.get("finish_reason"):
                        finish = _finish_reason(choice, stop)
        except ValueError:  # a line longer than the reader takes
            raise Unavailable("the inference engine sent a stream the adapter cannot read") from None
        if finish is None:
            raise Unavailable("the inference engine's stream ended without a finish")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            completion_tokens = usage["completion_tokens"]
        yield Finished(finish, prompt_tokens, completion_tokens)


def _finish_reason(choice: dict, stop: Sequence[str]) -> FinishReason:
    """OpenAI's "stop" covers both the end of sequence and a stop sequence; vLLM's stop_reason tells them apart."""
    reason = _FINISH.get(choice["finish_reason"], FinishReason.STOP)
    if reason == FinishReason.STOP and isinstance(choice.get("stop_reason"), str) and choice["stop_reason"] in stop:
        return FinishReason.STOP_SEQUENCE
    return reason
