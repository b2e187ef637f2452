"""The OpenAI-compatible edge in a mesh started by `nlpmesh up` (TLS, API keys on), called with the official `openai`
package: the finance question streamed and not, a cache hit, a bad key (401), a quota (429 with Retry-After), bad
input refused by name, and a client that goes away cancelling the generation in the inference service."""
from __future__ import annotations

import json
import ssl
import time
import urllib.request
from pathlib import Path

import httpx
import openai
import pytest
from nlpmesh_client import Client, Sampling, Template
from prometheus_client.parser import text_string_to_metric_families

from cli.main import DEMO_QUESTION
from meshkit.tls import CA_FILE
from tests.e2e.test_clients import new_key
from tests.launched import Launched
from tests.polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.model]

FINANCE = {"template": {"id": "finance_question", "variables": {"question": DEMO_QUESTION}}}


def ca_file(mesh: Launched) -> Path:
    return Path(mesh.state()["tls_dir"]) / CA_FILE


def edge(mesh: Launched, key: str | None = None) -> openai.OpenAI:
    key = key or (mesh.home / "local.key").read_text().strip()
    verify = ssl.create_default_context(cafile=str(ca_file(mesh)))
    return openai.OpenAI(base_url=mesh.state()["edge"] + "/v1", api_key=key, max_retries=0, timeout=120,
                         http_client=openai.DefaultHttpxClient(verify=verify))


def raw(mesh: Launched) -> httpx.Client:
    key = (mesh.home / "local.key").read_text().strip()
    return httpx.Client(base_url=mesh.state()["edge"], headers={"authorization": f"Bearer {key}"}, timeout=60,
                        verify=ssl.create_default_context(cafile=str(ca_file(mesh))))


def cancelled_generations(mesh: Launched) -> float:
    url = f"http://127.0.0.1:{mesh.state()['metrics_ports']['inference']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "nlpmesh_inference_requests_finished_total" and sample.labels.get("finish_reason") == "cancelled":
                return sample.value
    return 0.0


def test_the_edge_answers_the_finance_question_streamed_and_not_as_the_grpc_client_does(launched):
    client = edge(launched)
    answer = client.chat.completions.create(model="smollm2", messages=[], max_tokens=24,
                                            extra_body={"nlpmesh": {**FINANCE, "cache": "bypass"}})
    chunks = list(client.chat.completions.create(model="smollm2", messages=[], max_tokens=24, stream=True,
                                                 extra_body={"nlpmesh": {**FINANCE, "cache": "bypass"}}))
    text = answer.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() and streamed == text
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1
    assert answer.usage.completion_tokens > 0 and answer.choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == answer.choices[0].finish_reason
    assert answer.model == "smollm2" and answer.model_extra["nlpmesh"]["cache_hit"] is False
    key = (launched.home / "local.key").read_text().strip()
    with Client(launched.state()["gateway"], api_key=key, ca_file=ca_file(launched)) as grpc_client:
        same = grpc_client.generate(Template("finance_question", {"question": DEMO_QUESTION}),
                                    sampling=Sampling(max_new_tokens=24), cache="bypass")
    assert same.text == text  # greedy: the very same answer through either door


def test_the_edge_serves_chat_messages_completions_and_models(launched):
    client = edge(launched)
    chat = client.chat.completions.create(model="smollm2", max_tokens=8, temperature=0, seed=7,
                                          messages=[{"role": "system", "content": "Answer briefly."},
                                                    {"role": "user", "content": "What is a bond?"}])
    completion = client.completions.create(model="smollm2", prompt="What is a bond?", max_tokens=8)
    assert chat.choices[0].message.content.strip() and chat.usage.completion_tokens <= 8
    assert completion.choices[0].text.strip() and completion.object == "text_completion"
    assert "smollm2" in {m.id for m in client.models.list()}


def test_a_repeated_question_is_a_cache_hit_through_the_edge(launched):
    client = edge(launched)
    ask = dict(model="smollm2", max_tokens=12, messages=[{"role": "user", "content": f"Define yield {time.time()}"}])
    first = client.chat.completions.create(**ask)
    second = client.chat.completions.create(**ask)
    assert first.model_extra["nlpmesh"]["cache_hit"] is False and second.model_extra["nlpmesh"]["cache_hit"] is True
    assert second.choices[0].message.content == first.choices[0].message.content


def test_a_bad_key_gets_401_and_is_not_echoed(launched):
    with pytest.raises(openai.AuthenticationError) as refused:
        edge(launched, key="nm_not_a_key").chat.completions.create(
            model="smollm2", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert refused.value.status_code == 401 and "nm_not_a_key" not in str(refused.value)


def test_a_quota_gets_429_with_retry_after(launched):
    tight = new_key(launched, "tight-edge", "--rps", "1")
    client = edge(launched, key=tight.key)
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(5):
            client.chat.completions.create(model="smollm2", max_tokens=1, messages=[{"role": "user", "content": "Hi"}])
    assert refused.value.status_code == 429
    assert 1 <= int(refused.value.response.headers["retry-after"]) <= 2
    assert refused.value.body["type"] == "rate_limit_error"


def test_unsupported_fields_and_bad_bodies_are_refused_by_name(launched):
    client = edge(launched)
    hi = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError) as many:
        client.chat.completions.create(model="smollm2", messages=hi, n=2)
    with pytest.raises(openai.BadRequestError) as tools:
        client.chat.completions.create(model="smollm2", messages=hi, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])
    assert many.value.body["param"] == "n" and "tools" in tools.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=hi, max_tokens=2)
    with raw(launched) as http:
        malformed = http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        huge = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 2_000_000}]})
    assert malformed.status_code == 400 and malformed.json()["error"]["type"] == "invalid_request_error"
    assert huge.status_code == 413


def test_a_client_that_goes_away_cancels_the_generation(launched):
    before = cancelled_generations(launched)
    with raw(launched) as http, http.stream("POST", "/v1/chat/completions", json={
            "model": "smollm2", "stream": True, "max_tokens": 400, "nlpmesh": {"cache": "bypass"},
            "messages": [{"role": "user", "content": f"Write a long essay about rivers {time.time()}."}]}) as reply:
        assert reply.status_code == 200
        events = 0
        for line in reply.iter_lines():
            if line.startswith("data: "):
                assert "content" in json.dumps(json.loads(line[6:]))
                events += 1
                if events == 3:
                    break  # and the connection closes, mid-answer
    wait_until(lambda: cancelled_generations(launched) > before, 20, 0.2,
               what="the inference service to count a cancelled generation")
