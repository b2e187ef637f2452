"""Guided decoding through the whole mesh (real processes, the real model): a caller's JSON Schema, a regex and a
choice list hold the answer; a template version's declared schema holds its answers; a format the engine cannot
serve is INVALID_ARGUMENT naming its field, before any hop; `nlpmesh ask --json-schema` answers with valid JSON."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import grpc
import jsonschema
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from nlpmesh.gateway.v1 import gateway_pb2

ORDER = {
    "type": "object", "additionalProperties": False, "required": ["customer", "items", "priority"],
    "properties": {
        "customer": {"type": "object", "additionalProperties": False, "required": ["name", "age"],
                     "properties": {"name": {"type": "string", "maxLength": 40},
                                    "age": {"type": "integer", "minimum": 18, "maximum": 99}}},
        "items": {"type": "array", "minItems": 1, "maxItems": 3,
                  "items": {"type": "integer", "minimum": 1, "maximum": 500}},
        "priority": {"enum": ["low", "normal", "urgent"]},
    },
}
ORDER_ID = r"[A-Z]{2}-[0-9]{4}"


def chat(text: str, response_format: gateway_pb2.ResponseFormat | None = None, max_new_tokens: int = 96,
         cache_mode=gateway_pb2.CACHE_MODE_BYPASS) -> gateway_pb2.GenerateRequest:
    request = gateway_pb2.GenerateRequest(chat=gateway_pb2.Chat(messages=[
        gateway_pb2.ChatMessage(role="user", content=text)]), cache_mode=cache_mode,
        sampling=gateway_pb2.SamplingParams(max_new_tokens=max_new_tokens))
    if response_format is not None:
        request.response_format.CopyFrom(response_format)
    return request


def test_a_json_schema_holds_the_answer_and_the_stream_joins_to_it(gateway):
    schema = gateway_pb2.ResponseFormat(json_schema=json.dumps(ORDER))
    request = chat("Anna, 34, orders items 12 and 7; it is urgent. Write the order as JSON.", schema)
    reply = gateway.Generate(request, timeout=120)
    jsonschema.validate(json.loads(reply.text), ORDER)
    assert reply.finish_reason == gateway_pb2.FINISH_REASON_STOP  # ended where the schema did
    streamed = "".join(chunk.delta for chunk in gateway.GenerateStream(request, timeout=120))
    assert streamed == reply.text


def test_a_regex_and_a_choice_list_hold_the_answer(gateway):
    order = gateway.Generate(chat("Which order id? Write it.", gateway_pb2.ResponseFormat(regex=ORDER_ID)),
                             timeout=120)
    assert re.fullmatch(ORDER_ID, order.text)
    choices = ["refund", "delivery", "other"]
    picked = gateway.Generate(chat("My parcel never came. Intent?",
                                   gateway_pb2.ResponseFormat(choice=gateway_pb2.ChoiceList(choices=choices))),
                              timeout=120)
    assert picked.text in choices


def test_support_answer_1_1_answers_as_its_declared_schema_says(gateway):
    listed = [t for t in gateway.ListTemplates(gateway_pb2.ListTemplatesRequest(), timeout=30).templates
              if t.id == "support_answer"]
    declared = {t.version: t.response_format.json_schema for t in listed}
    assert declared["1.0.0"] == "" and declared["1.1.0"]
    request = gateway_pb2.GenerateRequest(template=gateway_pb2.TemplateCall(id="support_answer", version="1.1.0"),
                                          cache_mode=gateway_pb2.CACHE_MODE_BYPASS,
                                          sampling=gateway_pb2.SamplingParams(max_new_tokens=256))
    request.template.variables.update({"question": "Where is my order AB-1234? It is two weeks late."})
    reply = gateway.Generate(request, timeout=120)
    answer = json.loads(reply.text)
    jsonschema.validate(answer, json.loads(declared["1.1.0"]))


@pytest.mark.parametrize(("response_format", "field"), [
    (gateway_pb2.ResponseFormat(json_schema='{"type": "object", "properties": {"a": {"type": "strin"}}}'),
     "response_format.json_schema"),
    (gateway_pb2.ResponseFormat(json_schema="{not json"), "response_format.json_schema"),
    (gateway_pb2.ResponseFormat(regex="(("), "response_format.regex"),
    (gateway_pb2.ResponseFormat(choice=gateway_pb2.ChoiceList(choices=["x"] * 65)), "response_format.choice"),
])
def test_a_format_guided_decoding_cannot_serve_is_invalid_argument_naming_its_field(gateway, response_format, field):
    with pytest.raises(grpc.RpcError) as refused:
        gateway.Generate(chat("hello", response_format), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(refused.value)
    bad = error_details_pb2.BadRequest()
    next(d for d in status.details if d.Is(bad.DESCRIPTOR)).Unpack(bad)
    assert [v.field for v in bad.field_violations] == [field]
    server_timing = dict(refused.value.trailing_metadata() or ()).get("server-timing", "")
    assert "inference" not in server_timing and "tokenizer" not in server_timing  # before any hop


def test_nlpmesh_ask_json_schema_answers_with_valid_json(mesh, tmp_path):
    schema_file = tmp_path / "order.json"
    schema_file.write_text(json.dumps(ORDER))
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "ask", "--addr", mesh.gateway_address, "--max-new-tokens", "96",
         "--cache", "bypass", "--json-schema", str(schema_file), "Tom, 51, wants item 3, low priority. As JSON."],
        capture_output=True, text=True, timeout=180, check=True,
    )
    jsonschema.validate(json.loads(result.stdout.splitlines()[0]), ORDER)
