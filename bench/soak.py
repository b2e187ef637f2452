"""`make soak`: minutes of steady mixed load through a mesh, watching for leaks. On demand, not in CI.

The mesh runs as `nlpmesh up` runs it (TLS at the gateway, mTLS inside, an API key, a
private Redis), with its caches bounded small enough to fill during the warm-up: the
inference service's prefix LRU (NLPMESH_INFERENCE_PREFIX_CACHE_BYTES) and Redis's
maxmemory. The client sends requests at a steady rate (open loop: a slow answer does not
slow the sending), ``--hit-ratio`` of them a small set of questions answered before the
clock starts (prompt-cache hits), the rest questions never asked before (short
generations). Every ``--sample-s`` it samples each process's RSS and open file
descriptors and the client latencies of that window.

It passes with no failed request, every process's RSS at the end within ``--rss-tolerance``
of its first sample after the warm-up, and each process's open file descriptors after
the warm-up within ``--fd-slack`` of each other. It prints a summary and writes
bench/results/soak-<timestamp>.json and .png (latency, RSS, RSS change, fds over time).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import redis
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from bench.cache_hits import generate_request
from cli.launcher import LocalMesh
from gateway.api_keys import create_key
from gateway.tenant import Tenant
from meshkit.percentile import percentile

RESULTS = Path(__file__).resolve().parent / "results"
HIT_QUESTIONS = [f"In one sentence, what is {topic}?" for topic in (
    "a bond", "a stock", "inflation", "a ledger", "an index fund", "liquidity", "a dividend", "a hedge",
    "credit risk", "an audit", "a budget", "interest", "a mortgage", "an option", "a futures contract", "a yield")]
# A miss: a tag of its own first, so that every prefix-KV block of the question is new (about
# five blocks of 16 tokens), and the prefix LRU and Redis fill up during the warm-up.
MISS_QUESTION = ("A regional bank wants to use machine learning for three things: flagging card fraud as "
                 "payments arrive, forecasting cash demand at its branches, and answering routine customer "
                 "questions in its app. Which one should it build first, and why?")
# Small enough to fill during the warm-up, so that what follows is the steady state.
SOAK_ENV = {"NLPMESH_INFERENCE_PREFIX_CACHE_BYTES": str(32 * 1024 * 1024)}
SOAK_REDIS_MAXMEMORY = "48mb"
MAX_IN_FLIGHT = 64  # past this many unanswered requests the mesh is not keeping up: counted as errors


def say(line: str) -> None:
    print(f"[soak] {line}", flush=True)


@dataclass
class Window:
    """What one sampling window saw."""

    at_s: float = 0.0  # when its sample was taken, seconds from the start
    hit_ms: list[float] = field(default_factory=list)
    miss_ms: list[float] = field(default_factory=list)
    errors: int = 0
    hits_missed: int = 0  # hit questions answered by a generation: Redis evicted their answers
    rss: dict[str, int] = field(default_factory=dict)
    fds: dict[str, int] = field(default_factory=dict)
    redis_used: int = 0  # Redis's used_memory, bytes
    redis_evicted: int = 0  # keys Redis evicted at maxmemory so far


def processes_of(mesh: LocalMesh) -> dict[str, psutil.Process]:
    pids = {name: process.pid for name, process in mesh.processes.items()}
    if mesh._redis is not None:
        pids["redis"] = mesh._redis.pid
    return {name: psutil.Process(pid) for name, pid in pids.items()}


def sample(window: Window, processes: dict[str, psutil.Process], redis_client: redis.Redis | None) -> None:
    for name, process in processes.items():
        window.rss[name] = process.memory_info().rss
        window.fds[name] = process.num_fds()
    if redis_client is not None:  # how full Redis is: its maxmemory bounds the prefix blocks and answers
        memory, stats = redis_client.info("memory"), redis_client.info("stats")
        window.redis_used = memory["used_memory"]
        window.redis_evicted = stats["evicted_keys"]


class Soak:
    def __init__(self, mesh: LocalMesh, args: argparse.Namespace):
        self.mesh, self.args = mesh, args
        self.choose = random.Random(args.seed)
        self.windows: list[Window] = []
        self.error_kinds: dict[str, int] = {}
        self.in_flight = 0
        self.processes = processes_of(mesh)
        self.redis = redis.Redis.from_url(mesh.resolved_redis_url) if mesh.resolved_redis_url else None

    async def prime(self, stub) -> None:
        """Every hit question answered and stored before the clock starts (a failure is tried again)."""
        for question in HIT_QUESTIONS:
            for attempt in range(5):
                try:
                    await stub.Generate(generate_request(question, self.args.max_new_tokens,
                                                         gateway_pb2.CACHE_MODE_REFRESH), timeout=120)
                    break
                except grpc.aio.AioRpcError as error:
                    say(f"priming: {error.code().name} ({error.details()}), trying again")
                    if attempt == 4:
                        raise
                    await asyncio.sleep(1.0)
        for question in HIT_QUESTIONS:
            for _ in range(100):
                reply = await stub.Generate(generate_request(question, self.args.max_new_tokens,
                                                             gateway_pb2.CACHE_MODE_USE), timeout=60)
                if reply.cache_hit:
                    break
                await asyncio.sleep(0.05)
            else:
                raise RuntimeError(f"{question!r} never became a cache hit: is the prompt cache up?")

    async def one(self, stub, hit: bool) -> None:
        question = self.choose.choice(HIT_QUESTIONS) if hit else f"({uuid.uuid4().hex[:8]}) {MISS_QUESTION}"
        request = generate_request(question, self.args.max_new_tokens, gateway_pb2.CACHE_MODE_USE)
        started = time.perf_counter()
        try:
            reply = await stub.Generate(request, timeout=self.args.timeout_s)
            window = self.windows[-1]  # the window in which the answer came
            if hit and not reply.cache_hit:
                window.hits_missed += 1  # answered all the same: its cached answer was evicted
            (window.hit_ms if reply.cache_hit else window.miss_ms).append((time.perf_counter() - started) * 1000)
        except grpc.aio.AioRpcError as error:
            kind = f"{error.code().name}: {error.details()}"
            self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
            self.windows[-1].errors += 1
        finally:
            self.in_flight -= 1

    async def run(self) -> None:
        async with self.mesh.gateway_access().aio_channel() as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            say(f"priming {len(HIT_QUESTIONS)} cached answers")
            await self.prime(stub)
            total = int(self.args.minutes * 60 * self.args.rate)
            say(f"{total} requests at {self.args.rate:g}/s for {self.args.minutes:g} min, "
                f"{100 * self.args.hit_ratio:.0f}% cache hits, misses of {self.args.max_new_tokens} new tokens")
            start = time.monotonic()
            self.windows.append(Window())
            tasks: set[asyncio.Task] = set()
            next_sample = start + self.args.sample_s
            for index in range(total):
                due = start + index / self.args.rate
                while True:
                    now = time.monotonic()
                    if now >= next_sample:
                        next_sample += self.args.sample_s
                        self.close_window(start)
                    elif now >= due:
                        break
                    else:
                        await asyncio.sleep(min(due, next_sample) - now)
                if self.in_flight >= MAX_IN_FLIGHT:
                    self.error_kinds["not keeping up"] = self.error_kinds.get("not keeping up", 0) + 1
                    self.windows[-1].errors += 1
                    continue
                self.in_flight += 1
                task = asyncio.create_task(self.one(stub, self.choose.random() < self.args.hit_ratio))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=self.args.timeout_s + 5)
            self.close_window(start)

    def close_window(self, start: float) -> None:
        done = self.windows[-1]
        done.at_s = time.monotonic() - start
        sample(done, self.processes, self.redis)
        self.windows.append(Window())
        hits = f"hit p50 {percentile(done.hit_ms, 50):.1f} ms" if done.hit_ms else "no hits"
        misses = f"miss p50 {percentile(done.miss_ms, 50):.0f} ms" if done.miss_ms else "no misses"
        rss = " ".join(f"{name} {rss / 2**20:.0f}" for name, rss in done.rss.items())
        say(f"{done.at_s:6.0f}s  {hits}, {misses}, errors {done.errors}, evicted hits {done.hits_missed}, "
            f"in flight {self.in_flight}; "
            f"RSS MiB {rss}; redis used {done.redis_used / 2**20:.0f} MiB, evicted {done.redis_evicted}")


def summarize(soak: Soak, args: argparse.Namespace) -> dict:
    windows = [w for w in soak.windows if w.rss]
    warm = [w for w in windows if w.at_s >= args.warmup_minutes * 60] or windows[-1:]
    hits = [ms for w in windows for ms in w.hit_ms]
    misses = [ms for w in windows for ms in w.miss_ms]
    errors = sum(w.errors for w in windows)
    per_process = {}
    for name in windows[0].rss:
        first, last = warm[0].rss[name], warm[-1].rss[name]
        fds_warm = [w.fds[name] for w in warm]
        per_process[name] = {
            "rss_first_after_warmup_mib": first / 2**20, "rss_last_mib": last / 2**20,
            "rss_change": last / first - 1, "rss_peak_after_warmup_mib": max(w.rss[name] for w in warm) / 2**20,
            "fd_min": min(w.fds[name] for w in windows), "fd_max": max(w.fds[name] for w in windows),
            "fd_min_after_warmup": min(fds_warm), "fd_max_after_warmup": max(fds_warm),
        }
        row = per_process[name]
        row["rss_ok"] = abs(row["rss_change"]) <= args.rss_tolerance
        row["fds_ok"] = row["fd_max_after_warmup"] - row["fd_min_after_warmup"] <= args.fd_slack
    sent = len(hits) + len(misses) + errors
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "settings": vars(args) | {"env": SOAK_ENV,
                                                                           "redis_maxmemory": SOAK_REDIS_MAXMEMORY},
        "requests": sent, "errors": errors, "error_kinds": soak.error_kinds,
        "hits_missed": sum(w.hits_missed for w in windows),
        "achieved_rate": sent / (windows[-1].at_s or 1),
        "hit_ms": _latency(hits), "miss_ms": _latency(misses), "timeout_ms": args.timeout_s * 1000,
        "processes": per_process,
        "passed": errors == 0 and all(r["rss_ok"] and r["fds_ok"] for r in per_process.values()),
        "redis_used_mib_last": windows[-1].redis_used / 2**20, "redis_evicted_keys": windows[-1].redis_evicted,
        "windows": [{"at_s": w.at_s, "hit_ms": _latency(w.hit_ms), "miss_ms": _latency(w.miss_ms),
                     "errors": w.errors, "hits_missed": w.hits_missed, "rss": w.rss, "fds": w.fds,
                     "redis_used": w.redis_used, "redis_evicted": w.redis_evicted} for w in windows],
    }


def _latency(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99), "max": max(values)}


def summary_lines(result: dict) -> list[str]:
    lines = [f"requests {result['requests']} ({result['achieved_rate']:.1f}/s), errors {result['errors']} "
             f"{result['error_kinds'] or ''}; hit questions answered by a generation (answer evicted from "
             f"Redis): {result['hits_missed']}"]
    for kind in ("hit_ms", "miss_ms"):
        row = result[kind]
        if row["n"]:
            lines.append(f"{kind[:-3]:<5} n={row['n']:<6} p50 {row['p50']:8.1f} ms  p99 {row['p99']:8.1f} ms  "
                         f"max {row['max']:8.1f} ms")
    lines.append(f"{'process':<10}{'RSS after warm-up':>19}{'last':>10}{'change':>9}{'peak':>10}"
                 f"{'fds min-max':>13}{'after warm-up':>15}")
    for name, row in result["processes"].items():
        mark = "" if row["rss_ok"] and row["fds_ok"] else "  FAIL"
        lines.append(f"{name:<10}{row['rss_first_after_warmup_mib']:>15.1f} MiB{row['rss_last_mib']:>10.1f}"
                     f"{100 * row['rss_change']:>+8.1f}%{row['rss_peak_after_warmup_mib']:>10.1f}"
                     f"{row['fd_min']:>7}-{row['fd_max']:<5}{row['fd_min_after_warmup']:>9}-"
                     f"{row['fd_max_after_warmup']:<5}{mark}")
    lines.append(f"redis used_memory at the end {result['redis_used_mib_last']:.1f} MiB "
                 f"(maxmemory {SOAK_REDIS_MAXMEMORY}), {result['redis_evicted_keys']} keys evicted")
    lines.append("PASSED" if result["passed"] else "FAILED")
    return lines


def plot(result: dict, path: Path, warmup_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = result["windows"]
    minutes = [w["at_s"] / 60 for w in windows]
    figure, (latency, rss, change, fds) = plt.subplots(4, 1, figsize=(12, 13), sharex=True)
    figure.suptitle(f"nlpmesh soak {result['when']}: {result['requests']} requests, {result['errors']} errors, "
                    f"{'PASSED' if result['passed'] else 'FAILED'}")
    for kind, style in (("hit_ms", "tab:green"), ("miss_ms", "tab:red")):
        for stat, line in (("p50", "-"), ("p99", ":")):
            points = [(m, w[kind][stat]) for m, w in zip(minutes, windows) if w[kind]["n"]]
            latency.plot(*zip(*points), line, color=style, label=f"{kind[:-3]} {stat}")
    failed = [(m, w["errors"]) for m, w in zip(minutes, windows) if w["errors"]]
    if failed:
        latency.scatter([m for m, _ in failed], [result["timeout_ms"]] * len(failed), marker="x", color="black",
                        label="window with errors")
    latency.set_yscale("log")
    latency.set_ylabel("client latency, ms (log)")
    latency.set_title("latency per window (cache hits vs generated answers)")
    names = list(result["processes"])
    for name in names:
        rss.plot(minutes, [w["rss"][name] / 2**20 for w in windows], label=name)
        first = result["processes"][name]["rss_first_after_warmup_mib"]
        change.plot(minutes, [100 * (w["rss"][name] / 2**20 / first - 1) for w in windows], label=name)
        fds.plot(minutes, [w["fds"][name] for w in windows], label=name)
    if any(w["redis_used"] for w in windows):
        rss.plot(minutes, [w["redis_used"] / 2**20 for w in windows], "--", color="0.4",
                 label=f"redis used_memory\n(maxmemory {SOAK_REDIS_MAXMEMORY})")
    rss.set_yscale("log")
    rss.set_ylabel("RSS, MiB (log)")
    rss.set_title("resident memory per process")
    tolerance = 100 * result["settings"]["rss_tolerance"]
    change.axhspan(-tolerance, tolerance, color="0.9", label=f"±{tolerance:.0f}% (pass band)")
    change.set_ylim(-3 * tolerance, 3 * tolerance)
    change.set_ylabel("RSS change, % of first\nsample after warm-up")
    change.set_title("RSS change (must end inside the band)")
    fds.set_ylabel("open file descriptors")
    fds.set_xlabel("minutes")
    for axis in (latency, rss, change, fds):
        axis.axvline(warmup_s / 60, color="0.5", linestyle="--", linewidth=1, label="end of warm-up")
        axis.grid(True, alpha=0.3)
        axis.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=2.0,
                        help="requests per second, steady (20%% of them generations: this 2-core machine "
                             "generates about 1.6 short answers a second at most, fewer for these prompts)")
    parser.add_argument("--hit-ratio", type=float, default=0.8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--warmup-minutes", type=float, default=2.0)
    parser.add_argument("--timeout-s", type=float, default=30.0, help="each request's deadline")
    parser.add_argument("--rss-tolerance", type=float, default=0.05)
    parser.add_argument("--fd-slack", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="nlpmesh-soak-"))
    keys_file = run_dir / "keys.toml"
    _, api_key = create_key(keys_file, Tenant("soak"))
    mesh = LocalMesh(run_dir, free_ports=True, tls=True, certs_dir=run_dir / "certs", keys_file=keys_file,
                     api_key=api_key, extra_env=SOAK_ENV, redis_maxmemory=SOAK_REDIS_MAXMEMORY, progress=say)
    mesh.start()
    try:
        soak = Soak(mesh, args)
        asyncio.run(soak.run())
    finally:
        mesh.stop()
    result = summarize(soak, args)
    for line in summary_lines(result):
        print(line)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"soak-{time.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, stem.with_suffix(".png"), args.warmup_minutes * 60)
    say(f"written {stem}.json and {stem}.png")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
