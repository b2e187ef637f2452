"""The contract nlpmesh-client carries (clients/python/src/nlpmesh_client/_contract.py) is protos/'s gateway.proto
as it is now: regenerated in-process (protoc as a library) and compared."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from nlpmesh.gateway.v1 import gateway_pb2
from nlpmesh_client import messages

SCRIPT = Path(__file__).resolve().parents[2] / "clients" / "python" / "regenerate_contract.py"


def regenerator():
    spec = importlib.util.spec_from_file_location("regenerate_contract", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_checked_in_contract_is_gateway_proto_as_it_is_now():
    script = regenerator()
    assert script.TARGET.read_text() == script.module_text(script.serialized_gateway_proto()), (
        "clients/python/src/nlpmesh_client/_contract.py is stale: run "
        ".venv/bin/python clients/python/regenerate_contract.py")


def test_a_change_to_gateway_proto_makes_the_check_fail(tmp_path, monkeypatch):
    script = regenerator()
    changed = tmp_path / "protos"
    for source in (script.PROTOS / "nlpmesh" / "gateway" / "v1").glob("*.proto"):
        target = changed / "nlpmesh" / "gateway" / "v1" / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source.read_text().replace("string model = 3;", "string model = 30;", 1))
    monkeypatch.setattr(script, "PROTOS", changed)
    assert script.main(["--check"]) == 1


def test_the_packaged_messages_are_wire_compatible_with_the_generated_stubs():
    request = messages.GenerateRequest(model="smollm2", budget_ms=900)
    request.template.id = "finance_question"
    request.template.variables.update({"question": "What is a bond?"})
    request.sampling.seed = 7
    decoded = gateway_pb2.GenerateRequest.FromString(request.SerializeToString())
    assert decoded.template.variables["question"] == "What is a bond?" and decoded.sampling.seed == 7
    assert decoded.model == "smollm2" and decoded.budget_ms == 900
