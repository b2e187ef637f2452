"""The gateway's service configs (round_robin, client-side health checks, retry policy) and its address lists."""
import json

import pytest

from gateway import balancing
from gateway.capacity import CapacityGate, CapacitySettings
from meshkit.errors import ResourceExhausted
from meshkit.wire import InferenceLoad


@pytest.mark.parametrize("service", [balancing.TEMPLATE_SERVICE, balancing.TOKENIZER_SERVICE,
                                     balancing.CACHE_SERVICE, balancing.INFERENCE_SERVICE])
def test_every_channel_balances_round_robin_over_replicas_its_health_check_calls_serving(service):
    config = json.loads(balancing.service_config(service))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": service}


def test_the_idempotent_calls_retry_on_unavailable_only_three_attempts_at_most_with_throttling():
    expected = {
        balancing.TEMPLATE_SERVICE: {"Render", "ListTemplates"},
        balancing.TOKENIZER_SERVICE: {"EncodeChat", "CountChat", "Decode"},
        balancing.CACHE_SERVICE: {"Lookup", "Store"},
    }
    for service, methods in expected.items():
        config = json.loads(balancing.service_config(service))
        (method_config,) = config["methodConfig"]
        assert {n["method"] for n in method_config["name"]} == methods
        assert {n["service"] for n in method_config["name"]} == {service}
        policy = method_config["retryPolicy"]
        assert policy["maxAttempts"] == 3
        assert policy["retryableStatusCodes"] == ["UNAVAILABLE"]
        assert "timeout" not in method_config  # the call's own deadline (the hop's) bounds every attempt
        assert config["retryThrottling"]["maxTokens"] > 0 and 0 < config["retryThrottling"]["tokenRatio"] <= 1


def test_inference_is_never_retried_by_grpc_the_gateway_decides_before_the_first_token():
    config = json.loads(balancing.service_config(balancing.INFERENCE_SERVICE))
    assert "methodConfig" not in config and "retryThrottling" not in config


@pytest.mark.parametrize("address, target", [
    ("127.0.0.1:50055", "127.0.0.1:50055"),
    ("inference:50055", "inference:50055"),
    ("dns:///inference:50055", "dns:///inference:50055"),
    ("127.0.0.1:50055,127.0.0.1:50065", "ipv4:127.0.0.1:50055,127.0.0.1:50065"),
    (" 127.0.0.1:50055 , 10.0.0.2:50055 ", "ipv4:127.0.0.1:50055,10.0.0.2:50055"),
    ("[::1]:50055,[::1]:50065", "ipv6:[::1]:50055,[::1]:50065"),
    ("ipv4:127.0.0.1:50055,127.0.0.1:50065", "ipv4:127.0.0.1:50055,127.0.0.1:50065"),
])
def test_an_address_list_becomes_one_grpc_target(address, target):
    assert balancing.grpc_target(address) == target


@pytest.mark.parametrize("address, why", [
    ("inference-a:50055,inference-b:50055", "dns:///"),
    ("127.0.0.1:50055,[::1]:50065", "mixes"),
    ("127.0.0.1:50055,", "empty endpoint"),
    ("127.0.0.1,127.0.0.2", "host:port"),
    ("", "empty"),
    (",".join(f"127.0.0.1:{50000 + i}" for i in range(balancing.MAX_ENDPOINTS + 1)), "at most"),
])
def test_an_address_that_cannot_be_one_target_is_refused_at_start_saying_why(address, why):
    with pytest.raises(ValueError, match=why):
        balancing.grpc_target(address)


def test_endpoints_lists_each_replica_of_an_address():
    assert balancing.endpoints("ipv4:127.0.0.1:1,127.0.0.1:2") == ["127.0.0.1:1", "127.0.0.1:2"]
    assert balancing.endpoints("dns:///inference:50055") == ["dns:///inference:50055"]


def test_admission_sums_the_capacity_of_the_replicas_and_refuses_only_when_every_one_is_full():
    now = [100.0]
    gate = CapacityGate(CapacitySettings(full_hold_s=0.5), clock=lambda: now[0])
    gate.observe(InferenceLoad(2, 2, "a"))
    gate.observe(InferenceLoad(0, 2, "b"))
    assert gate.limit == 4
    with gate.generation():  # a is full, b has room: admitted
        pass
    gate.observe(InferenceLoad(2, 2, "b"))
    with pytest.raises(ResourceExhausted, match="full \\(4 of 4"), gate.generation():
        pass
    now[0] += 60  # a and b not heard from for long: forgotten but the newest
    gate.observe(InferenceLoad(0, 2, "c"))
    assert gate.limit == 2


def test_a_load_report_names_its_replica_and_equal_loads_compare_equal_whoever_reported():
    load = InferenceLoad.from_metadata(InferenceLoad(1, 4, "3f2a9c").to_metadata())
    assert load == InferenceLoad(1, 4) and load.replica == "3f2a9c"
    assert InferenceLoad.from_metadata([("x-nlpmesh-inference-load", "1/4"),
                                        ("x-nlpmesh-inference-replica", "NOT valid!")]).replica == ""


def test_a_dns_address_names_the_host_prefix_affine_routing_follows():
    assert balancing.dns_name("dns:///inference:50055") == ("inference", 50055)
    assert balancing.dns_name("dns:inference:50055") == ("inference", 50055)
    assert balancing.dns_name("dns://10.0.0.2:53/inference.ns.svc:50055") == ("inference.ns.svc", 50055)
    assert balancing.dns_name("127.0.0.1:50055") is None
    assert balancing.endpoint_of("::1", 5) == "[::1]:5" and balancing.endpoint_of("10.0.0.1", 5) == "10.0.0.1:5"
    with pytest.raises(ValueError, match="dns:///host:port"):
        balancing.dns_name("dns:///inference")
