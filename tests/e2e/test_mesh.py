"""End to end over real processes, real Redis and the real model.

The tests share one mesh and run in any order: each asks a question of its own
(``unique``) where the cache matters, and those that stop Redis or the mesh get
meshes of their own.
"""
from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import psutil
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from meshkit.settings import default_home
from modelfiles.convert import load_model_files
from tests.polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.model]

FINANCE = "What are the applications of real-time AI in the financial industry?"
MAX_NEW_TOKENS = 24


def unique(question: str) -> str:
    """The question with a tag of this test's own: no other test has its answer cached."""
    return f"{question} (ref {uuid.uuid4().hex[:8]})"


def finance_call(question: str) -> gateway_pb2.TemplateCall:
    variables = struct_pb2.Struct()
    variables.update({"question": question})
    return gateway_pb2.TemplateCall(id="finance_question", variables=variables)


def finance_request(question: str, cache_mode=gateway_pb2.CACHE_MODE_USE, max_new_tokens=MAX_NEW_TOKENS):
    return gateway_pb2.GenerateRequest(
        template=finance_call(question),
        sampling=gateway_pb2.SamplingParams(max_new_tokens=max_new_tokens),
        cache_mode=cache_mode,
    )


def chat_request(text, cache_mode=gateway_pb2.CACHE_MODE_BYPASS, max_new_tokens=MAX_NEW_TOKENS):
    return gateway_pb2.GenerateRequest(
        chat=gateway_pb2.Chat(messages=[gateway_pb2.ChatMessage(role="user", content=text)]),
        sampling=gateway_pb2.SamplingParams(max_new_tokens=max_new_tokens),
        cache_mode=cache_mode,
    )


def hops(response):
    return {t.hop: t for t in response.timings}


def timed(call):
    started = time.perf_counter()
    reply = call()
    return reply, time.perf_counter() - started


def answers_stored(mesh) -> float:
    """The cache service's count of answers stored so far."""
    with urllib.request.urlopen(mesh.metrics_url("cache"), timeout=5) as reply:
        families = text_string_to_metric_families(reply.read().decode())
    return sum(s.value for family in families for s in family.samples
               if s.name == "nlpmesh_cache_stores_total" and s.labels.get("result") == "stored")


def answer_and_store(mesh, gateway, question: str):
    """The question answered (REFRESH: no cache read) and, once the store after it has landed, the answer."""
    before = answers_stored(mesh)
    reply, seconds = timed(lambda: gateway.Generate(finance_request(question, gateway_pb2.CACHE_MODE_REFRESH),
                                                    timeout=120))
    # Polled on the cache's count, not by asking again: a miss would answer anew and store that answer.
    wait_until(lambda: answers_stored(mesh) > before, what="the answer to be stored (off the caller's path)")
    return reply, seconds


def assert_usage_fits_the_finish(reply, max_new_tokens=MAX_NEW_TOKENS):
    """All the tokens asked for when cut at the length, no more than that when the model stopped."""
    if reply.finish_reason == gateway_pb2.FINISH_REASON_LENGTH:
        assert reply.usage.completion_tokens == max_new_tokens
    else:
        assert reply.finish_reason == gateway_pb2.FINISH_REASON_STOP, reply.finish_reason
        assert 0 < reply.usage.completion_tokens <= max_new_tokens


def test_every_service_is_serving_with_reflection(mesh):
    for name in ("template", "tokenizer", "cache", "inference", "gateway"):
        with grpc.insecure_channel(mesh.address(name)) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING, name
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            [reply] = list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
            names = {s.name for s in reply.list_services_response.service}
            assert f"nlpmesh.{name}.v1" in " ".join(names), names


def test_finance_question_is_answered_then_served_from_the_cache(mesh, gateway):
    question = unique(FINANCE)
    first, first_s = answer_and_store(mesh, gateway, question)
    assert first.text.strip()
    assert not first.cache_hit
    assert_usage_fits_the_finish(first)
    counted = gateway.CountTokens(gateway_pb2.CountTokensRequest(template=finance_call(question)), timeout=30)
    assert first.usage.prompt_tokens == counted.prompt_tokens
    # REFRESH reads no cache: no cache hop.
    assert [t.hop for t in first.timings] == ["template", "tokenizer", "inference.ttft", "inference", "total"]
    assert len(first.trace_id) == 32 and int(first.trace_id, 16) != 0

    second, second_s = timed(lambda: gateway.Generate(finance_request(question), timeout=30))
    assert second.cache_hit
    assert second.text == first.text
    assert second.usage == first.usage
    assert second.finish_reason == first.finish_reason
    assert [t.hop for t in second.timings] == ["cache", "total"]
    assert first_s >= 10 * second_s, (first_s, second_s)


def test_a_cache_hit_streams_too(mesh, gateway):
    question = unique(FINANCE)
    answer, _ = answer_and_store(mesh, gateway, question)
    chunks = list(gateway.GenerateStream(finance_request(question), timeout=30))
    assert chunks[-1].done and chunks[-1].cache_hit
    assert "".join(c.delta for c in chunks) == answer.text
    assert chunks[-1].usage == answer.usage
    assert chunks[-1].finish_reason == answer.finish_reason


def test_streamed_deltas_join_to_the_unary_answer(gateway):
    request = chat_request("Name three uses of machine learning in banking.")
    unary = gateway.Generate(request, timeout=120)
    chunks = list(gateway.GenerateStream(request, timeout=120))
    assert len(chunks) > 2
    assert all(not c.done for c in chunks[:-1]) and chunks[-1].done
    assert "".join(c.delta for c in chunks) == unary.text
    assert chunks[-1].usage == unary.usage
    assert chunks[-1].finish_reason == unary.finish_reason


def test_a_chinese_prompt_streams_without_replacement_characters(gateway):
    request = chat_request("请用中文回答：人工智能在金融行业有哪些应用？", max_new_tokens=48)
    deltas = [c.delta for c in gateway.GenerateStream(request, timeout=120)]
    joined = "".join(deltas)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in joined), joined  # multi-byte text did stream
    assert not any("\ufffd" in d for d in deltas), deltas


def test_count_tokens_equals_the_tokenizers_own_count(gateway):
    text = "How do banks use real-time fraud detection?"
    reply = gateway.CountTokens(gateway_pb2.CountTokensRequest(
        chat=gateway_pb2.Chat(messages=[gateway_pb2.ChatMessage(role="user", content=text)])), timeout=30)
    tokenizer = AutoTokenizer.from_pretrained(load_model_files(default_home()).path)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    assert reply.prompt_tokens == len(ids)
    assert reply.model == "smollm2"  # the default model, by its catalogue id


def test_an_unknown_template_is_not_found(gateway):
    request = gateway_pb2.GenerateRequest(template=gateway_pb2.TemplateCall(id="no_such_template"))
    with pytest.raises(grpc.RpcError) as caught:
        gateway.Generate(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_missing_required_variable_is_invalid_argument_naming_it(gateway):
    request = gateway_pb2.GenerateRequest(template=gateway_pb2.TemplateCall(id="finance_question"))
    with pytest.raises(grpc.RpcError) as caught:
        gateway.Generate(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "question" in caught.value.details()
    status = rpc_status.from_call(caught.value)
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert [v.field for v in bad.field_violations] == ["template.variables.question"]


def test_list_templates_shows_the_shipped_templates(gateway):
    reply = gateway.ListTemplates(gateway_pb2.ListTemplatesRequest(), timeout=30)
    ids = {t.id for t in reply.templates}
    assert {"support_answer", "finance_question", "clinical_note_summary", "tutor_explanation",
            "translation"} <= ids
    finance = [t for t in reply.templates if t.id == "finance_question"][0]
    assert any(v.name == "question" and v.required for v in finance.variables)


def test_the_cli_streams_an_answer_then_prints_the_timing_table(mesh):
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "ask", "--addr", mesh.gateway_address, "--max-new-tokens", "8",
         "--cache", "bypass", "Say hello."],
        capture_output=True, text=True, timeout=120, check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0].strip()  # the answer
    assert any(line.startswith("trace_id=") for line in lines)
    table = {line.split()[0] for line in lines if line and line.split()[0] in
             {"tokenizer", "inference.ttft", "inference", "total"}}
    assert table == {"tokenizer", "inference.ttft", "inference", "total"}


def test_with_redis_stopped_the_request_is_still_answered(own_mesh, disposable_redis_server):
    disposable_redis_server.stop()
    request = chat_request("Give one use of AI in insurance.", cache_mode=gateway_pb2.CACHE_MODE_USE)
    with grpc.insecure_channel(own_mesh.gateway_address) as channel:
        # The lookup fails: a miss; the store after it fails quietly.
        reply = gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=120)
    assert reply.text.strip()
    assert not reply.cache_hit
    assert_usage_fits_the_finish(reply)
    assert [t.hop for t in reply.timings] == ["cache", "tokenizer", "inference.ttft", "inference", "total"]


def test_services_drain_and_exit_cleanly_on_sigterm(own_mesh):
    own_mesh.stop()
    codes = {name: process.returncode for name, process in own_mesh.processes.items()}
    assert sorted(codes) == ["cache", "edge", "embedding", "gateway", "inference", "template", "tokenizer"]
    assert all(code == 0 for code in codes.values()), codes


def test_inference_yields_the_cores_to_the_latency_bound_services(mesh):
    # NLPMESH_INFERENCE_NICENESS (5): the engine's steps never starve a hop with a 100 ms budget.
    nice = {name: psutil.Process(process.pid).nice() for name, process in mesh.processes.items()}
    assert nice["inference"] == nice["gateway"] + 5
    assert nice["template"] == nice["tokenizer"] == nice["cache"] == nice["gateway"]


def test_a_request_whose_first_token_cannot_come_by_its_deadline_is_refused_by_the_engine_before_its_prefill(
        mesh, gateway):
    # A stream decodes; a 1,000-token prompt with 400 ms left cannot have its first token in time: the engine
    # refuses it at once, naming the inference hop and its queue wait, and spends no prefill on it.
    def refusals_and_prefill_tokens() -> tuple[float, float]:
        text = urllib.request.urlopen(mesh.metrics_url("inference"), timeout=5).read().decode()
        values = {sample.name: sample.value for family in text_string_to_metric_families(text)
                  for sample in family.samples}
        return (values.get("nlpmesh_inference_deadline_refusals_total", 0.0),
                values.get("nlpmesh_inference_prefill_tokens_total", 0.0))

    words = (Path(__file__).parents[1] / "data" / "perplexity.txt").read_text().split()  # about 1,000 tokens
    long_prompt = unique(" ".join(words[:800]))
    running = gateway.GenerateStream(chat_request(unique("Write a long essay about rivers."), max_new_tokens=200),
                                     timeout=120)
    next(iter(running))  # decoding now
    try:
        refused_before, prefilled_before = refusals_and_prefill_tokens()
        with pytest.raises(grpc.RpcError) as caught:
            request = chat_request(long_prompt, max_new_tokens=8)
            request.budget_ms = 400
            gateway.Generate(request, timeout=30)
        refused_after, prefilled_after = refusals_and_prefill_tokens()
    finally:
        running.cancel()
    error = caught.value
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    infos = []
    for detail in rpc_status.from_call(error).details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            infos.append(info)
    assert infos and all(info.metadata["hop"] == "inference" for info in infos)
    assert any("queue_wait_ms" in info.metadata for info in infos)  # the engine's own refusal, relayed
    assert "waited in the queue" in error.details()
    assert refused_after == refused_before + 1
    assert prefilled_after - prefilled_before < 900  # the running stream's tokens only, none of the long prompt's


def test_every_process_runs_on_the_mesh_grpc_io_and_says_so_in_its_first_lines(mesh):
    # gRPC reads GRPC_EXPERIMENTS at import: the launcher must put it in each process's environment,
    # and each service names it when it starts listening (meshkit/grpc_io.py).
    from meshkit.grpc_io import GRPC_EXPERIMENTS_ENV, MESH_GRPC_EXPERIMENTS

    assert mesh.processes
    for name, process in mesh.processes.items():
        environment = psutil.Process(process.pid).environ()
        assert environment.get(GRPC_EXPERIMENTS_ENV) == MESH_GRPC_EXPERIMENTS, name
        if name == "edge":  # the OpenAI edge is an HTTP server: it has no gRPC listening line
            continue
        listening = [line for line in mesh.log_path(name).read_text().splitlines() if " listening on " in line]
        assert listening and f"GRPC_EXPERIMENTS={MESH_GRPC_EXPERIMENTS}" in listening[0], name
