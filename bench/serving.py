"""What callers see under real traffic: a burst, and Poisson arrivals at several rates, through the gateway.

    python -m bench.serving                  # a mesh of its own (the default model); or part of `make bench`

It follows vLLM's ``benchmark_serving`` and the goodput of the DistServe and Sarathi papers:

- **burst**: 8 greedy streams of 64 new tokens (short chat prompts) submitted at once: tok/s in all from
  submission to the last token, each stream's first token (TTFT) from submission, the latest first token
  over the earliest, and the gaps between tokens of all streams pooled (p50, p99);
- **load**: requests arrive as a Poisson process (seeded, so every run sends the same requests) at fixed
  fractions of the rate the mesh can serve (its *capacity*, measured first: requests per second completed
  by 8 callers in a closed loop over the same mix), so the 1.5x point exists on any machine. The mix:
  short chats, the finance template (about 155 prompt tokens), and chats of 300 and 1,000 prompt tokens,
  32 new tokens each, the prompt cache bypassed. Each request has its own deadline, sent as ``budget_ms``:
  ``SLACK`` times what its kind takes alone on an idle mesh (measured first). Per rate: throughput (tok/s,
  req/s), TTFT p50/p90/p99, inter-token p50/p99, end-to-end p50/p99, the status codes, and **goodput**:
  the share, and the rate, of requests answered OK within their deadline;
- the same burst and the same arrivals (same times, prompts of the same token lengths, same deadlines) on
  transformers' ``generate`` in a process of its own, batching the requests that have arrived whenever
  it is free (bench/hf_generate.py ``serve_load``), and, where llama-cpp-python is installed, on llama.cpp
  with the model's own GGUF, one request at a time as its server runs them (bench/llama_cpp.py ``serve_load``).

Every loop is bounded in count and time, and traffic goes to loopback only. The JSON goes into the bench
results; the plot of goodput and TTFT p99 against the offered rate goes to docs/img/serving.png.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf import struct_pb2
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from transformers import AutoTokenizer

from bench import llama_cpp
from bench.generation import LONG_TEXT, chat_ids, question
from bench.hf_generate import HfGenerate
from bench.llama_cpp import LlamaCpp
from cli.launcher import LocalMesh
from meshkit.percentile import percentile
from meshkit.settings import default_home
from modelfiles.convert import default_model_id, load_model_files
from services.inference.settings import InferenceSettings

PLOT = Path(__file__).resolve().parent.parent / "docs" / "img" / "serving.png"
BURST_STREAMS, BURST_NEW_TOKENS = 8, 64
BURST_DEADLINE_S = 60.0  # the budget policy's default total: the burst measures speed, not deadlines
NEW_TOKENS = 32
# (kind, share of the mix, prompt tokens or None for a short chat / the finance template)
MIX = (("chat", 0.4, None), ("finance", 0.3, None), ("chat_300", 0.2, 300), ("chat_1000", 0.1, 1000))
SLACK = 3.0  # a request's deadline: this many times what its kind takes alone
RATE_FRACTIONS = (0.25, 0.5, 1.0, 1.5)
CAPACITY_CALLERS = 8


def say(line: str) -> None:
    print(f"[bench] {line}", flush=True)


@dataclass
class Outcome:
    """One request as its caller saw it; times in seconds from its submission."""
    kind: str
    deadline_s: float
    status: str = "OK"
    error: str = ""  # the status message of a failure (counts and times only: no prompt or answer text)
    ttft_s: float | None = None
    e2e_s: float | None = None
    tokens: int = 0
    gaps_s: list[float] = field(default_factory=list)

    @property
    def good(self) -> bool:
        return self.status == "OK" and self.e2e_s is not None and self.e2e_s <= self.deadline_s


@dataclass(frozen=True)
class Request:
    kind: str
    index: int
    prompt_tokens: int | None  # a chat of this many tokens of text; None: a short chat or the template


def request_pb(request: Request, max_new_tokens: int, budget_ms: int) -> gateway_pb2.GenerateRequest:
    """The request through the gateway: unique text each (so no answer comes from a cache), greedy."""
    sampling = gateway_pb2.SamplingParams(max_new_tokens=max_new_tokens)
    common = dict(sampling=sampling, cache_mode=gateway_pb2.CACHE_MODE_BYPASS, budget_ms=budget_ms)
    if request.kind == "finance":
        variables = struct_pb2.Struct()
        variables.update({"question": f"Question {request.index}: how do bond prices react when rates rise?"})
        return gateway_pb2.GenerateRequest(
            template=gateway_pb2.TemplateCall(id="finance_question", variables=variables), **common)
    return gateway_pb2.GenerateRequest(
        chat=gateway_pb2.Chat(messages=[gateway_pb2.ChatMessage(role="user", content=text_of(request))]), **common)


def text_of(request: Request) -> str:
    if request.prompt_tokens is None:
        return f"{question(request.index)} (request {request.index})"
    words = LONG_TEXT.split()
    start = (request.index * 37) % max(len(words) - 2 * request.prompt_tokens, 1)
    # about 0.75 words a token: the window's text comes to about prompt_tokens tokens
    return " ".join(words[start: start + int(request.prompt_tokens * 0.75)])


def call(stub, request: Request, max_new_tokens: int, deadline_s: float) -> Outcome:
    """One GenerateStream through the gateway, timed from submission; a failure is counted by its status."""
    outcome = Outcome(request.kind, deadline_s)
    started = last = time.perf_counter()
    try:
        stream = stub.GenerateStream(request_pb(request, max_new_tokens, int(deadline_s * 1000)),
                                     timeout=deadline_s + 30)
        for chunk in stream:
            now = time.perf_counter()
            if chunk.delta:
                if outcome.ttft_s is None:
                    outcome.ttft_s = now - started
                else:
                    outcome.gaps_s.append(now - last)
                last = now
            if chunk.done:
                outcome.tokens = chunk.usage.completion_tokens
        outcome.e2e_s = time.perf_counter() - started
    except grpc.RpcError as error:
        outcome.status, outcome.error = error.code().name, error.details() or ""
    return outcome


def run_arrivals(stub, plan: list[tuple[float, Request]], deadlines: dict[str, float], max_new_tokens: int,
                 limit_s: float) -> tuple[list[Outcome], float]:
    """Sends each request at its arrival time (seconds from now), one thread each; waits for all (bounded)."""
    outcomes: list[Outcome | None] = [None] * len(plan)
    threads = []
    start = time.perf_counter()

    def one(slot: int, request: Request) -> None:
        outcomes[slot] = call(stub, request, max_new_tokens, deadlines[request.kind])

    for slot, (at, request) in enumerate(plan):
        if at > limit_s:
            break
        time.sleep(max(at - (time.perf_counter() - start), 0))
        thread = threading.Thread(target=one, args=(slot, request), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(timeout=max(deadlines.values()) + 60)
    elapsed = time.perf_counter() - start
    return [outcome for outcome in outcomes if outcome is not None], elapsed


def poisson_plan(rate: float, count: int, seed: int) -> list[tuple[float, Request]]:
    """``count`` requests of the mix arriving as a Poisson process of ``rate`` a second (seeded)."""
    rng = random.Random(seed)
    kinds = [kind for kind, _, _ in MIX]
    weights = [share for _, share, _ in MIX]
    tokens = {kind: prompt for kind, _, prompt in MIX}
    at, plan = 0.0, []
    for index in range(count):
        kind = rng.choices(kinds, weights)[0]
        plan.append((at, Request(kind, seed * 1000 + index, tokens[kind])))
        at += rng.expovariate(rate)
    return plan


def summarise(outcomes: list[Outcome], elapsed_s: float) -> dict:
    ok = [outcome for outcome in outcomes if outcome.status == "OK"]
    statuses: dict[str, int] = {}
    for outcome in outcomes:
        statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
    good = sum(outcome.good for outcome in outcomes)
    errors: dict[str, list[str]] = {}  # a few messages of each failure status, to tell refusals from timeouts
    for outcome in outcomes:
        if outcome.error and len(errors.setdefault(outcome.status, [])) < 3:
            errors[outcome.status].append(outcome.error)

    def ms(values: list[float], *quantiles: int) -> dict:
        return {f"p{q}_ms": percentile(values, q) * 1000 for q in quantiles} if values else {}

    return {
        "requests": len(outcomes), "seconds": elapsed_s, "statuses": statuses, "errors": errors,
        "throughput_tok_s": sum(outcome.tokens for outcome in ok) / elapsed_s,
        "throughput_req_s": len(ok) / elapsed_s,
        "ttft": ms([o.ttft_s for o in ok if o.ttft_s is not None], 50, 90, 99),
        "inter_token": ms([gap for o in ok for gap in o.gaps_s], 50, 99),
        "e2e": ms([o.e2e_s for o in ok], 50, 99),
        "goodput_share": good / len(outcomes) if outcomes else 0.0,
        "goodput_req_s": good / elapsed_s,
    }


def burst(stub, rounds: int) -> dict:
    """8 streams at once, ``rounds`` times; each figure's median over the rounds."""
    runs = []
    for index in range(rounds):
        plan = [(0.0, Request("chat", index * 100 + stream, None)) for stream in range(BURST_STREAMS)]
        outcomes, elapsed = run_arrivals(stub, plan, {"chat": BURST_DEADLINE_S}, BURST_NEW_TOKENS, 1.0)
        failed = [f"{outcome.status}: {outcome.error}" for outcome in outcomes if outcome.status != "OK"]
        if failed:
            raise RuntimeError(f"burst: {len(failed)} of {BURST_STREAMS} streams failed ({'; '.join(failed)})")
        runs.append(burst_figures(outcomes, elapsed))
        say(f"burst {index + 1}/{rounds}: {runs[-1]['tok_s']:.0f} tok/s, latest first token "
            f"{runs[-1]['ttft_last_over_first']:.1f}x the earliest")
    return {name: statistics.median(run[name] for run in runs) for name in runs[0]} | {"rounds": rounds}


def burst_figures(outcomes: list[Outcome], elapsed_s: float) -> dict:
    ttfts = sorted(outcome.ttft_s for outcome in outcomes)
    gaps = [gap for outcome in outcomes for gap in outcome.gaps_s]
    p50, p99 = percentile(gaps, 50), percentile(gaps, 99)
    return {"tok_s": sum(outcome.tokens for outcome in outcomes) / elapsed_s,
            "ttft_first_ms": ttfts[0] * 1000, "ttft_last_ms": ttfts[-1] * 1000,
            "ttft_last_over_first": ttfts[-1] / ttfts[0],
            "inter_token_p50_ms": p50 * 1000, "inter_token_p99_ms": p99 * 1000, "inter_token_p99_over_p50": p99 / p50}


def alone_seconds(stub) -> dict[str, float]:
    """What each kind of request takes alone on the idle mesh (median of 3, unique prompts)."""
    taken = {}
    for kind, _, prompt in MIX:
        times = []
        for index in range(3):
            outcome = call(stub, Request(kind, 900_000 + index, prompt), NEW_TOKENS, BURST_DEADLINE_S)
            if outcome.status != "OK":
                raise RuntimeError(f"a {kind} request alone failed: {outcome.status}")
            times.append(outcome.e2e_s)
        taken[kind] = statistics.median(times)
    return taken


def capacity_rps(stub, deadlines: dict[str, float], seconds: float) -> float:
    """Requests per second completed by CAPACITY_CALLERS callers in a closed loop over the mix."""
    plan = poisson_plan(1.0, 10_000, seed=7)
    done, lock, stop = [0], threading.Lock(), time.perf_counter() + seconds
    cursor = iter(plan)

    def caller() -> None:
        while time.perf_counter() < stop:
            with lock:
                _, request = next(cursor)
            if call(stub, request, NEW_TOKENS, BURST_DEADLINE_S).status == "OK":
                with lock:
                    done[0] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=caller, daemon=True) for _ in range(CAPACITY_CALLERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 120)
    return done[0] / (time.perf_counter() - started)


def hf_tokens(tokenizer, plan: list[tuple[float, Request]]) -> list[dict]:
    """The same arrivals for generate: each prompt of the same kind and about the same token length."""
    finance = chat_ids(tokenizer, " ".join(LONG_TEXT.split()[:110]))  # about the template's 155 tokens
    out = []
    for at, request in plan:
        ids = finance if request.kind == "finance" else chat_ids(tokenizer, text_of(request))
        out.append({"at": at, "prompt": ids})
    return out


def hf_outcomes(hf: HfGenerate | LlamaCpp, tokenizer, plan, deadlines: dict[str, float], max_new_tokens: int,
                limit_s: float) -> tuple[list[Outcome], float]:
    """A baseline's outcomes for ``plan``: transformers' generate, or llama.cpp (the same token ids)."""
    answer = hf.serve_load(hf_tokens(tokenizer, plan), max_new_tokens, limit_s)
    outcomes = []
    for (_, request), row in zip(plan, answer["requests"]):
        outcome = Outcome(request.kind, deadlines[request.kind])
        if row is None:
            outcome.status = "NOT_SERVED"  # still waiting when the run's time was up
        else:
            outcome.ttft_s, outcome.e2e_s, outcome.tokens, outcome.gaps_s = (
                row["ttft_s"], row["e2e_s"], row["tokens"], row["gaps_s"])
        outcomes.append(outcome)
    return outcomes, answer["seconds"]


def bench(mesh: LocalMesh, requests_per_rate: int = 32, rate_limit_s: float = 45.0, burst_rounds: int = 3,
          capacity_s: float = 20.0, plot: Path | None = PLOT) -> dict:
    model = default_model_id()
    settings = InferenceSettings()
    tokenizer = AutoTokenizer.from_pretrained(load_model_files(default_home(), model).path)
    say(f"serving: transformers' generate in a process of its own ({settings.dtype}), as the baseline")
    hf = HfGenerate(settings.dtype, settings.threads, model)
    llama = None
    if llama_cpp.available(model):
        say("serving: llama.cpp in a process of its own (its GGUF, one request at a time), as a baseline")
        llama = LlamaCpp(settings.threads, model)
    baselines = {"hf_generate": hf, **({"llama_cpp": llama} if llama else {})}
    try:
        with mesh.gateway_access().channel() as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            call(stub, Request("chat", 999_999, None), 4, BURST_DEADLINE_S)  # warm
            say("serving: each kind of request alone, for the deadlines")
            alone = alone_seconds(stub)
            deadlines = {kind: SLACK * seconds for kind, seconds in alone.items()}
            say("serving: " + ", ".join(f"{kind} {alone[kind] * 1000:.0f} ms alone, deadline {deadlines[kind]:.2f} s"
                                        for kind in alone))
            say(f"serving: a burst of {BURST_STREAMS} streams of {BURST_NEW_TOKENS} tokens, {burst_rounds} rounds")
            mesh_burst = burst(stub, burst_rounds)
            hf_burst_plan = [(0.0, Request("chat", stream, None)) for stream in range(BURST_STREAMS)]
            baseline_bursts = {name: burst_figures(*hf_outcomes(engine, tokenizer, hf_burst_plan,
                                                                {"chat": BURST_DEADLINE_S}, BURST_NEW_TOKENS, 600))
                               for name, engine in baselines.items()}
            say(f"serving: capacity: {CAPACITY_CALLERS} callers in a closed loop for {capacity_s:.0f} s")
            capacity = capacity_rps(stub, deadlines, capacity_s)
            say(f"serving: capacity {capacity:.2f} req/s")
            rates = []
            for fraction in RATE_FRACTIONS:
                rate = fraction * capacity
                plan = poisson_plan(rate, requests_per_rate, seed=int(fraction * 100))
                say(f"serving: {rate:.2f} req/s ({fraction}x capacity), {len(plan)} requests: the mesh")
                outcomes, elapsed = run_arrivals(stub, plan, deadlines, NEW_TOKENS, rate_limit_s)
                row = {"fraction_of_capacity": fraction, "rate_req_s": rate, "mesh": summarise(outcomes, elapsed)}
                sent = plan[:row["mesh"]["requests"]]
                for name, engine in baselines.items():
                    say(f"serving: ... {name}, the same arrivals")
                    row[name] = summarise(*hf_outcomes(engine, tokenizer, sent, deadlines, NEW_TOKENS,
                                                       rate_limit_s + 60))
                say("serving: goodput " + ", ".join(f"{100 * row[name]['goodput_share']:.0f}% ({name})"
                                                    for name in ("mesh", *baselines)))
                rates.append(row)
    finally:
        hf.close()
        if llama is not None:
            llama.close()
    peak = max(row["mesh"]["goodput_req_s"] for row in rates)
    result = {
        "model": model, "slack": SLACK, "alone_s": alone, "deadlines_s": deadlines, "capacity_req_s": capacity,
        "burst": mesh_burst, **{f"burst_{name}": figures for name, figures in baseline_bursts.items()}, "rates": rates,
        "goodput_at_1_5x_over_peak": next(row["mesh"]["goodput_req_s"] for row in rates
                                          if row["fraction_of_capacity"] == 1.5) / peak if peak else 0.0,
    }
    if plot is not None:
        write_plot(result, plot)
        say(f"serving: plot written to {plot}")
    return result


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    rates = result["rates"]
    offered = [row["rate_req_s"] for row in rates]
    figure, (goodput, ttft) = pyplot.subplots(1, 2, figsize=(10, 4))
    for name, label in (("mesh", "nlpmesh (gateway)"), ("hf_generate", "transformers generate"),
                        ("llama_cpp", "llama.cpp, one at a time")):
        if name not in rates[0]:
            continue
        goodput.plot(offered, [100 * row[name]["goodput_share"] for row in rates], marker="o", label=label)
        ttft.plot(offered, [row[name]["ttft"].get("p99_ms", float("nan")) / 1000 for row in rates], marker="o",
                  label=label)
    goodput.set(xlabel="offered load (requests/s)", ylabel="requests within their deadline (%)",
                title="Goodput", ylim=(0, 105))
    ttft.set(xlabel="offered load (requests/s)", ylabel="time to first token, p99 (s)", title="TTFT p99")
    for axes in (goodput, ttft):
        axes.axvline(result["capacity_req_s"], color="grey", linestyle=":", label="measured capacity")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(f"{result['model']}: Poisson arrivals, mixed prompts, deadlines {result['slack']:g}x alone")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def lines(result: dict) -> list[str]:
    b = result["burst"]
    out = [f"serving ({result['model']}): burst of {BURST_STREAMS} x {BURST_NEW_TOKENS} tokens: "
           f"{b['tok_s']:.0f} tok/s, "
           f"first tokens {b['ttft_first_ms']:.0f}..{b['ttft_last_ms']:.0f} ms ({b['ttft_last_over_first']:.1f}x), "
           f"inter-token p99 {b['inter_token_p99_over_p50']:.1f}x p50; generate: "
           f"{result['burst_hf_generate']['tok_s']:.0f} tok/s"
           + (f"; llama.cpp: {result['burst_llama_cpp']['tok_s']:.0f} tok/s" if "burst_llama_cpp" in result else ""),
           f"capacity {result['capacity_req_s']:.2f} req/s; goodput at 1.5x: "
           f"{100 * result['goodput_at_1_5x_over_peak']:.0f}% of peak",
           f"{'rate':>8}{'x cap':>7}{'good %':>8}{'good/s':>8}{'tok/s':>8}{'TTFT p50/p99 ms':>18}{'ITL p99':>9}"
           f"{'E2E p99':>9}   generate good %" + ("   llama.cpp good %" if "llama_cpp" in result["rates"][0] else "")]
    for row in result["rates"]:
        mesh = row["mesh"]
        out.append(f"{row['rate_req_s']:>8.2f}{row['fraction_of_capacity']:>7.2f}{100 * mesh['goodput_share']:>8.0f}"
                   f"{mesh['goodput_req_s']:>8.2f}{mesh['throughput_tok_s']:>8.0f}"
                   f"{mesh['ttft'].get('p50_ms', 0):>9.0f}/{mesh['ttft'].get('p99_ms', 0):<8.0f}"
                   f"{mesh['inter_token'].get('p99_ms', 0):>9.0f}{mesh['e2e'].get('p99_ms', 0):>9.0f}"
                   f"   {100 * row['hf_generate']['goodput_share']:>15.0f}"
                   + (f"   {100 * row['llama_cpp']['goodput_share']:>16.0f}" if "llama_cpp" in row else ""))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving")
    parser.add_argument("--requests", type=int, default=32, help="requests at each rate")
    parser.add_argument("--burst-rounds", type=int, default=3)
    args = parser.parse_args()
    mesh = LocalMesh(Path(tempfile.mkdtemp(prefix="nlpmesh-serving-")), free_ports=True, progress=say,
                     models=(default_model_id(),))
    mesh.start()
    try:
        result = bench(mesh, requests_per_rate=args.requests, burst_rounds=args.burst_rounds)
    finally:
        mesh.stop()
    print("\n".join(lines(result)))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
