"""deploy/k8s: every object valid against the Kubernetes schemas, and the same topology as
docker-compose.yml (ports, variables, commands, probes, trust, one inference Deployment per
catalogue model), without a cluster.

The base is rendered by tests/k8s_render.py (kustomize where installed, else a reader of the
features the base uses; a test checks they agree). Nothing here needs the network:
kubernetes-validate carries its schemas.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
import yaml

from cli import redis_acl
from cli.certs import DEFAULT_NAMESPACE, dns_names, init_certs
from cli.topology import COMPOSE_FILE, REPO_ROOT, compose_services, redis_server_args
from meshkit.settings import TLS_DIR_ENV, ServiceSettings
from meshkit.tls import CA_FILE, PROBE
from tests.catalogue_services import MODEL_ENV, catalogue_ids, coverage_problems, inference_service
from tests.k8s_render import (
    container,
    containers_of,
    env_of,
    find,
    kubelet_layout,
    kustomize_command,
    mounts,
    render,
    render_in_python,
    render_with_kustomize,
    workload,
)

# The oldest Kubernetes the base is meant for, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
# Each Deployment of the base, named as its compose service, and the service it runs (its
# settings' NLPMESH_<KIND>_ prefix, its certificate): inference-<model> runs inference.
DEPLOYMENTS = {s.name: s.kind for s in compose_services()}
# Reached from outside the mesh: the gateway (gRPC) and the OpenAI-compatible edge (HTTPS); the rest is internal.
PUBLIC = {"gateway": "grpc", "edge": "http"}
INTERNAL = tuple(name for name, kind in DEPLOYMENTS.items() if kind not in PUBLIC)
MODEL_DEPLOYMENTS = tuple(name for name, kind in DEPLOYMENTS.items() if kind == "inference")
DEFAULT_INFERENCE = inference_service(catalogue_ids()[0])
# Variables only the Kubernetes base sets, each checked below against what it points at.
K8S_ONLY_ENV = {
    "template": {"NLPMESH_TEMPLATE_TEMPLATES_DIR"},  # the templates ConfigMap's mount
    "gateway": {"NLPMESH_GATEWAY_BUDGETS_FILE",  # the budgets ConfigMap's mount
                "NLPMESH_GATEWAY_QUOTA_REPLICAS"},  # the Deployment's replicas
}
# The Secrets the base refers to and never holds; the README says how to make each.
SECRETS = {"nlpmesh-certs", "nlpmesh-api-keys", "nlpmesh-redis-users", "nlpmesh-redis-acl"}
GATEWAY_CACHE_PATH = "nlpmesh.gateway.v1.Gateway/cache"
README = REPO_ROOT / "README.md"
SECRETS_BLOCK_MARKER = "<!-- k8s-secrets"
_REQUIRED = re.compile(r"\$\{(\w+):\?[^}]*\}")  # ${VAR:?message}: compose stops without VAR
_DEFAULTED = re.compile(r"\$\{(\w+):-([^}]*)\}")  # ${VAR:-default}
_ADDRESS = re.compile(r"^([a-z][a-z0-9_-]*):(\d+)$")


# --- rendering --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return render()


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)s", duration)
    assert match, f"compose duration {duration!r}: only seconds are read here"
    return float(match[1])


def expected_value(service: str, key: str, value: str, compose_services: set[str]) -> str:
    """A compose variable's value as the Kubernetes base must spell it."""
    value = _REQUIRED.sub(r"$(\1)", value)  # from a Secret through Kubernetes' $(VAR) expansion
    address = _ADDRESS.match(value)
    if service == "gateway" and key.endswith("_ADDR") and address and address[1] in compose_services:
        return f"dns:///{value}"  # every pod of the headless Service, round_robin over them
    return value


# --- drift against docker-compose.yml ---------------------------------------------------

def drift(compose: dict, objects: list[dict]) -> list[str]:
    """Every difference between compose's topology and the base's; empty when they agree."""
    problems: list[str] = []
    try:
        topology = compose_services_from(compose)
    except (KeyError, ValueError) as error:
        return [f"docker-compose.yml: {error}"]
    names = {s.name for s in topology}
    deployments = {o["metadata"]["name"] for o in objects if o["kind"] == "Deployment"}
    if deployments != names:
        problems.append(f"Deployments {sorted(deployments)}, compose's services {sorted(names)}")
    for service in topology:
        try:
            problems += _service_drift(service, compose, objects, names)
        except AssertionError as error:
            problems.append(f"{service.name}: {error}")
    try:
        problems += _redis_drift(compose["services"]["redis"], objects)
    except AssertionError as error:
        problems.append(f"redis: {error}")
    return problems


def compose_services_from(compose: dict):
    """cli.topology.compose_services over a compose document (a copy of the real one, in tests)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "docker-compose.yml"
        path.write_text(yaml.safe_dump(compose, sort_keys=False))
        return compose_services(path)


def startup_window(compose: dict, name: str) -> float:
    """Seconds compose gives ``name`` to turn healthy after its depends_on are (interval x
    retries), plus the longest such wait among them: Kubernetes starts every pod at once, so a
    startup probe must also outlast what compose would have waited for first."""
    spec = compose["services"][name]
    own = seconds(spec["healthcheck"]["interval"]) * spec["healthcheck"]["retries"]
    return own + max((startup_window(compose, dep) for dep in spec.get("depends_on") or ()), default=0)


def _service_drift(service, compose: dict, objects: list[dict], names: set[str]) -> list[str]:
    spec = compose["services"][service.name]
    problems = []
    c = container(objects, service.name)
    name = service.name
    # The command: compose's command is the container's args, the image's entrypoint kept.
    if "command" in c or c.get("args") != list(service.command):
        problems.append(f"{name}: args {c.get('args')} (command {c.get('command')}), compose {list(service.command)}")
    # Ports: the container's named ports are compose's container ports, and the Service's.
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    # compose's container ports: the container side of `ports:` (published) and `expose:` (the
    # internal services, which publish nothing so that they scale).
    published = sorted([int(str(p).rsplit(":", 1)[-1]) for p in spec.get("ports", [])]
                       + [int(p) for p in spec.get("expose", [])])
    if ports.get(PUBLIC.get(service.kind, "grpc")) != service.port or ports.get("metrics") != service.metrics_port:
        problems.append(f"{name}: ports {ports}, compose grpc {service.port}, metrics {service.metrics_port}")
    if sorted(ports.values()) != published:
        problems.append(f"{name}: container ports {sorted(ports.values())}, compose ports {published}")
    svc = find(objects, "Service", name)
    for port in svc["spec"]["ports"]:
        if ports.get(port["targetPort"]) != port["port"]:
            problems.append(f"{name}: Service port {port['port']} targets {port['targetPort']} = "
                            f"{ports.get(port['targetPort'])}")
    # Variables: compose's, by name and value, plus the Secret references and K8S_ONLY_ENV.
    env = env_of(c)
    secret_vars = {m for value in service.environment.values() for m in _REQUIRED.findall(value)}
    wanted = set(service.environment) | secret_vars | K8S_ONLY_ENV.get(name, set())
    if set(env) != wanted:
        problems.append(f"{name}: variables only in deploy/k8s {sorted(set(env) - wanted)}, "
                        f"only in compose {sorted(wanted - set(env))}")
    for key, value in service.environment.items():
        expected = expected_value(name, key, value, names)
        if key in env and env[key].get("value") != expected:
            problems.append(f"{name}: {key}={env[key].get('value')!r}, compose says {expected!r}")
    order = [e["name"] for e in c.get("env", [])]
    for var in secret_vars:
        ref = env.get(var, {}).get("valueFrom", {}).get("secretKeyRef", {})
        if ref != {"name": "nlpmesh-redis-users", "key": var}:
            problems.append(f"{name}: {var} must come from Secret nlpmesh-redis-users key {var}, not {ref}")
        users = [k for k, v in service.environment.items() if var in v]
        if var in order and any(order.index(var) > order.index(user) for user in users if user in order):
            problems.append(f"{name}: {var} must come before {users}, for Kubernetes' $(...) expansion")
    # Probes: compose's healthcheck is the startup probe, its interval and timeout; its window
    # also covers the services compose would have waited for (startup_window).
    check = spec["healthcheck"]
    assert check["test"][0] == "CMD", "a healthcheck without CMD is not compared here"
    command = list(check["test"][1:])
    startup = c.get("startupProbe", {})
    if startup.get("exec", {}).get("command") != command or "grpc" in startup:
        problems.append(f"{name}: startupProbe runs {startup.get('exec')}, compose {command}")
    timing = (startup.get("periodSeconds"), startup.get("timeoutSeconds"), startup.get("failureThreshold"))
    interval = seconds(check["interval"])
    wanted = (interval, seconds(check["timeout"]), math.ceil(startup_window(compose, name) / interval))
    if timing != wanted:
        problems.append(f"{name}: startupProbe period/timeout/failures {timing}, from compose {wanted}")
    # Readiness and liveness: the same check; the gateway's asks for its cache-hit path.
    later = command + (["--service", GATEWAY_CACHE_PATH] if name == "gateway" else [])
    for probe in ("readinessProbe", "livenessProbe"):
        if c.get(probe, {}).get("exec", {}).get("command") != later:
            problems.append(f"{name}: {probe} runs {c.get(probe, {}).get('exec')}, expected {later}")
    return problems


def _redis_drift(spec: dict, objects: list[dict]) -> list[str]:
    problems = []
    c = container(objects, "redis")
    command = [_DEFAULTED.sub(r"\2", part) for part in redis_server_args(spec["command"])]
    if c.get("args") != command or "command" in c:
        problems.append(f"redis: args {c.get('args')}, compose {command}")
    if c.get("image") != spec["image"]:
        problems.append(f"redis: image {c.get('image')}, compose {spec['image']}")
    published = sorted(int(str(p).rsplit(":", 1)[-1]) for p in spec.get("ports", []))
    if sorted(p["containerPort"] for p in c.get("ports", [])) != published:
        problems.append(f"redis: ports {c.get('ports')}, compose {published}")
    check = spec["healthcheck"]
    assert check["test"][0] == "CMD-SHELL", "redis's healthcheck is a shell line in compose"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if c.get(probe, {}).get("exec", {}).get("command") != ["sh", "-c", check["test"][1]]:
            problems.append(f"redis: {probe} runs {c.get(probe)}, compose {check['test']}")
    return problems


def test_the_base_and_compose_have_one_topology(compose, objects):
    assert drift(compose, objects) == []


@pytest.mark.parametrize("change", [
    "a port", "an exposed port", "a published port", "a metrics port", "a variable's name", "a variable's value", "a command",
    "a healthcheck", "a healthcheck's retries", "an internal address", "a Redis password variable",
    "redis's maxmemory policy", "a model's address", "the model a service serves",
])
def test_a_change_on_one_side_only_is_drift(compose, objects, change):
    """The comparison is not vacuous: each kind of edit to compose alone is reported."""
    edited = copy.deepcopy(compose)
    services = edited["services"]
    if change == "a port":
        services[DEFAULT_INFERENCE]["environment"]["NLPMESH_INFERENCE_PORT"] = "50065"
        services[DEFAULT_INFERENCE]["expose"][0] = "50065"
    elif change == "an exposed port":  # `expose:` alone, the service's variables unchanged
        services["tokenizer"]["expose"][1] = "9163"
    elif change == "a published port":
        services["gateway"]["ports"][1] = "9161:9161"
    elif change == "a metrics port":
        services["cache"]["environment"]["NLPMESH_CACHE_METRICS_PORT"] = "9164"
    elif change == "a variable's name":
        services["template"]["environment"]["NLPMESH_TEMPLATE_MAX_VARIABLES"] = "10"
    elif change == "a variable's value":
        services[DEFAULT_INFERENCE]["environment"]["NLPMESH_INFERENCE_THREADS"] = "4"
    elif change == "a command":
        services["tokenizer"]["command"] = ["python", "-m", "services.tokenizer", "--verbose"]
    elif change == "a healthcheck":
        services["gateway"]["healthcheck"]["test"] = ["CMD", "nlpmesh", "health", "--addr", "127.0.0.1:50061"]
    elif change == "a healthcheck's retries":
        services[DEFAULT_INFERENCE]["healthcheck"]["retries"] = 120
    elif change == "an internal address":
        services["gateway"]["environment"]["NLPMESH_GATEWAY_CACHE_ADDR"] = "cache:50064"
    elif change == "a Redis password variable":
        url = services["cache"]["environment"]["REDIS_URL"]
        services["cache"]["environment"]["REDIS_URL"] = url.replace("NLPMESH_REDIS_CACHE_PASSWORD",
                                                                    "NLPMESH_REDIS_CACHE_SECRET")
    elif change == "redis's maxmemory policy":
        command = services["redis"]["command"]
        command[-1] = command[-1].replace("allkeys-lru", "noeviction")
    elif change == "a model's address":
        env = services["gateway"]["environment"]
        env["NLPMESH_GATEWAY_INFERENCE_ADDRS"] = env["NLPMESH_GATEWAY_INFERENCE_ADDRS"].replace(":50055", ":50065", 1)
    elif change == "the model a service serves":
        services[MODEL_DEPLOYMENTS[-1]]["environment"] = {**services[MODEL_DEPLOYMENTS[-1]]["environment"],
                                                          MODEL_ENV: "another"}
    assert drift(edited, objects) != []


def test_a_change_to_the_base_alone_is_drift(compose, objects):
    edited = copy.deepcopy(objects)
    container(edited, "gateway")["ports"][0]["containerPort"] = 50061
    assert any("gateway" in problem for problem in drift(compose, edited))
    edited = copy.deepcopy(objects)
    container(edited, "template")["env"].append({"name": "NLPMESH_TEMPLATE_EXTRA", "value": "1"})
    assert any("NLPMESH_TEMPLATE_EXTRA" in problem for problem in drift(compose, edited))


# --- schemas ----------------------------------------------------------------------------

@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schemas(objects, version):
    failures = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)  # strict: no unknown field either
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as error:
            failures.append(f"{obj['kind']}/{obj['metadata']['name']}: {error.message}")
    assert failures == []


def test_validation_rejects_a_misspelled_field_and_a_wrong_type(objects):
    misspelled = copy.deepcopy(workload(objects, DEFAULT_INFERENCE))
    misspelled["spec"]["template"]["spec"]["terminationGracePeriod"] = 30
    wrong_type = copy.deepcopy(workload(objects, DEFAULT_INFERENCE))
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "grpc"
    for broken in (misspelled, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.skipif(kustomize_command() is None, reason="no kubectl or kustomize to compare with")
def test_the_python_rendering_is_kustomizes():
    def key(obj):
        return obj["kind"], obj["metadata"]["name"]
    assert sorted(render_in_python(), key=key) == sorted(render_with_kustomize(), key=key)


# --- what the base holds ----------------------------------------------------------------

def test_the_objects_of_the_base(objects):
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    assert kinds == sorted([
        ("Namespace", DEFAULT_NAMESPACE), ("ConfigMap", "nlpmesh-budgets"), ("ConfigMap", "nlpmesh-templates"),
        *[("Deployment", s) for s in DEPLOYMENTS], *[("Service", s) for s in DEPLOYMENTS],
        ("StatefulSet", "redis"), ("Service", "redis"),
        *[("PodDisruptionBudget", s) for s in MODEL_DEPLOYMENTS],
        *[("HorizontalPodAutoscaler", s) for s in MODEL_DEPLOYMENTS],
        *[("NetworkPolicy", p) for p in ("default-deny-ingress", "gateway-grpc-from-anywhere", "edge-http-from-anywhere",
                                         "template-grpc-from-gateway", "tokenizer-grpc-from-gateway",
                                         "cache-grpc-from-gateway", "embedding-grpc-from-gateway",
                                         "inference-grpc-from-gateway",
                                         "redis-from-its-users", "metrics-from-monitoring")],
    ])
    # No Secret is committed: the base refers to them, the README says how to make them.
    assert not [o for o in objects if o["kind"] == "Secret"]
    # The certificates name <svc>.<namespace>.svc with `nlpmesh certs init`'s default namespace.
    assert {o["metadata"].get("namespace", o["metadata"]["name"]) for o in objects} == {DEFAULT_NAMESPACE}


def test_internal_services_are_headless_and_the_gateway_and_the_edge_are_not(objects):
    for name in (*INTERNAL, "redis"):
        assert find(objects, "Service", name)["spec"]["clusterIP"] == "None", name
    for name in PUBLIC:
        assert find(objects, "Service", name)["spec"].get("clusterIP") in (None, ""), name
    for name in (*DEPLOYMENTS, "redis"):
        selector = find(objects, "Service", name)["spec"]["selector"]
        pod_labels = workload(objects, name)["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items(), name
        assert workload(objects, name)["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert workload(objects, "redis")["spec"]["serviceName"] == "redis"


def test_the_gateway_reaches_every_pod_of_each_service_by_a_name_its_certificate_holds(objects):
    env = env_of(container(objects, "gateway"))
    for name in (n for n in INTERNAL if n not in MODEL_DEPLOYMENTS):
        target = env[f"NLPMESH_GATEWAY_{name.upper()}_ADDR"]["value"]
        match = re.fullmatch(r"dns:///([a-z0-9.-]+):(\d+)", target)
        assert match, target
        assert match[1] in dns_names(name, DEFAULT_NAMESPACE)
        assert find(objects, "Service", match[1].split(".")[0])["spec"]["clusterIP"] == "None"


def test_the_gateway_reaches_each_models_inference_pods_through_that_models_headless_service(objects):
    addrs = json.loads(env_of(container(objects, "gateway"))["NLPMESH_GATEWAY_INFERENCE_ADDRS"]["value"])
    for model, target in addrs.items():
        match = re.fullmatch(r"dns:///([a-z0-9-]+):(\d+)", target)
        assert match, target
        service = find(objects, "Service", match[1])
        assert service["spec"]["clusterIP"] == "None"
        pods = [o for o in objects if o["kind"] == "Deployment" and service["spec"]["selector"].items()
                <= o["spec"]["template"]["metadata"]["labels"].items()]
        assert [o["metadata"]["name"] for o in pods] == [inference_service(model)], model
        assert env_of(container(objects, inference_service(model)))[MODEL_ENV]["value"] == model


def k8s_model_coverage(objects: list[dict], ids: tuple[str, ...]) -> list[str]:
    """What the base lacks for the catalogue (tests/catalogue_services.py), read from the
    Deployments that set NLPMESH_INFERENCE_MODEL and the gateway's variables."""
    served = {o["metadata"]["name"]: env_of(c)[MODEL_ENV]["value"] for o in objects if o["kind"] == "Deployment"
              for c in containers_of(o) if MODEL_ENV in env_of(c)}
    gateway_env = {k: e.get("value", "") for k, e in env_of(container(objects, "gateway")).items()}
    ports = {p["containerPort"] for name in served for p in container(objects, name)["ports"] if p["name"] == "grpc"}
    problems = [f"inference Deployments on different gRPC ports {sorted(ports)}"] if len(ports) > 1 else []
    return problems + coverage_problems(served, gateway_env, min(ports, default=0), ids)


def test_every_catalogue_model_has_its_deployment_and_the_gateway_routes_to_it(objects):
    assert len(catalogue_ids()) >= 2
    assert k8s_model_coverage(objects, catalogue_ids()) == []


def test_a_model_without_its_deployment_or_its_address_is_reported(objects):
    other = catalogue_ids()[1]
    without_deployment = [o for o in objects if (o["kind"], o["metadata"]["name"]) != ("Deployment",
                                                                                      inference_service(other))]
    assert any(f"no inference service for catalogue model {other!r}" in p
               for p in k8s_model_coverage(without_deployment, catalogue_ids()))
    without_address = copy.deepcopy(objects)
    variable = env_of(container(without_address, "gateway"))["NLPMESH_GATEWAY_INFERENCE_ADDRS"]
    variable["value"] = json.dumps({k: v for k, v in json.loads(variable["value"]).items() if k != other})
    assert k8s_model_coverage(without_address, catalogue_ids()) != []
    assert k8s_model_coverage(objects, (*catalogue_ids(), "another")) != []  # a model added to the catalogue only


def test_every_deployment_has_resources_and_outlasts_its_drain(objects):
    for name, kind in DEPLOYMENTS.items():
        pod = workload(objects, name)["spec"]["template"]["spec"]
        resources = container(objects, name)["resources"]
        assert {"cpu", "memory"} <= resources["requests"].keys() <= resources["limits"].keys(), name
        env = env_of(container(objects, name))
        grace = f"NLPMESH_{kind.upper()}_GRACE_S"
        drain = float(env[grace]["value"]) if grace in env else _default_grace(kind)
        if name == "gateway":  # then the pending cache stores (gateway/__main__.py close)
            from gateway.settings import GatewaySettings
            store = "NLPMESH_GATEWAY_CACHE_STORE_TIMEOUT_S"
            drain += float(env[store]["value"]) if store in env else \
                GatewaySettings.model_fields["cache_store_timeout_s"].default
        # Margin for the process to start draining and to close its clients.
        assert pod["terminationGracePeriodSeconds"] >= drain + 5, (name, drain)
    for name in MODEL_DEPLOYMENTS:
        threads = env_of(container(objects, name))["NLPMESH_INFERENCE_THREADS"]["value"]
        requests = container(objects, name)["resources"]["requests"]
        assert float(requests["cpu"]) >= float(threads), name  # the model's threads have their cores


PACKAGES = {"edge": "openai_edge"}  # a service whose package is not named after it


def _default_grace(name: str) -> float:
    """grace_s as the service's settings define it: the base class's, which no service overrides
    (checked in the source: importing the inference settings would load torch)."""
    package = REPO_ROOT / name if name == "gateway" else REPO_ROOT / "services" / PACKAGES.get(name, name)
    source = (package / "settings.py").read_text()
    assert not re.search(r"^\s+grace_s\s*:", source, re.M), f"{name} overrides grace_s: read it here"
    return ServiceSettings.model_fields["grace_s"].default


def test_redis_is_bounded_like_compose(objects):
    args = container(objects, "redis")["args"]
    maxmemory = args[args.index("--maxmemory") + 1]
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"
    limit = container(objects, "redis")["resources"]["limits"]["memory"]
    assert _bytes(limit) > _bytes(maxmemory), "Redis's memory limit must leave room above maxmemory"


def _bytes(quantity: str) -> int:
    units = {"mb": 10**6, "gb": 10**9, "kb": 10**3, "Mi": 2**20, "Gi": 2**30, "Ki": 2**10}
    match = re.fullmatch(r"(\d+)(mb|gb|kb|Mi|Gi|Ki)", quantity)
    assert match, quantity
    return int(match[1]) * units[match[2]]


@pytest.mark.parametrize("name", MODEL_DEPLOYMENTS)
def test_each_models_inference_has_a_disruption_budget_and_an_autoscaler_of_its_own(objects, name):
    pod_labels = workload(objects, name)["spec"]["template"]["metadata"]["labels"]
    pdb = find(objects, "PodDisruptionBudget", name)["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    # Its own pods only: another model's replicas neither count toward its budget nor its spread.
    for other in (o for o in MODEL_DEPLOYMENTS if o != name):
        other_labels = workload(objects, other)["spec"]["template"]["metadata"]["labels"]
        assert not pdb["selector"]["matchLabels"].items() <= other_labels.items(), other
        assert not find(objects, "Service", name)["spec"]["selector"].items() <= other_labels.items(), other
        for spread in workload(objects, name)["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
            assert not spread["labelSelector"]["matchLabels"].items() <= other_labels.items(), other
    hpa = find(objects, "HorizontalPodAutoscaler", name)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    # The autoscaler owns the count: a replicas field would reset it at every apply.
    assert "replicas" not in workload(objects, name)["spec"]
    # A PodDisruptionBudget that allows no disruption would block every node drain.
    assert pdb.get("maxUnavailable", 1) >= 1
    if "minAvailable" in pdb:
        assert pdb["minAvailable"] < hpa["spec"]["minReplicas"]


def test_the_quota_split_follows_the_gateway_replicas(objects):
    env = env_of(container(objects, "gateway"))
    assert int(env["NLPMESH_GATEWAY_QUOTA_REPLICAS"]["value"]) == workload(objects, "gateway")["spec"]["replicas"]


# --- trust: certificates, API keys, Redis users -----------------------------------------

def test_each_service_gets_its_own_certificate_the_ca_and_the_probes_never_the_ca_key(objects, tmp_path):
    init_certs(tmp_path)  # what `nlpmesh certs init` makes: the Secret's keys
    for name, kind in DEPLOYMENTS.items():  # every model's inference pods: the inference certificate
        folder = env_of(container(objects, name))[TLS_DIR_ENV]["value"]
        volume = mounts(objects, name)[folder]
        assert volume["secret"]["secretName"] == "nlpmesh-certs"
        items = {i["key"]: i["path"] for i in volume["secret"]["items"]}
        wanted = [CA_FILE, f"{kind}.crt", f"{kind}.key", f"{PROBE}.crt", f"{PROBE}.key"]
        assert items == {k: k for k in wanted}, name
        assert all((tmp_path / key).is_file() for key in items)
        assert volume["secret"]["defaultMode"] == 0o400


def test_the_gateway_reads_its_api_keys_from_a_secret_folder(objects):
    keys_file = PurePosixPath(env_of(container(objects, "gateway"))["NLPMESH_GATEWAY_AUTH_KEYS_FILE"]["value"])
    volume = mounts(objects, "gateway")[str(keys_file.parent)]
    assert volume["secret"]["secretName"] == "nlpmesh-api-keys"
    assert {i["path"] for i in volume["secret"]["items"]} == {keys_file.name}
    subpaths = [m for m in container(objects, "gateway")["volumeMounts"] if m.get("subPath")]
    assert subpaths == []  # a subPath mount never sees a rotated file


def test_redis_users_and_passwords_are_those_nlpmesh_redis_acl_makes(objects, tmp_path):
    acl, env_file = redis_acl.write(tmp_path, redis_acl.RedisUsers.make(), "redis", 6379)
    env_keys = {line.split("=", 1)[0] for line in env_file.read_text().splitlines()
                if "=" in line and not line.startswith("#")}
    users = {}
    for name, kind in DEPLOYMENTS.items():
        env = env_of(container(objects, name))
        if "REDIS_URL" not in env:
            continue
        match = re.fullmatch(r"rediss://(\w+):\$\((\w+)\)@redis:6379/0\?ssl_ca_certs=/etc/nlpmesh/certs/ca\.crt",
                             env["REDIS_URL"]["value"])
        assert match, f"{name}: REDIS_URL must take its password from the Secret, not hold one"
        assert users.setdefault(kind, match[1]) == match[1], f"{name}: another Redis user than its service's"
        assert match[2] == redis_acl.password_env(match[1]) and match[2] in env_keys
    # One Redis user per service (every model's inference shares one), named after it, as in docker-compose.yml.
    assert users == {user: user for user in redis_acl.SERVICE_USERS}
    volume = mounts(objects, "redis")["/etc/redis"]
    assert volume["secret"] == {"secretName": "nlpmesh-redis-acl", "items": [{"key": acl.name, "path": acl.name}]}
    args = container(objects, "redis")["args"]
    assert args[args.index("--aclfile") + 1] == f"/etc/redis/{acl.name}"


def test_the_readme_says_how_to_make_every_secret(objects):
    referenced = set()
    for obj in objects:
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        referenced |= {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
        referenced |= {e["valueFrom"]["secretKeyRef"]["name"] for c in containers_of(obj)
                       for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    assert referenced == SECRETS
    readme = README.read_text()
    for secret in SECRETS:
        assert f"kubectl create secret generic {secret}" in readme, secret


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl makes the Secrets (--dry-run=client)")
def test_the_readme_block_makes_the_secrets_the_base_mounts(objects, tmp_path):
    """README "Kubernetes"'s commands, run as written with the real nlpmesh tools and
    kubectl --dry-run=client (no cluster): the Secrets they make are those the base refers
    to, with every key it mounts, without the CA's key or Redis's admin password."""
    block = README.read_text().split(SECRETS_BLOCK_MARKER, 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    script = "\n".join([
        "set -euo pipefail",
        'kubectl() { case "$1" in',
        '  create) echo ---; command kubectl "$@" --dry-run=client -o yaml ;;',
        '  apply) [ "$*" = "apply -k deploy/k8s" ] || { echo "unexpected: kubectl $*" >&2; exit 3; } ;;',
        '  *) echo "unexpected: kubectl $*" >&2; exit 3 ;;',
        "esac; }",
        f'nlpmesh() {{ "{sys.executable}" -m cli.main "$@" >&2; }}',  # keys create prints the key
        block,
    ])
    path = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "gen"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "NLPMESH_HOME": str(tmp_path / "home"), "PYTHONPATH": path}
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    made = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    assert [(d["kind"], d["metadata"]["name"]) for d in made if d["kind"] == "Namespace"] == \
        [("Namespace", DEFAULT_NAMESPACE)]
    secrets = {d["metadata"]["name"]: set(d["data"]) for d in made if d["kind"] == "Secret"}
    assert set(secrets) == SECRETS
    for secret in (d for d in made if d["kind"] == "Secret"):
        assert secret["metadata"]["namespace"] == DEFAULT_NAMESPACE
        kubernetes_validate.validate(secret, KUBERNETES_VERSIONS[-1], strict=True)
    assert "ca.key" not in secrets["nlpmesh-certs"]
    assert secrets["nlpmesh-redis-users"] == {redis_acl.password_env(u) for u in redis_acl.SERVICE_USERS}
    for obj in objects:
        pod = obj.get("spec", {}).get("template", {}).get("spec", {})
        for volume in (v["secret"] for v in pod.get("volumes", []) if "secret" in v):
            assert {i["key"] for i in volume["items"]} <= secrets[volume["secretName"]], volume
        for ref in (e["valueFrom"]["secretKeyRef"] for c in containers_of(obj) for e in c.get("env", [])
                    if "secretKeyRef" in e.get("valueFrom", {})):
            assert ref["key"] in secrets[ref["name"]], ref


# --- the ConfigMaps -----------------------------------------------------------------------

def test_the_configmaps_hold_the_shipped_budgets_and_templates(objects):
    budgets = find(objects, "ConfigMap", "nlpmesh-budgets")["data"]
    assert budgets == {"budgets.toml": (REPO_ROOT / "deploy" / "budgets.toml").read_text()}, \
        "deploy/k8s/config is a stale copy: kustomization.yaml says how to refresh it"
    shipped = REPO_ROOT / "deploy" / "templates"
    templates = find(objects, "ConfigMap", "nlpmesh-templates")["data"]
    expected = {f"{p.parent.name}.{p.name}": p.read_text() for p in shipped.glob("*/*.toml")}
    assert templates == expected, "deploy/k8s/config or the generator's list differs from deploy/templates"


def test_the_mounted_templates_load_as_the_shipped_ones(objects, tmp_path):
    """The ConfigMap laid out as the kubelet does (a timestamped folder behind ..data links)
    is read by the template service's own loader as the same catalog as deploy/templates."""
    from services.template.catalog import TemplateCatalog

    env = env_of(container(objects, "template"))
    folder = env["NLPMESH_TEMPLATE_TEMPLATES_DIR"]["value"]
    volume = mounts(objects, "template")[folder]
    data = find(objects, "ConfigMap", volume["configMap"]["name"])["data"]
    root = kubelet_layout(tmp_path / "templates", data, volume["configMap"].get("items"))
    mounted = TemplateCatalog.from_dir(root).templates()
    shipped = TemplateCatalog.from_dir(REPO_ROOT / "deploy" / "templates").templates()
    assert [(t.id, t.version) for t in mounted] == [(t.id, t.version) for t in shipped]


def test_the_gateway_reads_the_mounted_budgets(objects, tmp_path):
    from gateway.budgets import BudgetPolicy

    path = PurePosixPath(env_of(container(objects, "gateway"))["NLPMESH_GATEWAY_BUDGETS_FILE"]["value"])
    volume = mounts(objects, "gateway")[str(path.parent)]
    data = find(objects, "ConfigMap", volume["configMap"]["name"])["data"]
    root = kubelet_layout(tmp_path / "budgets", data, volume["configMap"].get("items"))
    assert BudgetPolicy.load(root / path.name) == BudgetPolicy.load(REPO_ROOT / "deploy" / "budgets.toml")


# --- network policies ---------------------------------------------------------------------
# A reader of the NetworkPolicy features the base uses (matchLabels, named ports, peers by pod or namespace);
# anything else fails loudly rather than being read as "allowed".

OUTSIDE = "outside"  # a client out of the cluster, or in another namespace
MONITORING = "monitoring"  # a Prometheus pod in the namespace "monitoring"
_PEER_KEYS = {"podSelector", "namespaceSelector"}


def _selects(selector: dict, labels: dict) -> bool:
    if set(selector) - {"matchLabels"}:
        raise ValueError(f"this reader knows matchLabels only: {selector}")
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def _source(objects: list[dict], name: str) -> tuple[dict | None, dict]:
    """(its namespace's labels or None outside the cluster, its pod's labels)."""
    if name == OUTSIDE:
        return None, {}
    if name == MONITORING:
        return {"kubernetes.io/metadata.name": "monitoring"}, {"app.kubernetes.io/name": "prometheus"}
    return {"kubernetes.io/metadata.name": DEFAULT_NAMESPACE}, _pod_labels(workload(objects, name))


def _pod_labels(obj: dict) -> dict:
    return obj["spec"]["template"]["metadata"]["labels"]


def _peer_matches(peer: dict, namespace: dict | None, pod: dict) -> bool:
    if set(peer) - _PEER_KEYS or not peer:
        raise ValueError(f"this reader knows podSelector and namespaceSelector peers only: {peer}")
    if namespace is None:
        return False  # a selector names pods of the cluster only
    in_namespace = (_selects(peer["namespaceSelector"], namespace) if "namespaceSelector" in peer
                    else namespace.get("kubernetes.io/metadata.name") == DEFAULT_NAMESPACE)
    return in_namespace and _selects(peer.get("podSelector", {}), pod)


def allowed(objects: list[dict], source: str, target: str, port: str) -> bool:
    """Whether ``source`` may connect to ``target``'s container port named ``port``, as Kubernetes reads the
    base's NetworkPolicies (a pod no policy selects for ingress takes every connection)."""
    namespace, pod = _source(objects, source)
    labels = _pod_labels(workload(objects, target))
    policies = [p for p in objects if p["kind"] == "NetworkPolicy" and _selects(p["spec"]["podSelector"], labels)
                and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not policies:
        return True
    for rule in (rule for policy in policies for rule in policy["spec"].get("ingress", [])):
        ports = rule.get("ports")
        if ports is not None and not any(p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in ports):
            continue
        if "from" not in rule or any(_peer_matches(peer, namespace, pod) for peer in rule["from"]):
            return True
    return False


def callers(objects: list[dict]) -> dict[str, set[str]]:
    """Each workload's callers in the base: the workloads whose environment names one of its Services
    (``dns:///template:50052``, ``...@redis:6379/0``, ``model=dns:///inference-gemma3:50055``)."""
    services = {obj["metadata"]["name"]: obj["spec"]["selector"] for obj in objects if obj["kind"] == "Service"
                and "selector" in obj["spec"]}
    workloads = [obj["metadata"]["name"] for obj in objects if obj["kind"] in ("Deployment", "StatefulSet")]
    found: dict[str, set[str]] = {name: set() for name in workloads}
    for caller in workloads:
        values = " ".join(str(e.get("value", "")) for c in containers_of(workload(objects, caller))
                          for e in c.get("env", []))
        for service, selector in services.items():
            if re.search(rf"(^|[/@=,\s]){re.escape(service)}:\d+", values):
                for target in workloads:
                    if target != caller and _selects({"matchLabels": selector}, _pod_labels(workload(objects, target))):
                        found[target].add(caller)
    return found


def policy_problems(objects: list[dict]) -> list[str]:
    """Every (source, target, port) the policies decide otherwise than "the gateway's gRPC from anywhere, each
    service from its callers only, metrics from monitoring only"."""
    who_calls = callers(objects)
    sources = [*who_calls, OUTSIDE, MONITORING]
    problems = []
    for target, its_callers in who_calls.items():
        for port in (p["name"] for c in containers_of(workload(objects, target)) for p in c.get("ports", [])):
            for source in sources:
                if port == "metrics":
                    expected = source == MONITORING
                elif PUBLIC.get(target) == port:
                    expected = True
                else:
                    expected = source in its_callers
                if allowed(objects, source, target, port) != expected:
                    problems.append(f"{source} -> {target}:{port} {'refused' if expected else 'allowed'}")
    return problems


def test_only_the_gateway_and_the_edge_are_reachable_from_outside_redis_only_from_its_users_and_metrics_from_monitoring(
        objects):
    who_calls = callers(objects)
    assert who_calls["gateway"] == {"edge"}  # read from NLPMESH_EDGE_GATEWAY_ADDR
    assert allowed(objects, "edge", "gateway", "grpc") and allowed(objects, OUTSIDE, "edge", "http")
    assert not allowed(objects, "edge", "template", "grpc")
    assert who_calls["redis"] == {"gateway", "cache", *MODEL_DEPLOYMENTS}  # read from the REDIS_URLs
    assert who_calls["template"] == {"gateway"} and who_calls[DEFAULT_INFERENCE] == {"gateway"}
    assert policy_problems(objects) == []


@pytest.mark.parametrize("change", ["no default deny", "redis open to every pod", "metrics from anywhere",
                                    "an internal service from outside", "the edge from the gateway only"])
def test_a_policy_too_open_or_too_closed_is_found(objects, change):
    edited = copy.deepcopy(objects)
    policy = {p["metadata"]["name"]: p for p in edited if p["kind"] == "NetworkPolicy"}
    if change == "no default deny":
        edited.remove(policy["default-deny-ingress"])
        edited.remove(policy["metrics-from-monitoring"])
    elif change == "redis open to every pod":
        policy["redis-from-its-users"]["spec"]["ingress"][0]["from"] = [{"podSelector": {}}]
    elif change == "metrics from anywhere":
        del policy["metrics-from-monitoring"]["spec"]["ingress"][0]["from"]
    elif change == "the edge from the gateway only":
        policy["edge-http-from-anywhere"]["spec"]["ingress"][0]["from"] = [
            {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "gateway"}}}]
    elif change == "an internal service from outside":
        del policy["tokenizer-grpc-from-gateway"]["spec"]["ingress"][0]["from"]
    assert policy_problems(edited) != []
