"""No request text in telemetry: a canary sent every way a prompt can travel (chat and template,
unary and stream, a miss, a cache hit, requests that fail validation) reaches no log line (the access
log's included), no span file, no /metrics page, and no error a caller gets back. tests/servicer/test_gateway_prompt_capture.py
shows the same search finding it with capture_content on."""
from __future__ import annotations

import json
import urllib.request
import uuid

import grpc
import pytest
from google.protobuf import struct_pb2
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from cli.launcher import LocalMesh
from tests.e2e.embeddings import embed_when_ready
from tests.polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.model]

SERVICES = ("gateway", "template", "tokenizer", "cache", "inference", "embedding")
# The most a service writes: JSON lines at DEBUG.
VERBOSE = {f"NLPMESH_{name.upper()}_{key}": value for name in SERVICES
           for key, value in (("LOG_FORMAT", "json"), ("LOG_LEVEL", "DEBUG"))}
CANARY = f"canary{uuid.uuid4().hex}"
# What the search looks for: a prefix, so that a value cut short (say to 32 characters) is found too.
NEEDLE = CANARY[:16]
SAMPLING = gateway_pb2.SamplingParams(max_new_tokens=4)


def template(**variables) -> gateway_pb2.TemplateCall:
    struct = struct_pb2.Struct()
    struct.update(variables)
    return gateway_pb2.TemplateCall(id="finance_question", variables=struct)


def chat(text: str) -> gateway_pb2.Chat:
    return gateway_pb2.Chat(messages=[gateway_pb2.ChatMessage(role="user", content=text)])


# Each fails validation with the canary in it; the field each error must name.
FAILING = [
    ("an unknown variable's value", gateway_pb2.GenerateRequest(
        template=template(question="q", colour=CANARY), sampling=SAMPLING), "template.variables.colour"),
    ("a variable over its max_chars", gateway_pb2.GenerateRequest(
        template=template(question=CANARY * 200), sampling=SAMPLING), "template.variables.question"),
    ("a stop sequence over its limit", gateway_pb2.GenerateRequest(
        chat=chat(CANARY), sampling=gateway_pb2.SamplingParams(max_new_tokens=4, stop=[CANARY * 3])),
     "sampling.stop"),
    ("a role that is no role", gateway_pb2.GenerateRequest(
        chat=gateway_pb2.Chat(messages=[gateway_pb2.ChatMessage(role=CANARY, content=CANARY)]), sampling=SAMPLING),
     "chat.messages[0].role"),
]


@pytest.fixture(scope="module")
def verbose_mesh(tmp_path_factory, mesh_redis):
    local = LocalMesh(tmp_path_factory.mktemp("mesh"), free_ports=True, redis_url=mesh_redis.url,
                      extra_env=VERBOSE, progress=lambda line: print(f"[mesh] {line}"))
    local.start(ready_timeout_s=300)
    try:
        yield local
    finally:
        local.stop()


def send_everything(stub: gateway_pb2_grpc.GatewayStub) -> list[grpc.RpcError]:
    """Every way the canary travels; the errors the failing requests got back."""
    metadata = (("x-request-id", f"canary-run-{uuid.uuid4().hex}"),)
    by_chat = gateway_pb2.GenerateRequest(chat=chat(f"Say the word {CANARY}."), sampling=SAMPLING)
    by_template = gateway_pb2.GenerateRequest(template=template(question=f"What is {CANARY}?"), sampling=SAMPLING)
    stub.Generate(by_chat, timeout=120, metadata=metadata)
    list(stub.GenerateStream(by_chat, timeout=120, metadata=metadata))
    assert not stub.Generate(by_template, timeout=120, metadata=metadata).cache_hit
    # The store lands after the answer was sent.
    wait_until(lambda: stub.Generate(by_template, timeout=120, metadata=metadata).cache_hit, 30, 0.1,
               what="a cache hit on the template request")
    assert [c for c in stub.GenerateStream(by_template, timeout=120, metadata=metadata) if c.done][0].cache_hit
    # Embed: texts are content as prompts are; one over the model's token limit is refused naming texts[1].
    embed = gateway_pb2.EmbedRequest(texts=[f"Find {CANARY}.", f"{CANARY} " * 300])
    embed_when_ready(stub, gateway_pb2.EmbedRequest(texts=[f"Find {CANARY}."]), metadata)
    with pytest.raises(grpc.RpcError) as refused:
        stub.Embed(embed, timeout=60, metadata=metadata)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    errors = [("an Embed text over the token limit", "texts[1]", refused.value)]
    for what, request, field in FAILING:
        for method in (stub.Generate, lambda r, **kw: list(stub.GenerateStream(r, **kw))):
            with pytest.raises(grpc.RpcError) as raised:
                method(request, timeout=120, metadata=metadata)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
            errors.append((what, field, raised.value))
    return errors


def test_the_canary_reaches_no_log_span_metric_or_error(verbose_mesh):
    with grpc.insecure_channel(verbose_mesh.gateway_address) as channel:
        errors = send_everything(gateway_pb2_grpc.GatewayStub(channel))
    for what, field, error in errors:
        assert field in error.details(), what  # named by its field...
        assert NEEDLE not in error.details(), what  # ...never by its value
        for key, value in error.trailing_metadata() or ():
            raw = value if isinstance(value, bytes) else value.encode()
            assert NEEDLE.encode() not in raw, f"{what}: {key}"
    for name in SERVICES:
        with urllib.request.urlopen(verbose_mesh.metrics_url(name), timeout=10) as page:
            assert NEEDLE not in page.read().decode(), f"{name} /metrics"
    verbose_mesh.stop()  # flushes every service's spans to its file
    logs = {name: verbose_mesh.log_path(name).read_text() for name in SERVICES}
    spans = {path.name: path.read_text() for path in sorted(verbose_mesh.trace_dir.glob("*.jsonl"))}
    # The search sees real telemetry: the run's request ids and the template it rendered.
    assert "canary-run-" in logs["gateway"] and "canary-run-" in logs["inference"]
    # ...the access log's line for each call (the refused ones too), and each service's line per call.
    records = [json.loads(line) for line in logs["gateway"].splitlines() if line.startswith("{")]
    access = [record for record in records
              if record["logger"] == "nlpmesh.access" and record["request_id"].startswith("canary-run-")]
    statuses = [line["status"] for line in access]
    assert statuses.count("INVALID_ARGUMENT") == 2 * len(FAILING) + 1 and statuses.count("OK") >= 6, statuses
    assert {line["template"] for line in access} == {"-", "finance_question"}
    for name in ("template", "tokenizer", "inference", "embedding"):
        assert '"logger": "nlpmesh.calls"' in logs[name], name
    assert set(spans) == {f"{name}.jsonl" for name in SERVICES}
    assert '"nlpmesh.template.id":"finance_question"' in spans["template.jsonl"]
    for name, text in logs.items():
        assert NEEDLE not in text, f"request text in the {name} log"
    for name, text in spans.items():
        assert NEEDLE not in text, f"request text in {name}"
