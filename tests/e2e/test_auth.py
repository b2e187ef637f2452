"""Auth over real processes: two gateways on one keys file; a key revoked with the CLI is
refused by both within seconds, without a restart."""
from __future__ import annotations

import grpc
import pytest
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from bench.variants import spawn_gateway
from cli.launcher import LocalMesh
from cli.main import main as nlpmesh
from gateway.api_keys import create_key
from gateway.tenant import Tenant
from tests.polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.model]

REVOKED_WITHIN_S = 5.0


@pytest.fixture(scope="module")
def keyed_mesh(tmp_path_factory, mesh_redis):
    run_dir = tmp_path_factory.mktemp("mesh")
    keys_file = run_dir / "keys.toml"
    _, local_key = create_key(keys_file, Tenant("local"))
    local = LocalMesh(run_dir, free_ports=True, redis_url=mesh_redis.url, keys_file=keys_file, api_key=local_key,
                      progress=lambda line: print(f"[mesh] {line}"))
    local.start(ready_timeout_s=300)
    yield local
    local.stop()


def count_tokens(address: str, key: str | None) -> grpc.StatusCode:
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    request = gateway_pb2.CountTokensRequest(chat=gateway_pb2.Chat(messages=[
        gateway_pb2.ChatMessage(role="user", content="How many tokens?")]))
    with grpc.insecure_channel(address) as channel:
        try:
            gateway_pb2_grpc.GatewayStub(channel).CountTokens(request, timeout=10, metadata=metadata)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def test_a_key_revoked_with_the_cli_is_refused_by_every_gateway_within_seconds(keyed_mesh):
    # The mesh's own access carries its key: an answer from the real model.
    with keyed_mesh.gateway_access().channel() as channel:
        reply = gateway_pb2_grpc.GatewayStub(channel).Generate(gateway_pb2.GenerateRequest(
            chat=gateway_pb2.Chat(messages=[gateway_pb2.ChatMessage(role="user", content="Hi")]),
            sampling=gateway_pb2.SamplingParams(max_new_tokens=2)), timeout=120)
    assert reply.usage.completion_tokens > 0

    second, second_address = spawn_gateway(keyed_mesh, {})  # the same keys file, another process
    try:
        addresses = (keyed_mesh.gateway_address, second_address)
        key_id, key = create_key(keyed_mesh.keys_file, Tenant("acme"))
        # A new key is seen as fast as a revoked one.
        wait_until(lambda: all(count_tokens(a, key) == grpc.StatusCode.OK for a in addresses), REVOKED_WITHIN_S, 0.1,
                   what="both gateways to accept the new key")
        assert all(count_tokens(a, None) == grpc.StatusCode.UNAUTHENTICATED for a in addresses)

        assert nlpmesh(["keys", "revoke", key_id, "--file", str(keyed_mesh.keys_file)]) == 0
        wait_until(lambda: all(count_tokens(a, key) == grpc.StatusCode.UNAUTHENTICATED for a in addresses),
                   REVOKED_WITHIN_S, 0.1, what="both gateways to refuse the revoked key")
        # Both still serve the keys left, with no restart in between.
        assert all(count_tokens(a, keyed_mesh.api_key) == grpc.StatusCode.OK for a in addresses)
        assert second.poll() is None
    finally:
        second.terminate()
        second.wait(timeout=10)


def test_a_key_scoped_with_the_cli_gets_its_template_and_permission_denied_outside_it(keyed_mesh, capsys):
    assert nlpmesh(["keys", "create", "--tenant", "desk", "--templates", "finance_question", "--models", "smollm2",
                    "--file", str(keyed_mesh.keys_file)]) == 0
    key = capsys.readouterr().out.strip().splitlines()[-1]
    metadata = (("authorization", f"Bearer {key}"),)
    finance = gateway_pb2.GenerateRequest(template=gateway_pb2.TemplateCall(id="finance_question"),
                                          sampling=gateway_pb2.SamplingParams(max_new_tokens=2))
    finance.template.variables.update({"question": "What is a bond?"})
    chat = gateway_pb2.GenerateRequest(chat=gateway_pb2.Chat(messages=[gateway_pb2.ChatMessage(role="user",
                                                                                               content="Hi")]))
    with grpc.insecure_channel(keyed_mesh.gateway_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        wait_until(lambda: _code(lambda: stub.ListModels(gateway_pb2.ListModelsRequest(), metadata=metadata,
                                                         timeout=10)) == grpc.StatusCode.OK,
                   REVOKED_WITHIN_S, 0.1, what="the gateway to accept the new key")
        assert stub.Generate(finance, metadata=metadata, timeout=120).usage.completion_tokens > 0
        assert _code(lambda: stub.Generate(chat, metadata=metadata, timeout=30)) == grpc.StatusCode.PERMISSION_DENIED
        other = gateway_pb2.GenerateRequest(template=gateway_pb2.TemplateCall(id="support_answer"))
        assert _code(lambda: list(stub.GenerateStream(other, metadata=metadata, timeout=30))) == \
            grpc.StatusCode.PERMISSION_DENIED
        listed = stub.ListTemplates(gateway_pb2.ListTemplatesRequest(), metadata=metadata, timeout=10)
        assert {t.id for t in listed.templates} == {"finance_question"}


def _code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK
