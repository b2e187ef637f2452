"""The OpenAI edge's request mapping and its HTTP answers, against an in-process fake of the gateway calls."""
from __future__ import annotations

import json

import grpc
import pytest
from nlpmesh_client import (
    Generation,
    InvalidArgument,
    Message,
    ModelInfo,
    NlpmeshError,
    ResourceExhausted,
    ResponseFormat,
    Template,
    TokenLogprob,
    TopLogprob,
    Unauthenticated,
    Usage,
)
from starlette.testclient import TestClient

from services.openai_edge import mapping
from services.openai_edge.app import build_app
from services.openai_edge.mapping import BadRequest

HI = [{"role": "user", "content": "Hi"}]


def test_a_chat_body_maps_onto_the_gateway_request():
    call = mapping.chat_call({
        "model": "smollm2", "messages": [{"role": "developer", "content": "Be brief."},
                                         {"role": "user", "content": [{"type": "text", "text": "Wh"},
                                                                      {"type": "text", "text": "at?"}]}],
        "temperature": 0.7, "top_p": 0.9, "max_completion_tokens": 32, "stop": "\n", "seed": 11,
        "presence_penalty": 0.5, "frequency_penalty": -0.5, "logprobs": True, "top_logprobs": 3,
        "user": None, "response_format": {"type": "json_object"}, "nlpmesh": {"cache": "bypass", "budget_ms": 900}})
    assert call.prompt == (Message("system", "Be brief."), Message("user", "What?"))
    s = call.sampling
    assert (s.max_new_tokens, s.temperature, s.top_p, s.stop, s.seed) == (32, 0.7, 0.9, ("\n",), 11)
    assert (s.presence_penalty, s.frequency_penalty, s.logprobs) == (0.5, -0.5, 3)
    assert s.response_format == ResponseFormat.json_schema({"type": "object"})
    assert (call.model, call.cache, call.budget_ms, call.stream, call.chat) == ("smollm2", "bypass", 900, False, True)


def test_a_template_replaces_the_messages_and_a_json_schema_is_the_response_format():
    schema = {"type": "object", "properties": {"rate": {"type": "number"}}}
    call = mapping.chat_call({"messages": [], "stream": True, "stream_options": {"include_usage": False},
                              "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
                              "nlpmesh": {"template": {"id": "finance_question", "version": "1.1.0",
                                                       "variables": {"question": "Why?"}}}})
    assert call.prompt == Template("finance_question", {"question": "Why?"}, "1.1.0")
    assert call.sampling.response_format == ResponseFormat.json_schema(schema)
    assert call.stream and not call.include_usage
    assert mapping.chat_call({"messages": HI, "response_format": {"type": "text"}}).sampling.response_format is None


def test_a_completion_prompt_is_one_user_message_and_logprobs_is_a_count():
    call = mapping.completion_call({"prompt": ["What is a bond?"], "logprobs": 2, "max_tokens": 5})
    assert call.prompt == "What is a bond?" and call.sampling.logprobs == 2 and not call.chat
    assert mapping.completion_call({"prompt": "x"}).sampling.logprobs is None


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": HI, "n": 2}, "n"),
    ({"messages": HI, "tools": [{"type": "function"}]}, "tools"),
    ({"messages": HI, "logit_bias": {"1": 2}}, "logit_bias"),
    ({"messages": HI, "nlpmesh": {"tenant": "other"}}, "nlpmesh.tenant"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({"messages": []}, "messages"),
    ({"messages": HI, "nlpmesh": {"template": {"id": "t"}}}, "messages"),
    ({"messages": HI, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": HI, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": HI, "temperature": "hot"}, "temperature"),
    ({"messages": HI, "max_tokens": 0}, "max_tokens"),
    ({"messages": HI, "stop": [1]}, "stop"),
    ({"messages": HI, "seed": -1}, "seed"),
    ({"messages": HI, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": HI, "response_format": {"type": "grammar"}}, "response_format.type"),
    ({"messages": HI, "nlpmesh": {"cache": "sometimes"}}, "nlpmesh.cache"),
])
def test_what_the_edge_cannot_honour_is_refused_by_name(body, param):
    with pytest.raises(BadRequest) as refused:
        mapping.chat_call(body)
    assert refused.value.param == param


def test_a_completion_refuses_several_prompts_and_chat_only_fields():
    for body, param in (({"prompt": ["a", "b"]}, "prompt"), ({"prompt": "a", "response_format": {}},
                                                            "response_format"), ({"prompt": "a", "logprobs": 6},
                                                                                 "logprobs")):
        with pytest.raises(BadRequest) as refused:
            mapping.completion_call(body)
        assert refused.value.param == param


def generation(text="Bonds pay interest.", cache_hit=False, logprobs=()) -> Generation:
    return Generation(text, "stop_sequence", Usage(7, 4), cache_hit, "smollm2", "ab" * 16, (), "rid-1",
                      {"inference": 3.5, "total": 4.0}, logprobs)


class Chunk:
    """What the app reads of a gateway GenerateChunk."""

    def __init__(self, delta: str, done: bool = False):
        self.delta, self.done, self.token_logprobs = delta, done, []


class FakeStream:
    def __init__(self, deltas, failure: NlpmeshError | None = None, fail_at: int = 0):
        self.deltas, self.failure, self.fail_at = deltas, failure, fail_at
        self.result, self.cancelled, self.request_id = None, False, "rid-s"

    async def chunks(self):
        for i, delta in enumerate(self.deltas):
            if self.failure is not None and i == self.fail_at:
                raise self.failure
            yield Chunk(delta)
        self.result = generation("".join(self.deltas))

    def cancel(self):
        self.cancelled = True


class FakeGateway:
    def __init__(self):
        self.calls, self.failure, self.streams = [], None, []
        self.stream_failure, self.fail_at = None, 0

    async def open(self):
        pass

    async def close(self):
        pass

    async def generate(self, call, who):
        self.calls.append((call, who))
        if self.failure:
            raise self.failure
        return generation(cache_hit=True, logprobs=(TokenLogprob(5, "Bonds", -0.1, (TopLogprob(5, "Bonds", -0.1),)),))

    def stream(self, call, who):
        self.calls.append((call, who))
        self.streams.append(FakeStream(["Bonds", " pay", "."], self.stream_failure, self.fail_at))
        return self.streams[-1]

    async def list_models(self, who):
        if self.failure:
            raise self.failure
        return (ModelInfo("smollm2", "r1", 8192, "torch", True, True),)


@pytest.fixture
def fake():
    return FakeGateway()


@pytest.fixture
def http(fake):
    with TestClient(build_app(fake, max_body_bytes=2048)) as client:
        yield client


def test_a_chat_answer_is_openai_json_with_the_key_forwarded(http, fake):
    reply = http.post("/v1/chat/completions", json={"messages": HI, "logprobs": True},
                      headers={"authorization": "Bearer nm_k1", "x-request-id": "mine-1",
                               "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"})
    body = reply.json()
    assert reply.status_code == 200 and reply.headers["server-timing"] == "inference;dur=3.50, total;dur=4.00"
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == "Bonds pay interest."
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["total_tokens"] == 11
    assert body["choices"][0]["logprobs"]["content"][0]["top_logprobs"][0]["token"] == "Bonds"
    assert body["nlpmesh"]["cache_hit"] is True
    (_, who), = fake.calls
    assert who.api_key == "nm_k1" and who.request_id == "mine-1" and who.trace[0][0] == "traceparent"


@pytest.mark.parametrize(("error", "status", "kind"), [
    (Unauthenticated(grpc.StatusCode.UNAUTHENTICATED, "unknown API key"), 401, "authentication_error"),
    (InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, "bad", field_violations=(("sampling.top_p", "x"),)), 400,
     "invalid_request_error"),
    (NlpmeshError(grpc.StatusCode.PERMISSION_DENIED, "not yours"), 403, "permission_error"),
    (NlpmeshError(grpc.StatusCode.NOT_FOUND, "no model"), 404, "not_found_error"),
    (NlpmeshError(grpc.StatusCode.UNAVAILABLE, "down"), 503, "service_unavailable"),
    (NlpmeshError(grpc.StatusCode.DEADLINE_EXCEEDED, "late", hop="inference"), 504, "timeout"),
    (NlpmeshError(grpc.StatusCode.INTERNAL, "secret detail"), 500, "api_error"),
])
def test_gateway_failures_map_to_http_statuses_in_openai_error_json(http, fake, error, status, kind):
    fake.failure = error
    reply = http.post("/v1/chat/completions", json={"messages": HI})
    assert reply.status_code == status and reply.json()["error"]["type"] == kind
    assert "secret detail" not in reply.text
    if status == 400:
        assert reply.json()["error"]["param"] == "sampling.top_p"


def test_a_quota_refusal_is_429_with_retry_after_rounded_up(http, fake):
    fake.failure = ResourceExhausted(grpc.StatusCode.RESOURCE_EXHAUSTED, "quota", retry_after_s=1.2)
    reply = http.post("/v1/completions", json={"prompt": "Hi"})
    assert reply.status_code == 429 and reply.headers["retry-after"] == "2"
    assert reply.json()["error"]["code"] == "rate_limit_exceeded"


def test_bad_bodies_and_headers_are_refused_before_the_gateway(http, fake):
    malformed = http.post("/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
    not_object = http.post("/v1/chat/completions", json=[1])
    huge = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 4096}]})
    chunked = http.post("/v1/chat/completions", content=iter([b"{" + b" " * 1500, b" " * 1500 + b"}"]))
    basic = http.post("/v1/chat/completions", json={"messages": HI}, headers={"authorization": "Basic eDp5"})
    bad_id = http.post("/v1/chat/completions", json={"messages": HI}, headers={"x-request-id": "has space"})
    assert (malformed.status_code, not_object.status_code, huge.status_code, chunked.status_code) == (400, 400, 413, 413)
    assert (basic.status_code, bad_id.status_code) == (401, 400)
    assert huge.json()["error"]["code"] == "request_too_large" and fake.calls == []
    assert http.post("/v1/chat/completions", json={"messages": HI, "n": 3}).json()["error"]["param"] == "n"


def test_unknown_routes_and_methods_answer_in_openai_error_json(http):
    assert http.get("/v1/images/generations").json()["error"]["type"] == "not_found_error"
    assert http.get("/v1/chat/completions").status_code == 405
    assert http.get("/v1/embeddings").status_code == 405  # served, by POST


def events(reply) -> list:
    return [line.removeprefix("data: ") for line in reply.text.splitlines() if line.startswith("data: ")]


def test_a_stream_is_openai_chunks_then_the_finish_then_the_usage_then_done(http, fake):
    reply = http.post("/v1/chat/completions", json={"messages": HI, "stream": True})
    data = events(reply)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Bonds"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Bonds pay."
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert not fake.streams[0].cancelled


def test_a_stream_refused_before_its_first_chunk_is_an_http_error(http, fake):
    fake.stream_failure = ResourceExhausted(grpc.StatusCode.RESOURCE_EXHAUSTED, "quota", retry_after_s=0.4)
    reply = http.post("/v1/completions", json={"prompt": "Hi", "stream": True})
    assert reply.status_code == 429 and reply.headers["retry-after"] == "1"


def test_a_stream_that_fails_midway_ends_with_an_error_event_and_is_cancelled(http, fake):
    fake.stream_failure, fake.fail_at = NlpmeshError(grpc.StatusCode.UNAVAILABLE, "inference went away"), 2
    reply = http.post("/v1/chat/completions", json={"messages": HI, "stream": True})
    data = events(reply)
    assert json.loads(data[-1])["error"]["type"] == "service_unavailable" and "[DONE]" not in data
    assert fake.streams[0].cancelled


def test_models_are_listed_in_openai_form(http):
    assert http.get("/v1/models").json() == {"object": "list", "data": [
        {"id": "smollm2", "object": "model", "created": 0, "owned_by": "nlpmesh"}]}
    assert http.get("/healthz").status_code == 200
