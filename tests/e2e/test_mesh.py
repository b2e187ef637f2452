"""End to end over real processes, real Redis and the real model.

Tests run in file order: the last one stops Redis.
"""
from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from nlpmesh.gateway.v1 import gateway_pb2
from transformers import AutoTokenizer

from meshkit.settings import default_home
from modelfiles.convert import load_model_files

pytestmark = [pytest.mark.e2e, pytest.mark.model]

FINANCE = "What are the applications of real-time AI in the financial industry?"
MAX_NEW_TOKENS = 24


def finance_request(cache_mode=gateway_pb2.CACHE_MODE_USE, max_new_tokens=MAX_NEW_TOKENS):
    variables = struct_pb2.Struct()
    variables.update({"question": FINANCE})
    return gateway_pb2.GenerateRequest(
        template=gateway_pb2.TemplateCall(id="finance_question", variables=variables),
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


def test_every_service_is_serving_with_reflection(mesh):
    for name in ("template", "tokenizer", "cache", "inference", "gateway"):
        with grpc.insecure_channel(mesh.address(name)) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING, name
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            [reply] = list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
            names = {s.name for s in reply.list_services_response.service}
            assert f"nlpmesh.{name}.v1" in " ".join(names), names


def test_finance_question_is_answered_then_served_from_the_cache(gateway):
    started = time.perf_counter()
    first = gateway.Generate(finance_request(gateway_pb2.CACHE_MODE_REFRESH), timeout=120)
    first_s = time.perf_counter() - started
    assert first.text.strip()
    assert not first.cache_hit
    assert first.usage.completion_tokens > 0 and first.usage.prompt_tokens > 0
    assert {"template", "tokenizer", "inference.ttft", "inference", "total"} <= set(hops(first))
    assert len(first.trace_id) == 32 and int(first.trace_id, 16) != 0

    second, second_s = None, None
    for _ in range(50):  # the store happens after the first answer was sent
        started = time.perf_counter()
        second = gateway.Generate(finance_request(), timeout=30)
        second_s = time.perf_counter() - started
        if second.cache_hit:
            break
        time.sleep(0.05)
    assert second.cache_hit
    assert second.text == first.text
    assert second.usage == first.usage
    assert set(hops(second)) == {"cache", "total"}
    assert first_s >= 10 * second_s, (first_s, second_s)


def test_a_cache_hit_streams_too(gateway):
    gateway.Generate(finance_request(gateway_pb2.CACHE_MODE_REFRESH), timeout=120)
    time.sleep(0.3)
    chunks = list(gateway.GenerateStream(finance_request(), timeout=30))
    assert chunks[-1].done and chunks[-1].cache_hit
    assert "".join(c.delta for c in chunks).strip()


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
    assert reply.model == "SmolLM2-135M-Instruct"


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


def test_with_redis_stopped_the_request_is_still_answered(gateway, mesh_redis):
    mesh_redis.stop()
    request = chat_request("Give one use of AI in insurance.", cache_mode=gateway_pb2.CACHE_MODE_USE)
    reply = gateway.Generate(request, timeout=120)  # lookup fails: a miss; the store after fails quietly
    assert reply.text.strip()
    assert not reply.cache_hit
    assert "cache" in hops(reply)


def test_services_drain_and_exit_cleanly_on_sigterm(mesh):
    mesh.stop()
    codes = {name: process.returncode for name, process in mesh.processes.items()}
    assert all(code == 0 for code in codes.values()), codes
