"""Local replicas (`nlpmesh up --scale inference=2`): their names, ports, and the gateway's address list."""
from dataclasses import replace

import pytest

from cli.launcher import LocalMesh
from cli.main import parser
from cli.topology import load_topology, local_environment, replica_addresses
from meshkit.server import SERVER_OPTIONS
from meshkit.settings import DEFAULT_PORTS


def _service(name):
    return next(s for s in load_topology() if s.name == name)


def test_the_gateway_gets_every_replica_of_a_scaled_service_as_one_address_list():
    ports = {**DEFAULT_PORTS, "inference-2": 50065, "inference-3": 50075}
    env = local_environment(_service("gateway"), ports, "")
    assert env["NLPMESH_GATEWAY_INFERENCE_ADDR"] == "ipv4:127.0.0.1:50055,127.0.0.1:50065,127.0.0.1:50075"
    assert env["NLPMESH_GATEWAY_TOKENIZER_ADDR"] == "127.0.0.1:50053"  # one replica: a plain address


def test_a_replica_runs_on_its_own_port_and_metrics_port():
    ports = {**DEFAULT_PORTS, "inference-2": 50065}
    env = local_environment(_service("inference"), ports, "", {"inference": 9155, "inference-2": 9165}, "inference-2")
    assert env["NLPMESH_INFERENCE_PORT"] == "50065"
    assert env["NLPMESH_INFERENCE_METRICS_PORT"] == "9165"


def test_a_dns_target_in_the_compose_file_points_at_the_local_replicas():
    gateway = _service("gateway")
    gateway = replace(gateway, environment={**gateway.environment,
                                            "NLPMESH_GATEWAY_INFERENCE_ADDR": "dns:///inference:50055"})
    env = local_environment(gateway, {**DEFAULT_PORTS, "inference-2": 50065}, "")
    assert env["NLPMESH_GATEWAY_INFERENCE_ADDR"] == "ipv4:127.0.0.1:50055,127.0.0.1:50065"


def test_scaled_processes_are_named_per_replica_in_start_order(tmp_path):
    mesh = LocalMesh(tmp_path, scale={"inference": 2})
    names = list(mesh.instances)
    assert names.index("inference") + 1 == names.index("inference-2") < names.index("gateway")
    assert mesh.replicas("inference") == ["inference", "inference-2"]
    assert replica_addresses({"inference": 1, "inference-2": 2}, "inference") == "ipv4:127.0.0.1:1,127.0.0.1:2"


@pytest.mark.parametrize("scale, why", [({"nope": 2}, "no service nope"), ({"inference": 0}, "between 1 and"),
                                        ({"inference": 99}, "between 1 and")])
def test_a_bad_scale_is_refused_before_anything_starts(tmp_path, scale, why):
    with pytest.raises(ValueError, match=why):
        _ = LocalMesh(tmp_path, scale=scale).instances


def test_up_takes_repeated_scale_options():
    args = parser().parse_args(["up", "--scale", "inference=2", "--scale", "tokenizer=3"])
    assert args.scale == {"inference": 2, "tokenizer": 3}
    with pytest.raises(SystemExit):
        parser().parse_args(["up", "--scale", "inference"])


def test_health_all_lists_every_replica_with_its_address_and_status(tmp_path, monkeypatch, capsys):
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from cli import run_state
    from cli.main import main

    servers, ports = [], {}
    try:
        for name, status in (("inference", health_pb2.HealthCheckResponse.SERVING),
                             ("inference-2", health_pb2.HealthCheckResponse.NOT_SERVING)):
            server = grpc.server(futures.ThreadPoolExecutor(2), options=SERVER_OPTIONS)
            servicer = health.HealthServicer()
            servicer.set("", status)
            health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
            ports[name] = server.add_insecure_port("127.0.0.1:0")
            server.start()
            servers.append(server)
        monkeypatch.setenv("NLPMESH_HOME", str(tmp_path))
        run_state.write(tmp_path / "run" / "mesh.json", {"ports": ports})
        assert main(["health", "--all", "--plaintext", "--timeout", "2"]) == 1  # one is not SERVING
        lines = capsys.readouterr().out.splitlines()
        assert lines == [f"inference    127.0.0.1:{ports['inference']:<5}  SERVING",
                         f"inference-2  127.0.0.1:{ports['inference-2']:<5}  NOT_SERVING"]
    finally:
        for server in servers:
            server.stop(None)
