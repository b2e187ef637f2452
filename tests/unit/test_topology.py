"""docker-compose.yml is the topology; the local launcher derives its processes from it."""
from pathlib import Path

import yaml

from cli.topology import COMPOSE_FILE, compose_services, load_topology, local_environment
from meshkit.settings import DEFAULT_PORTS


def test_the_launcher_starts_every_compose_service_with_the_gateway_then_the_edge_last():
    names = [s.name for s in load_topology()]
    assert sorted(names) == sorted(DEFAULT_PORTS)
    assert names[-2:] == ["gateway", "edge"]


def test_compose_ports_match_the_documented_defaults():
    assert {s.name: s.port for s in load_topology()} == DEFAULT_PORTS


def test_every_compose_service_has_a_health_check_grpc_or_the_edge_s_http():
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    for service in compose_services():
        test = services[service.name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "nlpmesh", "health"], service.name
        if service.kind == "edge":
            assert test[3:] == ["--http", f"https://127.0.0.1:{DEFAULT_PORTS['edge']}/healthz"]
        else:
            assert test[-1].endswith(f":{DEFAULT_PORTS[service.kind]}"), service.name


def test_inference_runs_as_one_compose_service_per_model_and_the_launcher_runs_the_first():
    inference = [s for s in compose_services() if s.kind == "inference"]
    assert [s.name for s in inference] == [f"inference-{s.model}" for s in inference]
    assert len(inference) >= 2 and len({s.model for s in inference}) == len(inference)
    (local,) = [s for s in load_topology() if s.kind == "inference"]
    assert (local.name, local.model, local.environment) == ("inference", inference[0].model, inference[0].environment)
    gateway = next(s for s in load_topology() if s.name == "gateway")
    assert "inference" in gateway.depends_on and not any(d.startswith("inference-") for d in gateway.depends_on)


def test_the_gateways_per_model_address_map_becomes_the_one_local_inference_address():
    gateway = next(s for s in load_topology() if s.name == "gateway")
    assert "NLPMESH_GATEWAY_INFERENCE_ADDRS" in gateway.environment
    env = local_environment(gateway, {**DEFAULT_PORTS, "inference": 51055}, "")
    assert env["NLPMESH_GATEWAY_INFERENCE_ADDR"] == "127.0.0.1:51055"
    assert "NLPMESH_GATEWAY_INFERENCE_ADDRS" not in env


def test_local_environment_points_service_names_at_local_ports():
    gateway = next(s for s in load_topology() if s.name == "gateway")
    ports = {name: port + 1000 for name, port in DEFAULT_PORTS.items()}
    env = local_environment(gateway, ports, "redis://127.0.0.1:7000/0")
    assert env["NLPMESH_GATEWAY_HOST"] == "127.0.0.1"
    assert env["NLPMESH_GATEWAY_PORT"] == "51051"
    assert env["NLPMESH_GATEWAY_INFERENCE_ADDR"] == "127.0.0.1:51055"
    assert env["REDIS_URL"] == "redis://127.0.0.1:7000/0"


def test_no_redis_means_an_empty_url_so_the_gateway_runs_without_a_cache():
    gateway = next(s for s in load_topology() if s.name == "gateway")
    assert local_environment(gateway, dict(DEFAULT_PORTS), "")["REDIS_URL"] == ""


def _container_ports(spec: dict) -> set[int]:
    """The container ports a compose service declares: the container side of `ports:`, and `expose:`."""
    published = {int(str(p).rsplit(":", 1)[-1]) for p in spec.get("ports", [])}
    return published | {int(p) for p in spec.get("expose", [])}


def test_every_compose_service_declares_its_own_metrics_port():
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    metrics_ports = {s.name: s.metrics_port for s in load_topology()}
    assert all(metrics_ports.values()) and len(set(metrics_ports.values())) == len(metrics_ports)
    assert not set(metrics_ports.values()) & set(DEFAULT_PORTS.values())
    for service in compose_services():
        assert _container_ports(services[service.name]) == {service.port, service.metrics_port}, service.name


# Published on the host: what callers and operators reach. The rest only `expose:`.
PUBLISHED = {"gateway": ["50051:50051", "9151:9151"], "edge": ["50056:50056", "9156:9156"], "redis": ["6379:6379"], "prometheus": ["9090:9090"]}


def test_internal_services_publish_no_host_port_so_compose_can_scale_them():
    """`docker compose up --scale inference-smollm2=2` fails on a fixed host port ("port is already
    allocated"): template, tokenizer, cache and inference only expose theirs in the network."""
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    for name in (s.name for s in compose_services() if s.kind not in ("gateway", "edge")):
        assert "ports" not in services[name], name
        assert services[name]["expose"], name
    for name, ports in PUBLISHED.items():
        assert services[name]["ports"] == ports, name


def test_prometheus_finds_every_replica_of_every_service_by_dns():
    prometheus = yaml.safe_load((COMPOSE_FILE.parent / "deploy" / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert "static_configs" not in job
    found = {(c["names"][0], c["port"]) for c in job["dns_sd_configs"] if c["type"] == "A"}
    assert found == {(s.name, s.metrics_port) for s in compose_services()}


def test_compose_prometheus_loads_every_rule_file_from_the_folder_it_mounts():
    prometheus = yaml.safe_load((COMPOSE_FILE.parent / "deploy" / "prometheus.yml").read_text())
    volumes = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["prometheus"]["volumes"]
    mounted = {target: source for source, target, *_ in (v.split(":") for v in volumes)}
    (pattern,) = prometheus["rule_files"]
    folder, _, glob = pattern.rpartition("/")
    rules = sorted((COMPOSE_FILE.parent / mounted[folder]).glob(glob))
    assert [path.name for path in rules] == ["nlpmesh.yml"]


def test_local_environment_sets_the_assigned_metrics_port_and_none_without_one():
    inference = next(s for s in load_topology() if s.name == "inference")
    ports = dict(DEFAULT_PORTS)
    assert local_environment(inference, ports, "", {"inference": 19155})["NLPMESH_INFERENCE_METRICS_PORT"] == "19155"
    # A process started beside a running mesh (bench variants) must not fight it for the port.
    assert local_environment(inference, ports, "")["NLPMESH_INFERENCE_METRICS_PORT"] == "0"


def test_compose_infrastructure_is_not_run_locally_and_its_otel_settings_are_dropped():
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    assert {"otel-collector", "jaeger", "prometheus"} <= set(services)
    gateway = next(s for s in load_topology() if s.name == "gateway")
    assert gateway.environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
    env = local_environment(gateway, dict(DEFAULT_PORTS), "")
    assert not any(key.startswith("OTEL_") for key in env)


def test_the_compose_gateway_checks_keys_from_a_mounted_folder_and_the_launcher_overrides_it(tmp_path):
    from cli.launcher import LocalMesh

    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    gateway = next(s for s in load_topology() if s.name == "gateway")
    assert gateway.environment["NLPMESH_GATEWAY_AUTH"] == "on"
    keys_file = gateway.environment["NLPMESH_GATEWAY_AUTH_KEYS_FILE"]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in services["gateway"]["volumes"] if m.startswith("./")}
    assert str(Path(keys_file).parent) in mounts  # the folder: a replaced file stays visible
    assert "models:/root/.cache/nlpmesh" in services["gateway"]["volumes"]
    assert LocalMesh(tmp_path).gateway_auth_env() == {"NLPMESH_GATEWAY_AUTH": "off"}
    local = LocalMesh(tmp_path, keys_file=tmp_path / "keys.toml").gateway_auth_env()
    assert local["NLPMESH_GATEWAY_AUTH_KEYS_FILE"] == str(tmp_path / "keys.toml")


def test_every_compose_service_reads_the_mounted_certificates_and_the_launcher_sets_its_own():
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    for service in compose_services():
        folder = service.environment["NLPMESH_TLS_DIR"]
        assert any(v.endswith(f":{folder}:ro") for v in services[service.name]["volumes"]), service.name
        assert "NLPMESH_TLS_DIR" not in local_environment(service, dict(DEFAULT_PORTS), "")
