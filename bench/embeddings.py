"""Embed through the mesh against sentence-transformers in this process on the same model, turns interleaved
(`python -m bench.run --only embeddings`).

    mesh_b1       a bare gRPC stub's Embed on the gateway, 1 text a call (gateway, embedding replica, back)
    st_b1         SentenceTransformer.encode of the same text in this process
    mesh_b32      Embed with 32 texts in one call
    st_b32        encode of the same 32 texts (batch_size 32)
    st_bf16_*     the same with the weights in bfloat16 (what the replica runs where the CPU multiplies it natively)
    mesh_burst32  32 callers at once, 1 text each: the replica's batching at work (the time until the last answer)

Throughput is texts per second of a caller sending one call after another (for the burst: 32 over its time).
The issue's goal: the mesh's throughput at least 0.9x sentence-transformers' (as it loads the model: float32) at
batch 1 and at 32; the ratio to its bfloat16 is reported beside it.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from bench import cache_hits
from bench.stats import summary_ms
from cli.launcher import LocalMesh
from meshkit.settings import default_home

GOAL_RATIO = 0.9
# Customer-support, finance, clinical and tutoring sentences of the lengths callers send (10-40 tokens).
TEXTS = [
    "Where is my order 48213? It was due last Tuesday and the tracking page has not changed.",
    "I was charged twice for the same subscription this month, please refund one of the payments.",
    "Can I change the delivery address after the parcel has shipped?",
    "What is the difference between a bond's coupon rate and its yield to maturity?",
    "Explain how compound interest works with a simple example.",
    "The patient reports mild chest pain after exercise, no history of cardiac events.",
    "Summarise the discharge note: stable vitals, follow up with cardiology in two weeks.",
    "How do I reset my password if I no longer have access to my email?",
    "Is the warranty still valid if I bought the laptop from a reseller?",
    "Translate to French: the meeting has been moved to Thursday afternoon.",
    "Why does the moon look bigger near the horizon?",
    "My card was declined at checkout although there is enough money on the account.",
    "What documents do I need to open a business account?",
    "The package arrived damaged; the box was crushed and the screen is cracked.",
    "Can you explain photosynthesis to a ten year old?",
    "Patient allergic to penicillin; prescribed azithromycin for five days.",
] * 2  # 32


def bench(mesh: LocalMesh, rounds: int, per_round: int, block: int = 10) -> dict:
    from sentence_transformers import SentenceTransformer

    folder = str(default_home() / "models" / "minilm")
    reference = SentenceTransformer(folder, device="cpu")  # as sentence-transformers loads it: float32
    # The same weights in bfloat16, the precision the replica picks where the CPU multiplies it natively.
    reference_bf16 = SentenceTransformer(folder, device="cpu", model_kwargs={"dtype": torch.bfloat16})
    channel = mesh.gateway_access().channel()
    stub = gateway_pb2_grpc.GatewayStub(channel)
    turn = {"i": 0}

    def one_text() -> str:
        turn["i"] += 1
        return TEXTS[turn["i"] % len(TEXTS)]

    def mesh_b1():
        if len(stub.Embed(gateway_pb2.EmbedRequest(texts=[one_text()]), timeout=30).embeddings) != 1:
            raise RuntimeError("expected one vector")

    def st_b1():
        reference.encode([one_text()])

    def st_bf16_b1():
        reference_bf16.encode([one_text()])

    def st_bf16_b32():
        reference_bf16.encode(TEXTS, batch_size=32)

    def mesh_b32():
        if len(stub.Embed(gateway_pb2.EmbedRequest(texts=TEXTS), timeout=60).embeddings) != 32:
            raise RuntimeError("expected 32 vectors")

    def st_b32():
        reference.encode(TEXTS, batch_size=32)

    pool = ThreadPoolExecutor(32)
    burst_stubs = [gateway_pb2_grpc.GatewayStub(channel) for _ in range(32)]

    def mesh_burst32():
        answers = list(pool.map(lambda i: burst_stubs[i].Embed(gateway_pb2.EmbedRequest(texts=[TEXTS[i]]), timeout=60),
                                range(32)))
        if sum(len(a.embeddings) for a in answers) != 32:
            raise RuntimeError("expected 32 vectors")

    variants = {"mesh_b1": mesh_b1, "st_b1": st_b1, "st_bf16_b1": st_bf16_b1, "mesh_b32": mesh_b32, "st_b32": st_b32,
                "st_bf16_b32": st_bf16_b32, "mesh_burst32": mesh_burst32}
    counts = {name: per_round if name.endswith("_b1") else per_round // 20 for name in variants}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    try:
        _until_ready(stub)
        for call in variants.values():  # warm connections, threads and the replica
            cache_hits.timed_sync(call, 5)
        names = list(variants)
        for index in range(rounds):
            print(f"[bench] embeddings: round {index + 1}/{rounds}", flush=True)
            for shift in range(len(names)):  # every variant leads once a round
                for name in names[shift:] + names[:shift]:
                    samples[name] += cache_hits.timed_sync(variants[name], max(1, counts[name] // len(names)))
    finally:
        pool.shutdown()
        channel.close()
    result = {name: summary_ms(values) for name, values in samples.items()}
    for name in variants:
        result[name]["texts_per_s"] = (1 if name.endswith("_b1") else 32) * 1000 / result[name]["mean_ms"]
    for mesh_name, st_name in (("mesh_b1", "b1"), ("mesh_b32", "b32"), ("mesh_burst32", "b32")):
        for baseline in ("st", "st_bf16"):
            result[mesh_name][f"ratio_to_{baseline}"] = (result[mesh_name]["texts_per_s"] /
                                                         result[f"{baseline}_{st_name}"]["texts_per_s"])
    result["ratio_b1"] = result["mesh_b1"]["ratio_to_st"]
    result["ratio_b32"] = result["mesh_b32"]["ratio_to_st"]
    result["goal_ratio"] = GOAL_RATIO
    result["precision"] = _replica_precision()
    return result


def _replica_precision() -> str:
    """What the replica runs (its resolve_precision on this machine's CPU), for the table's reader."""
    from meshkit.cpu_features import read_cpu_features
    from services.embedding.encoder import resolve_precision

    return resolve_precision("auto", read_cpu_features())


def _until_ready(stub, timeout_s: float = 120.0) -> None:
    """The gateway learns the embedding model in the background: UNAVAILABLE until then."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            stub.Embed(gateway_pb2.EmbedRequest(texts=["warm-up"]), timeout=30)
            return
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def lines(result: dict) -> list[str]:
    out = [f"{'embeddings: mesh vs sentence-transformers':<42}{'n':>6}{'p50 ms':>10}{'p99 ms':>10}{'texts/s':>10}"
           f"  notes (the replica ran {result['precision']})"]
    for name in ("mesh_b1", "st_b1", "st_bf16_b1", "mesh_b32", "st_b32", "st_bf16_b32", "mesh_burst32"):
        row = result[name]
        notes = (f"{row['ratio_to_st']:.2f}x sentence-transformers (goal >= {result['goal_ratio']}), "
                 f"{row['ratio_to_st_bf16']:.2f}x its bfloat16" if "ratio_to_st" in row else "")
        out.append(f"{name:<42}{row['n']:>6}{row['p50_ms']:>10.3f}{row['p99_ms']:>10.3f}{row['texts_per_s']:>10.1f}"
                   f"  {notes}")
    return out
