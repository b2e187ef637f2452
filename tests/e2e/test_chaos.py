"""Chaos: the mesh under load while its processes are killed, stopped, drained, flooded and fed garbage.

One mesh for the whole file (real processes, a private Redis, the real model), supervised as
`nlpmesh up` supervises it: a process that exits is restarted with backoff. Its inference
service is small (2 running + 2 queued: capacity 4) so that an overload costs little. Each
case asserts the statuses callers saw (never UNKNOWN or INTERNAL), bounds on time generous
enough for a loaded 2-core machine, and that a normal request succeeds afterwards, which
leaves the mesh healthy for the next case. The figures each case measured are printed
(``pytest -s`` shows them) with a ``[chaos]`` prefix.
"""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import grpc
import pytest
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from cli.launcher import LocalMesh, check_health
from cli.restarts import RestartPolicy
from meshkit.percentile import percentile
from tests.e2e.streams import OK, Load, Outcome, cancel_points, codes, finance_request, seconds_summary, stream_once
from tests.polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.model]

C = grpc.StatusCode
INTERNAL_SERVICES = ("template", "tokenizer", "cache", "inference")
SERVICES = ("gateway", *INTERNAL_SERVICES)
CAPACITY = 4  # max_running + max_queue below
MESH_ENV = {"NLPMESH_INFERENCE_MAX_RUNNING": "2", "NLPMESH_INFERENCE_MAX_QUEUE": "2"}
# A hop that is down fails a generation; the cache service is off the caller's path (a lookup
# is the gateway's own, a store happens after the answer), so without it calls succeed, but
# for a hop budget (100 ms for template and tokenizer) that a loaded machine overran on its own
# (see assert_off_the_path).
WHEN_DOWN = {"template": {OK, C.UNAVAILABLE, C.DEADLINE_EXCEEDED},
             "tokenizer": {OK, C.UNAVAILABLE, C.DEADLINE_EXCEEDED},
             "inference": {OK, C.UNAVAILABLE, C.DEADLINE_EXCEEDED},
             "cache": {OK, C.DEADLINE_EXCEEDED}}
GENERATION_HOPS = {"template", "tokenizer", "inference.ttft", "inference"}
# The model loads again after an inference restart.
RECOVERY_S = {"template": 60.0, "tokenizer": 60.0, "cache": 60.0, "gateway": 90.0, "inference": 180.0}
RETRY_FOR_S = 30.0  # how long a refused storm caller keeps trying before its refusal counts
CLIENT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 250), ("grpc.max_reconnect_backoff_ms", 2000)]


def say(line: str) -> None:
    print(f"[chaos] {line}", flush=True)


@pytest.fixture(scope="module")
def chaos_mesh(tmp_path_factory):
    local = LocalMesh(tmp_path_factory.mktemp("chaos"), free_ports=True, redis_url=None, extra_env=MESH_ENV,
                      restart=RestartPolicy(), progress=lambda line: print(f"[mesh] {line}", flush=True))
    try:
        local.start(ready_timeout_s=300)
        local.supervise_in_background()
        yield local
    finally:
        for process in local.processes.values():  # none may stay stopped while the mesh stops
            _signal(process, signal.SIGCONT)
        local.stop()


@pytest.fixture(scope="module")
def channel(chaos_mesh):
    with grpc.insecure_channel(chaos_mesh.gateway_address, options=CLIENT_OPTIONS) as opened:
        yield opened


@pytest.fixture(scope="module")
def gateway(channel):
    return gateway_pb2_grpc.GatewayStub(channel)


def _signal(process: subprocess.Popen, sig: int) -> None:
    if process.poll() is None:
        os.kill(process.pid, sig)


def assert_codes(outcomes: list[Outcome], allowed: set[grpc.StatusCode]) -> None:
    seen = {o.code for o in outcomes}
    assert C.UNKNOWN not in seen and C.INTERNAL not in seen, codes(outcomes)
    assert seen <= allowed, f"{codes(outcomes)}; allowed: {sorted(c.name for c in allowed)}"


def assert_off_the_path(outcomes: list[Outcome]) -> None:
    """With the cache service or Redis down, no call fails for it: a failure is a generation hop's
    budget overrun (the machine's load), never UNAVAILABLE and never the cache hop."""
    assert_codes(outcomes, {OK, C.DEADLINE_EXCEEDED})
    hops = {o.hop for o in outcomes if o.code != OK}
    assert hops <= GENERATION_HOPS, hops
    assert sum(o.code != OK for o in outcomes) <= len(outcomes) // 4, codes(outcomes)


def answered_again(gateway, timeout_s: float) -> float:
    """Seconds until a normal generation succeeds (polled, bounded)."""
    started = time.monotonic()

    def answered() -> bool:
        try:
            return bool(gateway.Generate(finance_request(4), timeout=15).text)
        except grpc.RpcError:
            return False

    wait_until(answered, timeout_s, 0.5, what="a normal request to succeed again")
    return time.monotonic() - started


def restarted(mesh: LocalMesh, name: str, old: subprocess.Popen, timeout_s: float) -> float:
    """Seconds until the launcher has started ``name`` again and it answers SERVING (bounded)."""
    started = time.monotonic()
    wait_until(lambda: mesh.processes[name] is not old, 15, 0.1, what=f"{name} restarted by the launcher")
    wait_until(lambda: check_health(mesh.address(name), 0.5) == "SERVING", timeout_s, 0.25,
               what=f"{name} SERVING after its restart")
    return time.monotonic() - started


def metric(mesh: LocalMesh, service: str, name: str) -> float:
    with urllib.request.urlopen(mesh.metrics_url(service), timeout=5) as reply:
        families = text_string_to_metric_families(reply.read().decode())
    return sum(s.value for family in families for s in family.samples if s.name == name)


# --- garbage on every port: first, while nothing else is going on -------------------------------

HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _frame(kind: int, flags: int, stream: int, payload: bytes, length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return size.to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def garbage_payloads(seed: int) -> dict[str, bytes]:
    noise = random.Random(seed)

    def rand(n: int) -> bytes:
        return bytes(noise.getrandbits(8) for _ in range(n))

    settings = _frame(0x4, 0, 0, b"")
    return {
        "random 64 KiB": rand(64 * 1024),
        "random 7 bytes": rand(7),
        "http/1.1 request": b"GET /metrics HTTP/1.1\r\nHost: \xff\xfe\r\nContent-Length: -1\r\n\r\n" + rand(100),
        "tls client hello on plaintext": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rand(500),
        "preface then random": HTTP2_PREFACE + rand(4096),
        "headers with broken hpack": HTTP2_PREFACE + settings + _frame(0x1, 0x5, 1, rand(200)),
        "frame claiming 16 MiB": HTTP2_PREFACE + settings + _frame(0x0, 0, 1, rand(100), length=0xFFFFFF),
        "headers on stream 0": HTTP2_PREFACE + settings + _frame(0x1, 0x5, 0, b"\x82\x86\x84"),
        "window update of 0": HTTP2_PREFACE + settings + _frame(0x8, 0, 0, b"\x00\x00\x00\x00"),
        "settings of a bad length": HTTP2_PREFACE + _frame(0x4, 0, 0, rand(7)),
        "preface cut short": HTTP2_PREFACE[:10],
    }


def send_garbage(port: int, payload: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):  # until the server closes, or the timeout
                pass
        except OSError:
            pass  # a reset is a fine answer to garbage


def test_garbage_on_every_port_leaves_every_process_up(chaos_mesh, gateway):
    pids = {name: process.pid for name, process in chaos_mesh.processes.items()}
    ports = {**{f"{n} grpc": chaos_mesh.ports[n] for n in (*SERVICES, "embedding")},
             **{f"{n} metrics": chaos_mesh.metrics_ports[n] for n in (*SERVICES, "edge", "embedding")},
             "edge http": chaos_mesh.ports["edge"]}
    payloads = garbage_payloads(seed=10)
    started = time.monotonic()
    for port in ports.values():
        for payload in payloads.values():
            send_garbage(port, payload)
    took = time.monotonic() - started
    for name, process in chaos_mesh.processes.items():
        assert process.poll() is None and process.pid == pids[name], f"{name} did not survive the garbage"
        assert chaos_mesh.health(name, 5.0, None) == "SERVING", name
        with urllib.request.urlopen(chaos_mesh.metrics_url(name), timeout=5) as page:
            assert page.status == 200, f"{name}'s /metrics"
    recovered = answered_again(gateway, 30)
    say(f"garbage: {len(payloads)} payloads x {len(ports)} ports in {took:.1f}s; every process up, "
        f"a request answered {recovered:.2f}s after")


# --- overload and cancellation -------------------------------------------------------------------

def concurrent_streams(gateway, count: int, max_new_tokens: int, timeout_s: float) -> list[Outcome]:
    """``count`` streams started together (a barrier), each with a question of its own."""
    outcomes: list[Outcome] = []
    barrier = threading.Barrier(count)

    def caller() -> None:
        request = finance_request(max_new_tokens)
        barrier.wait(timeout=30)
        outcomes.append(stream_once(gateway, request, timeout_s))

    threads = [threading.Thread(target=caller, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s + 35)
    assert len(outcomes) == count, "a stream never ended"
    return outcomes


def test_an_overload_of_ten_times_capacity_is_refused_quickly_with_retry_info(chaos_mesh, gateway):
    outcomes = concurrent_streams(gateway, 10 * CAPACITY, max_new_tokens=6, timeout_s=90)
    refused = [o for o in outcomes if o.code == C.RESOURCE_EXHAUSTED]
    served = [o for o in outcomes if o.code == OK]
    late = [o for o in outcomes if o.code == C.DEADLINE_EXCEEDED]
    say(f"overload {len(outcomes)} streams at once (capacity {CAPACITY}): {codes(outcomes)}; "
        f"reasons {sorted({o.reason for o in refused})}; time to refusal {seconds_summary(refused)}; "
        f"served {seconds_summary(served)}; deadlines on {sorted({o.hop for o in late})}")
    # DEADLINE_EXCEEDED: an admitted stream that overran a hop budget while the burst held the CPU.
    assert_codes(outcomes, {OK, C.RESOURCE_EXHAUSTED, C.DEADLINE_EXCEEDED})
    assert {o.hop for o in late} <= GENERATION_HOPS
    assert len(served) >= 2, codes(outcomes)
    assert len(refused) >= 5 * CAPACITY, codes(outcomes)  # most of the burst is shed, not queued
    assert all(o.retry_after_s and o.retry_after_s > 0 for o in refused), "a refusal without RetryInfo"
    assert all(o.reason in {"GATEWAY_AT_CAPACITY", "INFERENCE_AT_CAPACITY"} for o in refused)
    # Shed before any hop: a refusal takes no model time, however loaded the machine is.
    assert percentile([o.seconds for o in refused], 50) < 2.0 and max(o.seconds for o in refused) < 10.0
    answered_again(gateway, 30)


def test_a_storm_of_cancelled_streams_leaves_no_sequence_or_place_behind(chaos_mesh, gateway):
    """100 streams, each cancelled by its caller after a seeded random number of chunks or seconds.

    Four callers at a time (the capacity). A stream refused with RESOURCE_EXHAUSTED is tried
    again shortly (the gateway holds a report of a full inference for up to 0.5 s, and a
    cancelled call brings back no newer report), so that every one of the 100 runs. Retries are
    bounded in time, not count: a caller that backs off loses the race for a freed place to the
    three that start again at once, and on a loaded 2-core machine one lost 40 races in a row.
    """
    points = cancel_points(seed=7, count=100, max_chunks=8, max_s=1.5)
    outcomes: list[Outcome] = []
    refusals: list[Outcome] = []
    most_in_a_row = [0]
    lock = threading.Lock()
    work = iter(points)

    def caller() -> None:
        while True:
            with lock:
                point = next(work, None)
            if point is None:
                return
            chunks, seconds = point
            give_up = time.monotonic() + RETRY_FOR_S
            in_a_row = 0
            while True:
                outcome = stream_once(gateway, finance_request(16), 60, chunks, seconds)
                if outcome.code != C.RESOURCE_EXHAUSTED or time.monotonic() > give_up:
                    break
                refusals.append(outcome)
                in_a_row += 1
                time.sleep(0.1)  # a refused caller backs off before it retries: the storm's own pace
            with lock:
                outcomes.append(outcome)
                most_in_a_row[0] = max(most_in_a_row[0], in_a_row)

    started = time.monotonic()
    threads = [threading.Thread(target=caller, daemon=True) for _ in range(CAPACITY)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    storm_s = time.monotonic() - started
    say(f"cancel storm: {len(outcomes)} of {len(points)} streams ({CAPACITY} at a time) in {storm_s:.1f}s: "
        f"{codes(outcomes)}, chunks before the end p50 {percentile([o.chunks for o in outcomes], 50):.0f}; "
        f"{len(refusals)} refusals on the way ({sorted({o.reason for o in refusals})}), "
        f"at most {most_in_a_row[0]} in a row for one stream")
    assert len(outcomes) == len(points)
    # DEADLINE_EXCEEDED: a stream that overran a hop budget (the machine's load) before its cancel.
    assert_codes(outcomes + refusals, {OK, C.CANCELLED, C.DEADLINE_EXCEEDED, C.RESOURCE_EXHAUSTED})
    assert_codes(outcomes, {OK, C.CANCELLED, C.DEADLINE_EXCEEDED})
    assert all(o.retry_after_s for o in refusals), "a refusal without RetryInfo"
    assert sum(o.code == C.CANCELLED for o in outcomes) >= 50, codes(outcomes)

    drained = time.monotonic()
    wait_until(lambda: metric(chaos_mesh, "inference", "nlpmesh_inference_active_sequences") == 0, 15, 0.2,
               what="the inference service's active sequences back to 0")
    active_zero_s = time.monotonic() - drained
    assert metric(chaos_mesh, "inference", "nlpmesh_inference_queue_depth") == 0
    # No place leaked in the gateway's admission or the inference queue: a full house is served.
    time.sleep(1.0)  # past the admission's full hold (0.5 s) of a report sent during the storm
    full_house = concurrent_streams(gateway, CAPACITY, max_new_tokens=4, timeout_s=60)
    say(f"  active sequences 0 {active_zero_s:.2f}s after the last; then {CAPACITY} at once: {codes(full_house)}")
    assert codes(full_house) == {"OK": CAPACITY}


# --- processes killed, stopped, drained ----------------------------------------------------------

def under_load(channel, act, settle, max_new_tokens: int = 6) -> tuple[list[Outcome], float]:
    """Two callers streaming; ``act()`` once they are under way and one is receiving tokens,
    ``settle()`` before they stop.

    Returns every call's outcome and the moment (monotonic) ``act`` ran.
    """
    with Load(channel, workers=2, max_new_tokens=max_new_tokens, timeout_s=15, max_calls=200, max_s=240) as load:
        load.wait_for_calls(2)
        load.wait_for_streaming()
        acted_at = time.monotonic()
        act()
        settle()
        time.sleep(1.0)  # a little load on the mesh as it came back
    return load.outcomes, acted_at


def report(case: str, outcomes: list[Outcome], acted_at: float, **figures: float) -> None:
    after = [o for o in outcomes if o.started + o.seconds >= acted_at]
    failed = [o for o in after if o.code != OK]
    said = ", ".join(f"{k} {v:.2f}s" for k, v in figures.items())
    hops = sorted({o.hop for o in failed if o.hop})
    say(f"{case}: {codes(outcomes)} ({len(after)} ended after it; failures took {seconds_summary(failed)}"
        f"{'; deadlines on ' + ', '.join(hops) if hops else ''}); {said}")


@pytest.mark.parametrize("service", INTERNAL_SERVICES)
def test_sigkill_during_load_is_restarted_and_answered_again(chaos_mesh, channel, gateway, service):
    victim = chaos_mesh.processes[service]
    back: dict[str, float] = {}
    outcomes, killed_at = under_load(
        channel, victim.kill,
        lambda: back.setdefault("restart", restarted(chaos_mesh, service, victim, RECOVERY_S[service])))
    assert victim.wait(timeout=5) == -signal.SIGKILL
    answered = answered_again(gateway, RECOVERY_S[service])
    report(f"SIGKILL {service}", outcomes, killed_at, serving_again=back["restart"], answered_after=answered)
    assert_codes(outcomes, WHEN_DOWN[service])
    if service == "cache":
        assert_off_the_path(outcomes)
    assert all(o.seconds < 15 + 5 for o in outcomes), "a call outlived its deadline"
    if service != "cache":
        assert any(o.code != OK for o in outcomes), "no call noticed the kill: was the load running?"


@pytest.mark.parametrize("service", INTERNAL_SERVICES)
def test_sigstop_during_load_fails_calls_in_time_and_sigcont_recovers(chaos_mesh, channel, gateway, service):
    victim = chaos_mesh.processes[service]

    def pause() -> None:
        os.kill(victim.pid, signal.SIGSTOP)
        time.sleep(5.0)  # stopped this long: the behaviour under test
        os.kill(victim.pid, signal.SIGCONT)

    try:
        outcomes, stopped_at = under_load(channel, pause, lambda: None)
    finally:
        _signal(victim, signal.SIGCONT)
    answered = answered_again(gateway, 60)
    assert chaos_mesh.processes[service] is victim and victim.poll() is None, "a stopped process is not restarted"
    report(f"SIGSTOP 5s {service}", outcomes, stopped_at, answered_after_sigcont=answered)
    assert_codes(outcomes, WHEN_DOWN[service])
    if service == "cache":
        assert_off_the_path(outcomes)
    assert all(o.seconds < 15 + 5 for o in outcomes), "a call outlived its deadline"


@pytest.mark.parametrize("service", SERVICES)
def test_sigterm_drains_in_flight_streams_then_the_launcher_restarts_it(chaos_mesh, channel, gateway, service):
    victim = chaos_mesh.processes[service]
    exited: dict[str, float] = {}

    def drain() -> None:
        victim.send_signal(signal.SIGTERM)
        started = time.monotonic()
        victim.wait(timeout=30)
        exited["after"] = time.monotonic() - started

    outcomes, termed_at = under_load(
        channel, drain,
        lambda: exited.setdefault("restart", restarted(chaos_mesh, service, victim, RECOVERY_S[service])),
        max_new_tokens=12)  # long enough to be decoding when the signal comes
    answered = answered_again(gateway, RECOVERY_S[service])
    in_flight = [o for o in outcomes if o.started < termed_at <= o.started + o.seconds]
    # Past the template and tokenizer hops and inside the inference one when the signal came.
    streaming = [o for o in in_flight if o.first_chunk_s is not None and o.started + o.first_chunk_s < termed_at]
    report(f"SIGTERM {service}", outcomes, termed_at, exited_after=exited["after"],
           serving_again=exited["restart"], answered_after=answered)
    say(f"  in flight at SIGTERM: {codes(in_flight)}, of which streaming tokens: {codes(streaming)}")
    assert victim.returncode == 0, f"{service} exited with {victim.returncode} on SIGTERM"
    assert exited["after"] < 5.0 + 10.0  # the drain's grace, and a loaded machine
    assert_codes(outcomes, WHEN_DOWN.get(service, {OK, C.UNAVAILABLE, C.DEADLINE_EXCEEDED}))
    if service == "cache":
        assert_off_the_path(outcomes)
    # A call that had not reached the draining service yet is refused there (UNAVAILABLE);
    # one that was streaming finishes.
    assert_codes(in_flight, {OK, C.UNAVAILABLE})
    assert streaming, "no stream was receiving tokens at the signal: the drain went untested"
    assert all(o.code == OK for o in streaming), f"streams cut by the drain: {codes(streaming)}"


# --- Redis ---------------------------------------------------------------------------------------

def test_redis_killed_and_restarted_loses_no_call_and_the_cache_works_again(chaos_mesh, channel, gateway):
    redis_process = chaos_mesh._redis
    if redis_process is None:
        pytest.skip("REDIS_URL is set: this mesh has no private Redis to kill")

    def redis_back() -> None:
        wait_until(lambda: chaos_mesh._redis is not redis_process, 15, 0.1, what="redis restarted")

    outcomes, killed_at = under_load(channel, redis_process.kill, redis_back)
    report("SIGKILL redis", outcomes, killed_at)
    assert_off_the_path(outcomes)

    # A new answer is stored in the restarted Redis and read back from it.
    question = f"What is a ledger? (ref {time.monotonic_ns()})"
    started = time.monotonic()
    gateway.Generate(finance_request(4, question, gateway_pb2.CACHE_MODE_REFRESH), timeout=60)

    def hit() -> bool:
        return gateway.Generate(finance_request(4, question, gateway_pb2.CACHE_MODE_USE), timeout=60).cache_hit

    wait_until(hit, 30, 0.5, what="a cache hit from the restarted Redis")
    say(f"  a new answer was a cache hit {time.monotonic() - started:.2f}s after it was generated")
