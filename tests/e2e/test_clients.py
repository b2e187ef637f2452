"""The callers' side of the contract, against a mesh started by `nlpmesh up` (TLS at the gateway, API keys on):
nlpmesh-client (clients/python) and the Node.js client (clients/node, run by node as its own process) each answer
the finance question; the Node client also decodes a quota refusal's RetryInfo and meets a deadline."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from nlpmesh_client import (
    AsyncClient,
    Client,
    InvalidArgument,
    ResourceExhausted,
    RetryPolicy,
    Sampling,
    Template,
    Unauthenticated,
    Unavailable,
)

from cli.main import DEMO_QUESTION
from cli.topology import REPO_ROOT
from meshkit.tls import CA_FILE
from tests.launched import Launched
from tests.polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.model]

NODE = shutil.which("node")
NODE_CLIENT = REPO_ROOT / "clients" / "node"
FINANCE = Template("finance_question", {"question": DEMO_QUESTION})
SHORT = Sampling(max_new_tokens=24)  # the Node client's MAX_NEW_TOKENS: both ask the very same thing


class Access:
    """What a caller of the launched mesh is given: the address, the CA, a key."""

    def __init__(self, mesh: Launched, key: str | None = None):
        state = mesh.state()
        self.address = state["gateway"]
        self.ca_file = Path(state["tls_dir"]) / CA_FILE
        self.key = key or (mesh.home / "local.key").read_text().strip()

    def client(self, **kwargs) -> Client:
        return Client(self.address, api_key=self.key, ca_file=self.ca_file, **kwargs)

    def env(self) -> dict[str, str]:
        return {"PATH": str(Path(NODE).parent), "NLPMESH_ADDR": self.address, "NLPMESH_API_KEY": self.key,
                "NLPMESH_CA": str(self.ca_file)}


def new_key(mesh: Launched, tenant: str, *limits: str) -> Access:
    """A key of its own tenant, once every gateway reading the keys file accepts it."""
    made = mesh.cli("keys", "create", "--tenant", tenant, *limits, "--file", str(mesh.home / "keys.toml"))
    assert made.returncode == 0, made.stdout + made.stderr
    access = Access(mesh, made.stdout.strip().splitlines()[-1])

    def accepted() -> bool:
        with access.client(retry=RetryPolicy(max_attempts=1)) as client:
            try:
                client.list_templates(timeout_s=5)
            except Unauthenticated:
                return False
        return True

    wait_until(accepted, 10, 0.2, what=f"the gateway to accept the key of {tenant}")
    return access


def node(scenario: str, *args: str, access: Access) -> dict:
    ran = subprocess.run([NODE, "check.js", scenario, *args], cwd=NODE_CLIENT, env=access.env(), capture_output=True,
                         text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    return json.loads(ran.stdout)


needs_node = pytest.mark.skipif(NODE is None, reason="node (Node.js 20) is not installed on this machine")


@pytest.fixture(scope="module")
def node_modules():
    if not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("clients/node has no node_modules: run `make node`")


def test_the_python_client_answers_the_finance_question_over_tls_with_a_key(launched):
    access = Access(launched)
    with access.client() as client:
        answer = client.generate(FINANCE, sampling=SHORT, cache="bypass", request_id="py-finance-1")
        stream = client.stream(FINANCE, sampling=SHORT, cache="bypass")
        deltas = list(stream)
        counted = client.count_tokens(FINANCE)
        templates = {t.id for t in client.list_templates()}
        models = client.list_models()
    (model,) = [m for m in models if m.task == "generation"]
    assert [m.id for m in models if m.task == "embedding"] == ["minilm"]
    assert answer.text.strip() and answer.usage.completion_tokens > 0
    assert len(deltas) > 1 and "".join(deltas) == stream.result.text == answer.text
    assert answer.request_id == "py-finance-1" and len(stream.result.request_id) == 32
    assert [t.hop for t in answer.timings][-1] == "total" and "inference" in answer.server_timing
    assert set(answer.server_timing) == {t.hop for t in answer.timings}
    assert answer.model == model.id == "smollm2" and model.ready and model.default
    assert counted.prompt_tokens == answer.usage.prompt_tokens and "finance_question" in templates


def test_logprobs_and_penalties_reach_the_engine_through_the_gateway_and_are_never_cached(launched):
    access = Access(launched)
    asked = Sampling(max_new_tokens=12, logprobs=3)
    with access.client() as client:
        first = client.generate(FINANCE, sampling=asked)
        again = client.generate(FINANCE, sampling=asked)
        stream = client.stream(FINANCE, sampling=asked)
        list(stream)
        free = client.generate(FINANCE, sampling=Sampling(max_new_tokens=12), cache="bypass")
        penalised = client.generate(FINANCE, sampling=Sampling(max_new_tokens=12, frequency_penalty=2.0,
                                                               presence_penalty=2.0, repetition_penalty=1.5))
        with pytest.raises(InvalidArgument) as bad:
            client.generate(FINANCE, sampling=Sampling(max_new_tokens=4, logprobs=21))
    assert len(first.logprobs) == first.usage.completion_tokens == 12
    assert all(one.top[0].token_id == one.token_id and len(one.top) == 3 for one in first.logprobs)  # greedy
    assert all(one.logprob <= 0 for one in first.logprobs) and not free.logprobs
    assert not again.cache_hit and again.logprobs == first.logprobs  # generated again: the cache holds no logprobs
    assert stream.result.logprobs == first.logprobs  # the stream's chunks carry the same, in order
    assert first.text == free.text and penalised.text != free.text
    assert [field for field, _ in bad.value.field_violations] == ["sampling.logprobs"]


def test_nlpmesh_ask_answers_through_the_client_and_names_a_refusal(launched):
    asked = launched.cli("ask", "--template", "finance_question", "--var", f"question={DEMO_QUESTION}",
                         "--max-new-tokens", "8", "--cache", "bypass")
    assert asked.returncode == 0, asked.stdout + asked.stderr
    lines = asked.stdout.splitlines()
    assert lines[0].strip() and "finish=" in asked.stdout and "x-request-id=" in asked.stdout
    assert {line.split()[0] for line in lines[3:] if line.split()} >= {"template", "inference", "total"}
    unknown = launched.cli("ask", "--template", "no_such_template", "--var", "question=x")
    assert unknown.returncode == 1 and "NOT_FOUND" in unknown.stdout + unknown.stderr


def test_the_async_client_streams_the_same_answer(launched):
    access = Access(launched)

    async def main():
        async with AsyncClient(access.address, api_key=access.key, ca_file=access.ca_file) as client:
            stream = client.stream(FINANCE, sampling=SHORT, cache="bypass")
            return "".join([delta async for delta in stream]), stream.result

    text, result = asyncio.run(main())
    assert text == result.text and result.finish_reason in ("stop", "length") and result.timings


def test_the_python_client_refuses_plaintext_to_tls_and_names_a_bad_key(launched):
    access = Access(launched)
    with Client(access.address, plaintext=True, retry=RetryPolicy(max_attempts=1)) as plain, \
            pytest.raises(Unavailable):
        plain.list_templates(timeout_s=5)
    with Client(access.address, api_key="nm_not_a_key", ca_file=access.ca_file) as stranger, \
            pytest.raises(Unauthenticated) as refused:
        stranger.count_tokens("Hi")
    assert "nm_not_a_key" not in str(refused.value)


def test_the_python_client_waits_what_retry_info_says_then_is_answered(launched):
    tight = new_key(launched, "tight-python", "--rps", "1")
    with tight.client(retry=RetryPolicy(max_attempts=1)) as once, pytest.raises(ResourceExhausted) as refused:
        for _ in range(5):
            once.count_tokens("Hi")
    assert 0 < refused.value.retry_after_s <= 1.0
    with tight.client(retry=RetryPolicy(max_attempts=1)) as once:
        time.sleep(1.0)  # the bucket refills: the next two calls are one allowed, one refused
        once.count_tokens("Hi")
    started = time.monotonic()
    with tight.client(retry=RetryPolicy(max_attempts=3, jitter=0.1)) as patient:
        assert patient.count_tokens("Hi").prompt_tokens > 0
    assert time.monotonic() - started >= 0.5  # it waited for the refill rather than failing


@needs_node
def test_the_node_client_answers_the_finance_question_unary_and_streamed(launched, node_modules):
    result = node("answer", DEMO_QUESTION, access=Access(launched))
    unary, streamed = result["unary"], result["stream"]
    assert unary["text"].strip() and unary["completion_tokens"] > 0
    assert streamed["text"] == unary["text"] and streamed["delta_chunks"] > 1
    assert unary["request_id"] == "node-unary-1" and streamed["request_id"]
    assert unary["model"] == "smollm2" and unary["hops"][-1] == "total" and "inference" in unary["server_timing"]
    with Access(launched).client() as client:  # the same request from Python: the same greedy answer
        assert client.generate(FINANCE, sampling=SHORT, cache="bypass").text == unary["text"]


@needs_node
def test_the_node_client_decodes_retry_info_from_a_quota_refusal(launched, node_modules):
    refused = node("quota", access=new_key(launched, "tight-node", "--rps", "1"))["refused"]
    assert refused is not None, "the tenant's rate never refused a call"
    assert refused["code"] == "RESOURCE_EXHAUSTED"
    assert 0 < refused["retry_after_s"] <= 1.0
    assert "tenant:requests_per_s" in refused["quota_violations"]


@needs_node
def test_the_node_client_meets_its_deadline(launched, node_modules):
    result = node("deadline", "300", access=Access(launched))
    assert result.get("refused", {}).get("code") == "DEADLINE_EXCEEDED", result
    assert result["elapsed_ms"] < 3000
