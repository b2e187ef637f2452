"""`make bench`: the mesh's latency beside baselines measured in the same run.

Rounds interleave the variants (this machine is shared and its idle cores wake
slowly; the gateway variants take turns of 10 hits), and every figure is a
median and a p99 over all rounds. `python -m bench.run --only cache` runs the
cache hits alone, the tracing overhead (default against tracing_off) and the cost of
TLS at the gateway's edge (default against tls_edge) included.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import grpc
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from nlpmesh_client import Sampling

from bench import (
    cache_hits,
    coalescing,
    edge,
    embeddings,
    engine_speed,
    external_engine,
    generation,
    guided,
    models,
    routing,
    serving,
    variants,
)
from bench.stats import summary_ms
from cli.launcher import LocalMesh
from modelfiles.catalogue import load_catalogue
from modelfiles.convert import default_model_id

QUESTION = "What are the applications of real-time AI in the financial industry?"
RESULTS = Path(__file__).resolve().parent / "results"


def say(line: str) -> None:
    print(f"[bench] {line}", flush=True)


# Gateways compared on the same services, rounds interleaved.
GATEWAY_VARIANTS = {
    "default": {},
    "redis_tier_only": {"NLPMESH_GATEWAY_NEAR_CACHE_BYTES": "0"},
    "asyncio_loop": {"NLPMESH_GATEWAY_EVENT_LOOP": "asyncio"},
    "grpc_default_io": {"GRPC_EXPERIMENTS": ""},  # gRPC's EventEngine I/O, not the mesh's (meshkit/grpc_io.py)
    "tracing_off": {"OTEL_SDK_DISABLED": "true", "NLPMESH_TRACE_DIR": ""},
    "traces_sampled": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"},
}


def bench_cache_hits(mesh: LocalMesh, redis_url: str, rounds: int, per_round: int,
                     baseline: Path | None = None) -> dict:
    request = cache_hits.generate_request(QUESTION, 32, gateway_pb2.CACHE_MODE_USE)
    names = list(GATEWAY_VARIANTS)
    extra = [variants.spawn_gateway(mesh, env) for env in GATEWAY_VARIANTS.values()]
    tls_env, tls_ca = variants.tls_edge_variant(mesh.run_dir / "certs")
    names.append("tls_edge")
    extra.append(variants.spawn_gateway(
        mesh, tls_env, health_credentials=grpc.ssl_channel_credentials(tls_ca.read_bytes())))
    if baseline is not None:  # the default gateway as another checkout has it, taking the same turns
        names.append("baseline")
        extra.append(variants.spawn_gateway(mesh, {}, source=baseline))
        # A second default gateway, identical to the first: their ratio is this run's noise floor.
        names.append("default_again")
        extra.append(variants.spawn_gateway(mesh, {}))
    addresses = {name: address for name, (_, address) in zip(names, extra)}
    access = {name: dataclasses.replace(mesh.gateway_access(), address=address) for name, address in addresses.items()}
    access["tls_edge"] = dataclasses.replace(access["tls_edge"], ca_file=tls_ca)
    samples: dict[str, list[float]] = {"grpc_empty_rpc_c1": [], "redis_get_c1": [], "cache_hit_c16": []}
    samples |= {f"cache_hit_c1[{name}]": [] for name in addresses}
    throughput = []
    channels = {name: access[name].channel() for name in addresses}
    # The work besides the compared turns (the generation that fills the cache, the empty
    # calls, the concurrent hits) goes to the mesh's own gateway, never to a compared one: a
    # gateway still writing the spans of a burst of 400 hits answers its next turns slower.
    own_access = mesh.gateway_access()
    own_channel = own_access.channel()
    try:
        stubs = {name: gateway_pb2_grpc.GatewayStub(channel) for name, channel in channels.items()}
        # Untimed calls go through nlpmesh-client; the timed ones stay bare stubs (the gateway, not the client).
        with own_access.client(300) as client:
            client.generate(QUESTION, sampling=Sampling(max_new_tokens=32), cache="refresh")
        for name, stub in stubs.items():
            _wait_for_hit(access[name])
            cache_hits.hit_c1(stub, request, 200)  # warm connections and tiers
        for index in range(rounds):
            say(f"cache hits: round {index + 1}/{rounds}")
            samples["grpc_empty_rpc_c1"] += cache_hits.empty_rpc_c1(own_channel, per_round)
            for name, hits in cache_hits.hit_c1_interleaved(stubs, request, per_round).items():
                samples[f"cache_hit_c1[{name}]"] += hits
            if redis_url:
                samples["redis_get_c1"] += cache_hits.redis_get_c1(redis_url, "nlpmesh:bench:probe", per_round)
            latencies, rate = cache_hits.hit_concurrent(own_access, request, 16, per_round // 16)
            samples["cache_hit_c16"] += latencies
            throughput.append(rate)
    finally:
        own_channel.close()
        for channel in channels.values():
            channel.close()
        for process, _ in extra:
            process.terminate()
            process.wait(timeout=10)
    result = {name: summary_ms(values) for name, values in samples.items() if values}
    result["cache_hit_c16"]["throughput_rps"] = statistics.median(throughput)
    base = result["grpc_empty_rpc_c1"]["p50_ms"]
    for name, row in result.items():
        if name.startswith("cache_hit_c1"):
            row["ratio_to_empty_rpc_p50"] = row["p50_ms"] / base
    untraced = result["cache_hit_c1[tracing_off]"]["p50_ms"]
    result["cache_hit_c1[default]"]["tracing_overhead_p50"] = result["cache_hit_c1[default]"]["p50_ms"] / untraced - 1
    # The same gateway on the same services, TLS at its edge or not (channels already
    # connected: the per-call cost, not the handshake).
    plain = result["cache_hit_c1[default]"]["p50_ms"]
    result["cache_hit_c1[tls_edge]"]["tls_overhead_p50"] = result["cache_hit_c1[tls_edge]"]["p50_ms"] / plain - 1
    if baseline is not None:
        before, after = result["cache_hit_c1[baseline]"], result["cache_hit_c1[default]"]
        before["source"] = str(baseline)
        after["ratio_to_baseline_p50"] = after["p50_ms"] / before["p50_ms"]
        again = result["cache_hit_c1[default_again]"]
        again["ratio_to_default_p50"] = again["p50_ms"] / after["p50_ms"]
    return result


def _wait_for_hit(access) -> None:
    """Until the gateway at ``access`` answers the cache-hit request (cache_hits.generate_request, the same
    message) from the prompt cache."""
    with access.client(10) as client:
        for _ in range(100):
            if client.generate(QUESTION, sampling=Sampling(max_new_tokens=32)).cache_hit:
                return
            time.sleep(0.05)
    raise RuntimeError("the answer never reached the prompt cache")


def table(results: dict) -> str:
    lines = []
    if "cache_hits" in results:
        lines += cache_hit_lines(results["cache_hits"]) + [""]
    if "generation" in results:
        lines += generation.lines(results["generation"])
    if "engine" in results:
        lines += [""] + engine_speed.lines(results["engine"])
    if "models" in results:
        lines += [""] + models.lines(results["models"])
    if "routing" in results:
        lines += [""] + routing.lines(results["routing"])
    if "serving" in results:
        lines += [""] + serving.lines(results["serving"])
    if "coalescing" in results:
        lines += [""] + coalescing.lines(results["coalescing"])
    if "external_engine" in results:
        lines += [""] + external_engine.lines(results["external_engine"])
    if "guided" in results:
        lines += [""] + guided.lines(results["guided"])
    if "edge" in results:
        lines += [""] + edge.lines(results["edge"])
    if "embeddings" in results:
        lines += [""] + embeddings.lines(results["embeddings"])
    return "\n".join(lines)


def cache_hit_lines(cache_hits: dict) -> list[str]:
    lines = [f"{'cache hit (end to end, client side)':<38}{'n':>7}{'p50 ms':>10}{'p99 ms':>10}  notes"]
    for name, row in cache_hits.items():
        notes = ""
        if "ratio_to_empty_rpc_p50" in row:
            notes = f"{row['ratio_to_empty_rpc_p50']:.2f}x an empty gRPC call"
        if "tracing_overhead_p50" in row:
            notes += f"; tracing costs {100 * row['tracing_overhead_p50']:+.1f}% of p50"
        if "tls_overhead_p50" in row:
            notes += f"; TLS at the edge costs {100 * row['tls_overhead_p50']:+.1f}% of [default]'s p50"
        if "ratio_to_baseline_p50" in row:
            notes += f"; {row['ratio_to_baseline_p50']:.3f}x the baseline checkout's p50"
        if "ratio_to_default_p50" in row:
            notes += f"; {row['ratio_to_default_p50']:.3f}x [default]'s p50, the same code: the noise floor"
        if "throughput_rps" in row:
            notes = f"{row['throughput_rps']:.0f} req/s"
        lines.append(f"{name:<38}{row['n']:>7}{row['p50_ms']:>10.3f}{row['p99_ms']:>10.3f}  {notes}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=400)
    parser.add_argument("--gen-rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="new tokens a stream; the engine part needs every stream decoding at once for a while, "
                             "and later streams through the gateway wait for their prefill beside the first ones")
    parser.add_argument("--only", choices=OWN_MESH_PARTS + ("routing", "coalescing", "external", "guided"),
                        help="run one part: cache (the cache-hit variants, tracing overhead included), generation, "
                             "engine (bench/engine_speed.py), models (bench/models.py: every model of --model "
                             "through one mesh), serving (bench/serving.py: a burst and Poisson arrivals with "
                             "deadlines, against generate), edge (bench/edge.py: a cache hit through the OpenAI edge "
                             "vs through gRPC), embeddings (bench/embeddings.py: Embed through the mesh vs "
                             "sentence-transformers in process, batch 1 and 32), "
                             "routing (bench/routing.py: 2 inference replicas), "
                             "coalescing (bench/coalescing.py: identical requests at once, 1 and 2 gateways) or "
                             "external (bench/external_engine.py: llama.cpp's server behind the adapter vs called "
                             "directly) or guided (bench/guided.py: guided decoding against free decoding, in "
                             "this process)")
    parser.add_argument("--model", dest="models", action="append", metavar="ID",
                        help="a catalogue model the models part measures (repeat it; default: every model in "
                             "the catalogue). The mesh serves these; the other parts use the default model")
    parser.add_argument("--baseline-tree", type=Path,
                        help="another checkout (e.g. a worktree of the parent commit, after its `make protos`) whose "
                             "gateway takes turns with this one's on the same services, and whose engine's decode "
                             "tok/s (1 and 8 streams) is measured in a process of its own, rounds interleaved with "
                             "this tree's: before/after in one run")
    args = parser.parse_args()
    args.models = args.models or list(load_catalogue().ids)
    results = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.node()}
    if args.only in (None, *OWN_MESH_PARTS):
        _bench_one_mesh(args, results)
    if args.only in (None, "routing"):  # a mesh of its own, with 2 inference replicas
        results["routing"] = routing.bench()
    if args.only in (None, "coalescing"):  # a mesh of its own, and a second gateway
        results["coalescing"] = coalescing.bench()
    if args.only in (None, "guided"):  # the engine in this process
        results["guided"] = guided.bench(args.gen_rounds)
    if args.only in (None, "external") and external_engine.available():  # its own mesh and llama.cpp server
        results["external_engine"] = external_engine.bench(args.gen_rounds, args.max_new_tokens)
    print(table(results))
    write_results(results, "bench")
    return 0


def write_results(results: dict, name: str) -> Path:
    """bench/results/<name>-<time>.json (what `python -m docs.gen.performance --newest` takes)."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    say(f"written {out}")
    return out


# The parts measured on one mesh serving the default model (models: every model of --model).
OWN_MESH_PARTS = ("cache", "generation", "engine", "models", "serving", "edge", "embeddings")


def _bench_one_mesh(args, results: dict) -> None:
    served = args.models if args.only in (None, "models") else [default_model_id()]
    mesh = LocalMesh(Path(tempfile.mkdtemp(prefix="nlpmesh-bench-")), free_ports=True, progress=say,
                     models=tuple(served))
    mesh.start()
    try:
        redis_url = mesh.resolved_redis_url
        if args.only in (None, "cache"):
            results["cache_hits"] = bench_cache_hits(mesh, redis_url, args.rounds, args.per_round, args.baseline_tree)
        if args.only in (None, "generation"):
            results["generation"] = generation.bench(mesh, args.gen_rounds, args.max_new_tokens)
        if args.only in (None, "engine"):
            results["engine"] = engine_speed.bench(mesh, args.gen_rounds, args.max_new_tokens, args.baseline_tree)
        if args.only in (None, "models"):
            results["models"] = models.bench(mesh, args.models, args.gen_rounds, args.max_new_tokens)
        if args.only in (None, "serving"):
            results["serving"] = serving.bench(mesh)
        if args.only in (None, "edge"):
            results["edge"] = edge.bench(mesh, args.rounds, args.per_round)
        if args.only in (None, "embeddings"):
            results["embeddings"] = embeddings.bench(mesh, args.rounds, args.per_round)
    finally:
        mesh.stop()


if __name__ == "__main__":
    raise SystemExit(main())
