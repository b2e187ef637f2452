"""Request coalescing: N identical concurrent requests, and what they cost.

One mesh (processes, a private Redis unless REDIS_URL is set, the real model). A burst of ``requests``
identical greedy requests (a prompt no earlier request asked) is sent at once, from as many threads, to
the mesh's gateway; then the same split over two gateways sharing Redis (a second one spawned beside
it). Measured per burst: the generations it cost (the inference service's own
``nlpmesh_inference_requests_finished_total``), the leader's time (the reply that generated), and each
reply's time against it: p50, p99 and the slowest, as a ratio to the leader's.

The goal it shows: 50 identical concurrent requests cost one generation, each answered within 1.2x the
leader's time. `python -m bench.coalescing` runs it and writes bench/results/bench-coalescing-*.json.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from google.protobuf import struct_pb2
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from bench import variants
from bench.stats import summary_ms
from cli.launcher import LocalMesh

FINISHED = "nlpmesh_inference_requests_finished_total"
GOAL_RATIO = 1.2


def say(line: str) -> None:
    print(f"[bench coalescing] {line}", flush=True)


def identical_request(max_new_tokens: int) -> gateway_pb2.GenerateRequest:
    variables = struct_pb2.Struct()
    variables.update({"question": f"What does a bond coupon pay? (bench {uuid.uuid4().hex[:8]})"})
    return gateway_pb2.GenerateRequest(
        template=gateway_pb2.TemplateCall(id="finance_question", variables=variables),
        sampling=gateway_pb2.SamplingParams(max_new_tokens=max_new_tokens),
        cache_mode=gateway_pb2.CACHE_MODE_USE)


def finished(mesh: LocalMesh) -> float:
    with urllib.request.urlopen(mesh.metrics_url("inference"), timeout=5) as page:
        families = text_string_to_metric_families(page.read().decode())
    return sum(s.value for family in families for s in family.samples if s.name == FINISHED)


def settled_generations(mesh: LocalMesh, before: float, timeout_s: float = 10.0) -> float:
    """Generations finished since ``before``, once the count has stopped moving (it counts after the reply)."""
    deadline, last = time.monotonic() + timeout_s, -1.0
    while time.monotonic() < deadline:
        now = finished(mesh) - before
        if now == last and now > 0:
            return now
        last = now
        time.sleep(0.5)
    return last


def timed(stub, request) -> tuple[str, float, bool]:
    """(the reply's role, its seconds, whether it answered): "leader" generated, "coalesced" shared."""
    began = time.perf_counter()
    try:
        reply = stub.Generate(request, timeout=300)
    except grpc.RpcError as error:
        return f"error {error.code().name}", time.perf_counter() - began, False
    hops = {t.hop for t in reply.timings}
    role = "coalesced" if "coalesced" in hops else "leader" if "inference" in hops else "other"
    return role, time.perf_counter() - began, True


def burst(mesh: LocalMesh, stubs: list, requests: int, max_new_tokens: int) -> dict:
    """``requests`` identical requests at once, spread over ``stubs`` in turn."""
    request = identical_request(max_new_tokens)
    before = finished(mesh)
    with ThreadPoolExecutor(max_workers=requests) as pool:
        results = list(pool.map(lambda i: timed(stubs[i % len(stubs)], request), range(requests)))
    generations = settled_generations(mesh, before)
    roles: dict[str, int] = {}
    for role, _, _ in results:
        roles[role] = roles.get(role, 0) + 1
    leader_s = [s for role, s, _ in results if role == "leader"]
    answered = [s for _, s, ok in results if ok]
    row = {"requests": requests, "gateways": len(stubs), "generations": generations, "roles": roles,
           "answered": summary_ms(answered) if answered else {}}
    if leader_s and answered:
        row["leader_ms"] = leader_s[0] * 1000
        row["slowest_to_leader"] = max(answered) / leader_s[0]
        row["p99_to_leader"] = row["answered"]["p99_ms"] / row["leader_ms"]
    row["goal_met"] = (generations == 1 and len(answered) == requests
                       and row.get("slowest_to_leader", float("inf")) <= GOAL_RATIO)
    return row


def bench(requests: int = 50, max_new_tokens: int = 32) -> dict:
    mesh = LocalMesh(Path(tempfile.mkdtemp(prefix="nlpmesh-bench-coalescing-")), free_ports=True, progress=say)
    mesh.start()
    try:
        with grpc.insecure_channel(mesh.gateway_address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            stub.Generate(identical_request(4), timeout=300)  # warm: the model's first call pays for kernels
            one = burst(mesh, [stub], requests, max_new_tokens)
            say(f"one gateway: {one}")
            process, address = variants.spawn_gateway(mesh, {})
            try:
                with grpc.insecure_channel(address) as other:
                    two = burst(mesh, [stub, gateway_pb2_grpc.GatewayStub(other)], requests, max_new_tokens)
                    say(f"two gateways sharing Redis: {two}")
            finally:
                process.terminate()
                process.wait(timeout=10)
    finally:
        mesh.stop()
    return {"max_new_tokens": max_new_tokens, "goal_ratio": GOAL_RATIO, "one_gateway": one, "two_gateways": two}


def lines(result: dict) -> list[str]:
    out = [f"{'burst':<22}{'requests':>9}{'generations':>12}{'leader ms':>11}{'p50 ms':>9}{'p99 ms':>9}"
           f"{'slowest/leader':>16}  goal"]
    for name in ("one_gateway", "two_gateways"):
        row = result[name]
        answered = row.get("answered", {})
        out.append(f"{name:<22}{row['requests']:>9}{row['generations']:>12g}{row.get('leader_ms', 0):>11.0f}"
                   f"{answered.get('p50_ms', 0):>9.0f}{answered.get('p99_ms', 0):>9.0f}"
                   f"{row.get('slowest_to_leader', 0):>16.3f}  {'met' if row['goal_met'] else 'NOT met'}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.coalescing")
    parser.add_argument("--requests", type=int, default=50, help="identical requests sent at once")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()
    result = bench(args.requests, args.max_new_tokens)
    print("\n".join(lines(result)), flush=True)
    from bench.run import write_results  # bench.run imports this module

    write_results(result, "bench-coalescing")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
