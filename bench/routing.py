"""Two inference replicas: round_robin against prefix-affine routing, and the cache-hit cost of a list of endpoints.

One mesh (`nlpmesh up --scale inference=2` as processes, a private Redis) and, beside its
gateway (prefix-affine routing, the default), a second gateway with
``NLPMESH_GATEWAY_INFERENCE_ROUTING=round_robin`` on the same replicas. The workload is
what affinity is for: ``groups`` system prompts (say, one per application) of a few
prefix blocks each, each asked ``questions`` different questions, two callers at once.
Each mode gets prompts of its own (a fresh salt per mode and round, so neither warms the
other's replicas) and the modes take turns, round after round. Measured per mode: the
local prefix-hit rate (prompt tokens whose KV came from the serving replica's own tier,
over all prompt tokens, from both replicas' /metrics), the share reused from Redis, and
the time to the first token at the caller.

Then the cache-hit p50 (a prompt-cache hit, end to end) through a gateway whose inference
address lists both endpoints, against one given a single endpoint, in turns as bench/run.py
takes them.

`python -m bench.routing` runs it alone; `make bench` (bench/run.py) runs it after its own parts.
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from bench import cache_hits, variants
from bench.stats import summary_ms
from cli.launcher import LocalMesh

REPLICAS = 2
PREFILLED = "nlpmesh_inference_prefill_tokens_total"  # run through the model; with the reused ones, the prompt
REUSED = "nlpmesh_inference_prefix_tokens_reused_total"
TOPICS = ("retail banking", "equity research", "insurance claims", "payments fraud", "tax filing",
          "mortgage lending", "credit scoring", "wealth management")
QUESTIONS = ("What should I ask first?", "Name one common risk.", "Give one practical tip.",
             "What does a good answer include?", "Which data matters most?", "What is often overlooked?")


def say(line: str) -> None:
    print(f"[bench routing] {line}", flush=True)


def system_prompt(salt: str, group: int) -> str:
    """A system prompt of several prefix blocks, distinct from its first words on (its own first block)."""
    topic = TOPICS[group % len(TOPICS)]
    return (f"Desk {salt}-{group}: you are the assistant of a {topic} team. Answer in one short sentence, "
            f"plainly, without lists. You know the team's procedures for {topic}, its usual customers and the "
            f"regulations that apply to it; when unsure, say so and name who in the {topic} team would know.")


def chat_request(system: str, question: str, max_new_tokens: int) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(
        chat=gateway_pb2.Chat(messages=[gateway_pb2.ChatMessage(role="system", content=system),
                                        gateway_pb2.ChatMessage(role="user", content=question)]),
        sampling=gateway_pb2.SamplingParams(max_new_tokens=max_new_tokens),
        cache_mode=gateway_pb2.CACHE_MODE_BYPASS,  # every request reaches a replica
    )


def replica_counters(mesh: LocalMesh) -> dict[str, float]:
    """Prompt tokens (prefilled + reused), and tokens reused by tier, summed over the inference replicas."""
    totals = {"prompt": 0.0, "local": 0.0, "redis": 0.0}
    for name in mesh.replicas("inference"):
        with urllib.request.urlopen(mesh.metrics_url(name), timeout=5) as page:
            families = text_string_to_metric_families(page.read().decode())
        for family in families:
            for sample in family.samples:
                if sample.name == PREFILLED:
                    totals["prompt"] += sample.value
                elif sample.name == REUSED and sample.labels.get("tier") in ("local", "redis"):
                    totals[sample.labels["tier"]] += sample.value
                    totals["prompt"] += sample.value
    return totals


def first_token_s(stub, request) -> float | None:
    """Seconds to the first chunk; None when a hop ran over its budget on this loaded machine
    (DEADLINE_EXCEEDED: counted, not timed)."""
    started = time.perf_counter()
    try:
        for _chunk in stub.GenerateStream(request, timeout=120):
            return time.perf_counter() - started
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
        return None
    raise RuntimeError("a stream ended without a chunk")


def run_block(mesh: LocalMesh, stub, salt: str, groups: int, questions: int, max_new_tokens: int,
              callers: int) -> tuple[list[float | None], dict[str, float]]:
    """One mode's turn: every group's questions, ``callers`` at once; TTFTs and the counters' deltas."""
    requests = [chat_request(system_prompt(salt, g), QUESTIONS[q % len(QUESTIONS)], max_new_tokens)
                for q in range(questions) for g in range(groups)]
    before = replica_counters(mesh)
    with ThreadPoolExecutor(callers) as pool:
        ttfts = list(pool.map(lambda request: first_token_s(stub, request), requests))
    after = replica_counters(mesh)
    return ttfts, {k: after[k] - before[k] for k in before}


def bench_routing(mesh: LocalMesh, rounds: int, groups: int, questions: int, max_new_tokens: int,
                  callers: int) -> dict:
    process, rr_address = variants.spawn_gateway(mesh, {"NLPMESH_GATEWAY_INFERENCE_ROUTING": "round_robin"})
    access = mesh.gateway_access()
    channels = {"affine": access.channel(), "round_robin": dataclasses.replace(access, address=rr_address).channel()}
    ttfts: dict[str, list[float | None]] = {mode: [] for mode in channels}
    counters = {mode: {"prompt": 0.0, "local": 0.0, "redis": 0.0} for mode in channels}
    try:
        stubs = {mode: gateway_pb2_grpc.GatewayStub(channel) for mode, channel in channels.items()}
        for stub in stubs.values():  # connections and replicas warm, on prompts of no group
            for _ in range(4):
                first_token_s(stub, chat_request(f"Warm-up {uuid.uuid4().hex}", "Hello.", 1))
        for index in range(rounds):
            for mode in (("round_robin", "affine") if index % 2 == 0 else ("affine", "round_robin")):
                say(f"round {index + 1}/{rounds}: {mode}")
                salt = uuid.uuid4().hex[:8]
                times, delta = run_block(mesh, stubs[mode], salt, groups, questions, max_new_tokens, callers)
                ttfts[mode] += times
                for key, value in delta.items():
                    counters[mode][key] += value
    finally:
        for channel in channels.values():
            channel.close()
        process.terminate()
        process.wait(timeout=10)
    result = {}
    for mode in channels:
        prompt = counters[mode]["prompt"] or 1.0
        timed = [t for t in ttfts[mode] if t is not None]
        result[mode] = {"ttft": summary_ms(timed), "over_budget": len(ttfts[mode]) - len(timed),
                        "prompt_tokens": counters[mode]["prompt"],
                        "local_prefix_hit_rate": counters[mode]["local"] / prompt,
                        "redis_prefix_hit_rate": counters[mode]["redis"] / prompt}
    return result


def bench_cache_hit_targets(mesh: LocalMesh, rounds: int, per_round: int) -> dict:
    """The cache-hit p50 through a gateway with both inference endpoints listed, against one with one."""
    single = {"NLPMESH_GATEWAY_INFERENCE_ADDR": mesh.address("inference")}
    spawned = {"multi_endpoint": variants.spawn_gateway(mesh, {}),
               "single_endpoint": variants.spawn_gateway(mesh, single)}
    access = mesh.gateway_access()
    channels = {name: dataclasses.replace(access, address=address).channel() for name, (_, address) in spawned.items()}
    request = cache_hits.generate_request("What are the applications of real-time AI in the financial industry?",
                                          16, gateway_pb2.CACHE_MODE_USE)
    samples: dict[str, list[float]] = {name: [] for name in spawned}
    try:
        stubs = {name: gateway_pb2_grpc.GatewayStub(channel) for name, channel in channels.items()}
        refresh = cache_hits.generate_request(request.chat.messages[0].content, 16, gateway_pb2.CACHE_MODE_REFRESH)
        stubs["multi_endpoint"].Generate(refresh, timeout=300)
        for stub in stubs.values():
            for _ in range(100):
                if stub.Generate(request, timeout=10).cache_hit:
                    break
                time.sleep(0.05)
            cache_hits.hit_c1(stub, request, 100)  # warm connections and tiers
        for index in range(rounds):
            say(f"cache hits: round {index + 1}/{rounds}")
            for name, hits in cache_hits.hit_c1_interleaved(stubs, request, per_round).items():
                samples[name] += hits
    finally:
        for channel in channels.values():
            channel.close()
        for process, _ in spawned.values():
            process.terminate()
            process.wait(timeout=10)
    result = {name: summary_ms(values) for name, values in samples.items()}
    result["multi_endpoint"]["ratio_to_single_p50"] = (result["multi_endpoint"]["p50_ms"]
                                                       / result["single_endpoint"]["p50_ms"])
    return result


def lines(result: dict) -> list[str]:
    out = [f"{'2 inference replicas':<14}{'n':>5}{'TTFT p50 ms':>13}{'p99 ms':>9}"
           f"{'local prefix hits':>19}{'from Redis':>12}{'over budget':>13}"]
    for mode in ("round_robin", "affine"):
        row = result["routing"][mode]
        out.append(f"{mode:<14}{row['ttft']['n']:>5}{row['ttft']['p50_ms']:>13.1f}{row['ttft']['p99_ms']:>9.1f}"
                   f"{100 * row['local_prefix_hit_rate']:>18.1f}%{100 * row['redis_prefix_hit_rate']:>11.1f}%"
                   f"{row['over_budget']:>13}")
    out += ["", f"{'cache hit, inference target':<38}{'n':>7}{'p50 ms':>10}{'p99 ms':>10}"]
    for name, row in result["cache_hit_targets"].items():
        note = f"  {row['ratio_to_single_p50']:.3f}x single's p50" if "ratio_to_single_p50" in row else ""
        out.append(f"{name:<38}{row['n']:>7}{row['p50_ms']:>10.3f}{row['p99_ms']:>10.3f}{note}")
    return out


def bench(rounds: int = 3, groups: int = 6, questions: int = 4, max_new_tokens: int = 2, callers: int = 2,
          hit_rounds: int = 3, hits_per_round: int = 200) -> dict:
    """The whole comparison on a mesh of its own; returns the figures (``lines`` makes the table)."""
    mesh = LocalMesh(Path(tempfile.mkdtemp(prefix="nlpmesh-bench-routing-")), free_ports=True, progress=say,
                     scale={"inference": REPLICAS})
    mesh.start()
    try:
        result = {"replicas": REPLICAS, "workload": {"rounds": rounds, "groups": groups, "questions": questions,
                                                     "max_new_tokens": max_new_tokens, "callers": callers},
                  "routing": bench_routing(mesh, rounds, groups, questions, max_new_tokens, callers),
                  "cache_hit_targets": bench_cache_hit_targets(mesh, hit_rounds, hits_per_round)}
    finally:
        mesh.stop()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.routing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--groups", type=int, default=6, help="system prompts, each its own first prefix block")
    parser.add_argument("--questions", type=int, default=4, help="questions asked of each system prompt per round")
    parser.add_argument("--max-new-tokens", type=int, default=2)
    parser.add_argument("--callers", type=int, default=2, help="requests in flight at once")
    parser.add_argument("--hit-rounds", type=int, default=3)
    parser.add_argument("--hits-per-round", type=int, default=200)
    args = parser.parse_args()
    result = bench(args.rounds, args.groups, args.questions, args.max_new_tokens, args.callers,
                   args.hit_rounds, args.hits_per_round)
    print("\n".join(lines(result)), flush=True)
    from bench.run import write_results  # bench.run imports this module

    write_results(result, "bench-routing")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
