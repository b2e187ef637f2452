"""Two inference replicas behind one gateway: real processes, a private Redis, the real model.

The mesh runs as `nlpmesh up --scale inference=2` runs it (supervised: a process that exits is
restarted). The gateway reaches the replicas through one ``ipv4:`` address list, balanced by
gRPC's round_robin with client-side health checks (gateway/balancing.py). Each
replica serves its own /metrics, which tells which one did the work. Every loop is bounded
in calls and time; the figures measured are printed with a ``[replicas]`` prefix.
"""
from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request

import grpc
import pytest
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from bench.variants import spawn_gateway
from cli.launcher import LocalMesh, check_health
from cli.restarts import RestartPolicy
from tests.budget_policy import ENV as BUDGETS_ENV
from tests.budget_policy import roomy_budgets
from tests.e2e.streams import OK, Load, codes, failed, finance_request, stream_once
from tests.polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.model]

C = grpc.StatusCode
REPLICAS = ("inference", "inference-2")
# Capacity 4 per replica; a drain long enough for any stream these tests start.
MESH_ENV = {"NLPMESH_INFERENCE_MAX_RUNNING": "2", "NLPMESH_INFERENCE_MAX_QUEUE": "2",
            "NLPMESH_INFERENCE_GRACE_S": "60",
            # gRPC's round_robin across the replicas (prefix-affine routing: a gateway of its own).
            "NLPMESH_GATEWAY_INFERENCE_ROUTING": "round_robin",
            # A template or tokenizer hop over its shipped 100 ms while replicas decode is not what these test.
            BUDGETS_ENV: str(roomy_budgets())}
FINISHED = "nlpmesh_inference_requests_finished_total"
LOCAL_REUSE = 'nlpmesh_inference_prefix_tokens_reused_total{tier="local"}'
PREFILLED = "nlpmesh_inference_prefill_tokens_total"  # counted at each prefill
ACTIVE = "nlpmesh_inference_active_sequences"
FIRST_TOKENS = "nlpmesh_inference_time_to_first_token_seconds_count"  # streams that sent a first token
CLIENT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 2000)]
RESTART_S = 180.0  # the model loads again


def say(line: str) -> None:
    print(f"[replicas] {line}", flush=True)


@pytest.fixture(scope="module")
def replica_mesh(tmp_path_factory):
    local = LocalMesh(tmp_path_factory.mktemp("replicas"), free_ports=True, redis_url=None, extra_env=MESH_ENV,
                      restart=RestartPolicy(), scale={"inference": 2},
                      progress=lambda line: print(f"[mesh] {line}", flush=True))
    try:
        local.start(ready_timeout_s=300)
        local.supervise_in_background()
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def channel(replica_mesh):
    with grpc.insecure_channel(replica_mesh.gateway_address, options=CLIENT_OPTIONS) as opened:
        yield opened


@pytest.fixture(scope="module")
def gateway(channel):
    return gateway_pb2_grpc.GatewayStub(channel)


def metric(mesh: LocalMesh, name: str, sample: str) -> float:
    with urllib.request.urlopen(mesh.metrics_url(name), timeout=5) as reply:
        families = text_string_to_metric_families(reply.read().decode())
    return sum(s.value for family in families for s in family.samples if s.name == sample)


def metric_while_up(mesh: LocalMesh, name: str, sample: str, process) -> float | None:
    """``process``'s metric, or None once it has exited: the launcher restarts a replica that
    exits, and what answers on its port then is another process."""
    if process.poll() is not None:
        return None
    try:
        value = metric(mesh, name, sample)
    except OSError:  # refused or reset: it is exiting, or has
        process.wait(timeout=10)
        return None
    return value if process.poll() is None else None


def streaming_on(mesh: LocalMesh, name: str) -> bool:
    """A stream on ``name`` has sent its first token and not ended (one scrape, so the counters agree)."""
    with urllib.request.urlopen(mesh.metrics_url(name), timeout=5) as reply:
        families = list(text_string_to_metric_families(reply.read().decode()))
    first_tokens = sum(s.value for f in families for s in f.samples if s.name == FIRST_TOKENS)
    ended = sum(s.value for f in families for s in f.samples if s.name == FINISHED)
    return first_tokens > ended


def per_replica(mesh: LocalMesh, sample: str) -> dict[str, float]:
    """``sample`` on each replica; ``name{label="value"}`` picks one label's series."""
    name, _, label = sample.partition("{")
    if not label:
        return {replica: metric(mesh, replica, sample) for replica in REPLICAS}
    key, _, value = label.rstrip("}").partition("=")
    return {replica: labelled(mesh, replica, name, key, value.strip('"')) for replica in REPLICAS}


def labelled(mesh: LocalMesh, replica: str, name: str, key: str, value: str) -> float:
    with urllib.request.urlopen(mesh.metrics_url(replica), timeout=5) as reply:
        families = text_string_to_metric_families(reply.read().decode())
    return sum(s.value for f in families for s in f.samples if s.name == name and s.labels.get(key) == value)


def both_serving(mesh: LocalMesh) -> None:
    """Both replicas SERVING, and each taking calls again (bounded): the state every test starts from."""
    for name in REPLICAS:
        wait_until(lambda name=name: check_health(mesh.address(name), 0.5) == "SERVING", RESTART_S, 0.25,
                   what=f"{name} SERVING")


def test_the_gateway_splits_20_requests_between_the_two_replicas(replica_mesh, gateway):
    both_serving(replica_mesh)
    before = per_replica(replica_mesh, FINISHED)
    for _ in range(20):
        assert gateway.Generate(finance_request(2), timeout=60).text
    after = per_replica(replica_mesh, FINISHED)
    served = {name: after[name] - before[name] for name in REPLICAS}
    say(f"20 requests: {served}")
    assert sum(served.values()) == 20
    assert all(count >= 5 for count in served.values()), served  # round_robin: 10 each when nothing else runs


def test_a_prefix_affine_gateway_sends_prompts_sharing_a_first_block_to_one_replica_whose_local_tier_hits(
        replica_mesh):
    both_serving(replica_mesh)
    process, address = spawn_gateway(replica_mesh, {"NLPMESH_GATEWAY_INFERENCE_ROUTING": "prefix"})
    system = "Desk 7f: you are the assistant of a bond trading team. Answer in one short sentence, plainly."
    try:
        with grpc.insecure_channel(address) as affine_channel:
            affine = gateway_pb2_grpc.GatewayStub(affine_channel)
            before = per_replica(replica_mesh, FINISHED)
            reused = per_replica(replica_mesh, LOCAL_REUSE)
            for index in range(8):
                request = gateway_pb2.GenerateRequest(
                    chat=gateway_pb2.Chat(messages=[gateway_pb2.ChatMessage(role="system", content=system),
                                                    gateway_pb2.ChatMessage(role="user", content=f"Question {index}?")]),
                    sampling=gateway_pb2.SamplingParams(max_new_tokens=2), cache_mode=gateway_pb2.CACHE_MODE_BYPASS)
                assert affine.Generate(request, timeout=60).text
            served = {n: v - before[n] for n, v in per_replica(replica_mesh, FINISHED).items()}
            hits = {n: v - reused[n] for n, v in per_replica(replica_mesh, LOCAL_REUSE).items()}
    finally:
        process.terminate()
        process.wait(timeout=10)
    say(f"prefix-affine, 8 prompts sharing a system prompt: served {served}, local prefix tokens reused {hits}")
    owner = max(served, key=served.get)
    assert served[owner] == 8  # one after another: the owner is never over its load bound
    assert hits[owner] >= 7 * 16  # from the second on, at least the first block came from its own tier


def test_a_draining_replica_takes_no_new_calls_and_finishes_its_streams(replica_mesh, gateway):
    both_serving(replica_mesh)
    victim = replica_mesh.processes["inference-2"]
    first_tokens_before = sum(per_replica(replica_mesh, FIRST_TOKENS).values())
    # Long streams, one after another, until one is under way on the victim (bounded).
    streams, outcomes = [], []

    def long_stream() -> None:
        outcomes.append(stream_once(gateway, finance_request(96), 120))

    def on_the_victim() -> bool:  # one more long stream each try, until one is under way there
        if metric(replica_mesh, "inference-2", ACTIVE) > 0:
            return True
        streams.append(threading.Thread(target=long_stream, daemon=True))
        streams[-1].start()
        return False

    wait_until(on_the_victim, 60, 0.3, what="a long stream under way on inference-2")
    # Every long stream has its first token (so its prefill is done, on whichever replica, queued ones
    # included: a drain still prefills the streams it queued before it began) before the count is read.
    wait_until(lambda: sum(per_replica(replica_mesh, FIRST_TOKENS).values()) - first_tokens_before >= len(streams),
               90, 0.1, what="a first token on every long stream")
    prefilled = metric(replica_mesh, "inference-2", PREFILLED)
    os.kill(victim.pid, signal.SIGTERM)
    drained_at = time.monotonic()
    # Draining from here: its health says NOT_SERVING (or it refuses new calls), which the gateway watches.
    wait_until(lambda: check_health(replica_mesh.address("inference-2"), 0.5) != "SERVING", 10, 0.02,
               what="inference-2 draining")
    new, checks = [], 0
    for _ in range(6):  # new calls while it drains; after each, while it is still up, its prefill count
        new.append(stream_once(gateway, finance_request(2), 60))
        prefilled_since = metric_while_up(replica_mesh, "inference-2", PREFILLED, victim)
        if prefilled_since is not None:
            checks += 1
            assert prefilled_since == prefilled, "a draining replica prefilled a new call"
    for thread in streams:
        thread.join(timeout=150)
    say(f"drain: {len(streams)} long streams {codes(outcomes)}, 6 new calls {codes(new)}; "
        f"the victim's prefill count checked unchanged after {checks} of them, "
        f"the victim exited {'after' if victim.poll() is not None else 'not yet after'} "
        f"{time.monotonic() - drained_at:.1f}s (code {victim.poll()})")
    assert all(o.code == OK for o in new), codes(new)
    assert len(outcomes) == len(streams) and all(o.code == OK for o in outcomes), codes(outcomes)
    wait_until(lambda: victim.poll() is not None, 60, 0.2, what="the drained replica to exit")
    assert victim.returncode == 0  # drained and stopped, not killed
    assert "inference draining" in replica_mesh.log_tail("inference-2", 40)


def test_sigkill_of_a_replica_under_load_fails_only_streams_under_way_and_it_takes_traffic_when_back(
        replica_mesh, channel, gateway):
    both_serving(replica_mesh)
    gateway_pid = replica_mesh.processes["gateway"].pid
    victim = replica_mesh.processes["inference-2"]
    with Load(channel, workers=3, max_new_tokens=24, timeout_s=60, max_calls=30, max_s=120) as load:
        wait_until(lambda: streaming_on(replica_mesh, "inference-2"), 60, 0.02,
                   what="a stream under way on inference-2, past its first token")
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        load.wait_for_calls(len(load.outcomes) + 6, timeout_s=60)  # calls after the kill
        load.stop()
    outcomes = list(load.outcomes)
    before_token = [o for o in outcomes if o.chunks == 0]
    under_way = [o for o in outcomes if o.chunks > 0 and o.code != OK]
    after = [o for o in outcomes if o.started > killed_at + 1.0]
    say(f"SIGKILL under load: {codes(outcomes)}; before a token {codes(before_token)}, "
        f"failed under way {codes(under_way)}, started after the kill {codes(after)}")
    # Retried on the survivor. A template or tokenizer hop over its 100 ms budget on this loaded machine
    # is no failure of the kill's making (tests/e2e/test_chaos.py allows the same).
    assert all(o.code == OK or (o.code == C.DEADLINE_EXCEEDED and o.hop in ("template", "tokenizer"))
               for o in before_token), [(o.code.name, o.hop) for o in before_token if o.code != OK]
    assert under_way and all(o.code == C.UNAVAILABLE for o in under_way), codes(under_way)
    assert after and all(o.code == OK or (o.code == C.DEADLINE_EXCEEDED and o.hop in ("template", "tokenizer"))
                         for o in after), codes(after)

    wait_until(lambda: replica_mesh.processes["inference-2"] is not victim, 15, 0.1, what="inference-2 restarted")
    wait_until(lambda: check_health(replica_mesh.address("inference-2"), 0.5) == "SERVING", RESTART_S, 0.25,
               what="inference-2 SERVING after its restart")
    back_s = time.monotonic() - killed_at

    def takes_traffic() -> bool:
        for _ in range(4):
            try:
                assert gateway.Generate(finance_request(2), timeout=60).text
            except grpc.RpcError as error:  # the machine's load, as above; anything else fails the test
                outcome = failed(error, time.monotonic(), 0.0)
                assert outcome.code == C.DEADLINE_EXCEEDED and outcome.hop in ("template", "tokenizer"), outcome
        return metric(replica_mesh, "inference-2", FINISHED) > 0  # a new process: its counters start at 0

    wait_until(takes_traffic, 30, 0.1, what="the restarted replica to take calls")
    assert replica_mesh.processes["gateway"].pid == gateway_pid  # no gateway restart
    say(f"inference-2 back and taking calls {time.monotonic() - killed_at:.1f}s after the kill "
        f"(SERVING after {back_s:.1f}s); the gateway never restarted")
