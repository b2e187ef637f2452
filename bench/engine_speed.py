"""The engine's own speed (issue 12), every variant beside its baseline in one run, rounds interleaved:

- decode tok/s at 1, 4 and 8 streams: the engine alone in this process (no gRPC,
  prefix cache off), the engine through the gateway (the mesh's inference service),
  and transformers' ``generate`` on the same weights in this process. generate's
  figure is decode only (its prefill timed apart and taken off), so the engine's
  and the gateway's are too: tokens arriving while every stream decodes, from the
  last stream's first token to the first stream's last (``steady_tok_s``). The
  figure from the first stream's first token on (chunked prefills of the later
  streams included) is kept in the JSON as ``aggregate``;
- the engine's decode step split into forward, sampling and text, and delivery
  (its own ``step_times``), by batch size;
- with ``--baseline-tree``: decode tok/s at 1 and 8 streams of another checkout's engine
  (the tree before a change), each engine in a process of its own importing its own
  tree's code (bench/engine_decode_worker.py), rounds interleaved with this tree's;
  the ratio to it, and a same-code noise floor (a second process of this tree's);
- prefill beside decode: a running stream's gaps between tokens while a
  1,000-token prompt is admitted beside it: chunked with a chunk's layers spread
  over turns at a few ``prefill_share`` (the default among them), in whole
  chunks (``prefill_share`` 0: the token budget alone), and in one forward
  (``max_batched_tokens`` 0), against the same stream's median gap alone; and
  the long prompt's time to first token.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from nlpmesh.gateway.v1 import gateway_pb2_grpc

from bench import generation, llama_cpp
from bench.generation import STREAMS, StreamTimes, bypass_request, chat_ids, question, rate_summary
from bench.hf_generate import HfGenerate
from bench.worker_process import WorkerProcess
from cli.launcher import LocalMesh
from cli.topology import REPO_ROOT
from meshkit.percentile import percentile
from meshkit.response_format import ResponseFormat
from meshkit.sampling import Sampling
from meshkit.settings import default_home
from modelfiles.convert import load_model_files
from services.inference.engine import Engine, EngineOptions
from services.inference.generation_types import Delta, GenerationRequest
from services.inference.loading import load_model
from services.inference.precision import model_precision
from services.inference.settings import InferenceSettings
from services.inference.threads import in_thread_that_ends

LONG_PROMPT_TOKENS = 1000
RUNNING_STREAM_TOKENS = 96
ADMIT_AFTER_TOKENS = 12  # the long prompt arrives once the running stream has this many
STALL_SHARES = (1, 1.5)  # prefill_share compared (with the default, 0: whole chunks, and one forward)
BASELINE_STREAMS = (1, 8)  # decode compared with a baseline checkout's engine at these stream counts
DECODE_WORKER = Path(__file__).resolve().parent / "engine_decode_worker.py"


def say(line: str) -> None:
    print(f"[bench] {line}", flush=True)


def bench(mesh: LocalMesh, rounds: int, max_new_tokens: int, baseline: Path | None = None) -> dict:
    settings = InferenceSettings()
    say(f"loading the model in-process ({settings.dtype}) for the engine, and in a process of its own for generate")
    torch.set_num_threads(settings.threads)
    # Loaded in a thread that ends: the engine's worker then owns this process's only OpenMP team, as in
    # the inference service (services/inference/threads.py); generate runs in a process of its own.
    model, tokenizer = in_thread_that_ends(lambda: load_model(load_model_files(default_home()), settings.dtype))
    precision = model_precision(model)  # what auto chose on this CPU; generate gets the same
    say(f"precision {precision} (NLPMESH_INFERENCE_DTYPE={settings.dtype})")
    options = settings.engine_options()
    engine = Engine(model, tokenizer, options)
    hf = HfGenerate(precision, settings.threads)
    trees = start_trees(baseline, precision) if baseline is not None else {}
    try:
        decode = bench_decode(mesh, engine, hf, tokenizer, rounds, max_new_tokens, trees)
        steps = step_split(engine)
        worker_threads = engine.worker_threads
    finally:
        engine.close()
        hf.close()
        for tree in trees.values():
            tree.close()
    variants = {f"chunked_share_{share:g}": dataclasses.replace(options, prefill_share=share)
                for share in sorted({options.prefill_share, *STALL_SHARES} - {0})}
    # The default, but its KV buffers dropped whenever it is idle, so each long prompt grows them again.
    variants["kv_regrown_each_prompt"] = dataclasses.replace(options, kv_shrink_idle_s=0)
    variants["whole_chunks"] = dataclasses.replace(options, prefill_share=0)  # the token budget alone
    variants["one_forward"] = dataclasses.replace(options, max_batched_tokens=0)
    stall = bench_prefill_stall(lambda options: Engine(model, tokenizer, options), variants, tokenizer, rounds)
    result = {"precision": precision, "threads": settings.threads, "worker_torch_threads": worker_threads,
              "max_batched_tokens": options.max_batched_tokens, "prefill_share": options.prefill_share,
              "decode": decode.pop("decode"), "step_ms": steps,
              "prefill_stall": stall}
    if baseline is not None:
        result["decode_vs_baseline"] = {"source": str(baseline), **decode["vs_baseline"]}
    return result


# -- another checkout's engine --------------------------------------------------------


class EngineOfTree(WorkerProcess):
    """A checkout's engine in a process of its own (bench/engine_decode_worker.py), that checkout's
    packages first on its path: the worker file comes from this tree, everything it imports from ``tree``."""

    def __init__(self, tree: Path):
        tree = tree.resolve()
        gen = tree / "gen" if (tree / "gen").is_dir() else REPO_ROOT / "gen"  # the protos, where it has none
        env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(tree), str(gen)))}
        self._name = f"the engine of {tree}"
        # -c: the working directory (the tree) leads sys.path, as a plain checkout's own run would have it.
        self._process = subprocess.Popen(
            [sys.executable, "-c", "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')",
             str(DECODE_WORKER)], cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def streams(self, prompts: list[list[int]], max_new_tokens: int) -> list[Arrivals]:
        result = []
        for times, tokens in self.ask(op="streams", prompts=prompts, max_new_tokens=max_new_tokens):
            arrivals = Arrivals(times)
            arrivals.tokens = tokens
            result.append(arrivals)
        return result


def start_trees(baseline: Path, precision: str) -> dict[str, EngineOfTree]:
    """The baseline checkout's engine, this tree's in the same way, and this tree's again (the noise floor),
    each loaded and warm; each must have chosen the precision this process did."""
    trees = {"baseline": EngineOfTree(baseline), "this_tree": EngineOfTree(REPO_ROOT),
             "this_tree_again": EngineOfTree(REPO_ROOT)}
    try:
        for name, tree in trees.items():
            chosen = tree.ask(op="describe")
            say(f"engine of {name} in a process of its own: precision {chosen}")
            if chosen != precision:
                raise RuntimeError(f"the engine of {name} chose precision {chosen}, this process {precision}")
    except BaseException:
        for tree in trees.values():
            tree.close()
        raise
    return trees


# -- decode -------------------------------------------------------------------------


def bench_decode(mesh: LocalMesh, engine: Engine, hf: HfGenerate, tokenizer, rounds: int, max_new_tokens: int,
                 trees: dict[str, EngineOfTree]) -> dict:
    """{"decode": figures by stream count, "vs_baseline": the checkouts' figures (with ``trees`` only)}."""
    prompts = [chat_ids(tokenizer, question(index)) for index in range(max(STREAMS))]
    llama = None
    if llama_cpp.available():
        threads = InferenceSettings().threads
        say(f"llama.cpp side by side, in a process of its own: {llama_cpp.gguf_path().name}, {threads} threads")
        llama = llama_cpp.LlamaCpp(threads=threads)
        llama.decode_tok_s(prompts[0], max_new_tokens)  # warm
    else:
        say("llama.cpp side by side skipped: llama-cpp-python is not installed (see bench/llama_cpp.py)")
    try:
        samples = decode_rounds(mesh, engine, hf, prompts, llama, rounds, max_new_tokens, trees)
    finally:
        if llama is not None:
            llama.close()
    result = {}
    for streams in STREAMS:
        hf = statistics.median(samples[f"hf_{streams}"])
        result[f"{streams}_streams"] = {
            "engine_tok_s": rate_summary(samples[f"engine_{streams}"]),
            "gateway_tok_s": rate_summary(samples[f"gateway_{streams}"]),
            "hf_generate_tok_s": rate_summary(samples[f"hf_{streams}"]),
            "engine_ratio_to_hf": statistics.median(samples[f"engine_{streams}"]) / hf,
            "gateway_ratio_to_hf": statistics.median(samples[f"gateway_{streams}"]) / hf,
            "engine_aggregate_tok_s": rate_summary(samples[f"engine_{streams}_aggregate"]),
            "gateway_aggregate_tok_s": rate_summary(samples[f"gateway_{streams}_aggregate"]),
        }
        if f"llama_cpp_{streams}" in samples:  # one stream: llama.cpp decodes one sequence
            llama_tok_s = statistics.median(samples[f"llama_cpp_{streams}"])
            result[f"{streams}_streams"] |= {
                "llama_cpp_tok_s": rate_summary(samples[f"llama_cpp_{streams}"]),
                "engine_ratio_to_llama_cpp": statistics.median(samples[f"engine_{streams}"]) / llama_tok_s,
                "gateway_ratio_to_llama_cpp": statistics.median(samples[f"gateway_{streams}"]) / llama_tok_s,
            }
    return {"decode": result, "vs_baseline": vs_baseline(samples) if trees else {}}


def vs_baseline(samples: dict[str, list[float]]) -> dict:
    """Per stream count: each checkout's decode tok/s, this tree's over the baseline's (p50s), and this
    tree's second process over its first: the same code, so what the ratio to the baseline must beat."""
    result = {}
    for streams in BASELINE_STREAMS:
        medians = {name: statistics.median(samples[f"{name}_{streams}"]) for name in TREES}
        result[f"{streams}_streams"] = {
            **{f"{name}_tok_s": rate_summary(samples[f"{name}_{streams}"]) for name in TREES},
            "ratio_to_baseline": medians["this_tree"] / medians["baseline"],
            "noise_floor_ratio": medians["this_tree_again"] / medians["this_tree"],
        }
    return result


TREES = ("baseline", "this_tree", "this_tree_again")


def decode_rounds(mesh: LocalMesh, engine: Engine, hf: HfGenerate, prompts: list[list[int]],
                  llama: llama_cpp.LlamaCpp | None, rounds: int, max_new_tokens: int,
                  trees: dict[str, EngineOfTree]) -> dict[str, list[float]]:
    """Each round: 1, 4 and 8 streams through the engine, the gateway and generate (llama.cpp at 1), and
    at ``BASELINE_STREAMS`` through each checkout's engine (``trees``), their order turned each round."""
    samples: dict[str, list[float]] = {}
    with mesh.gateway_access().channel() as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        gateway_streams(stub, 1, max_new_tokens)  # warm
        engine_streams(engine, prompts[:1], max_new_tokens)
        for tree in trees.values():
            tree.streams(prompts[:1], max_new_tokens)
        for index in range(rounds):
            for streams in STREAMS:
                say(f"engine decode: round {index + 1}/{rounds}, {streams} streams")
                for name, arrivals in (("engine", engine_streams(engine, prompts[:streams], max_new_tokens)),
                                       ("gateway", gateway_streams(stub, streams, max_new_tokens))):
                    samples.setdefault(f"{name}_{streams}", []).append(steady_tok_s(arrivals))
                    samples.setdefault(f"{name}_{streams}_aggregate", []).append(aggregate_tok_s(arrivals))
                samples.setdefault(f"hf_{streams}", []).append(hf.decode_tok_s(prompts[:streams], max_new_tokens))
                if llama is not None and streams == 1:
                    samples.setdefault("llama_cpp_1", []).append(llama.decode_tok_s(prompts[0], max_new_tokens))
                if streams in BASELINE_STREAMS and trees:
                    names = list(trees)[index % len(trees):] + list(trees)[: index % len(trees)]
                    for name in names:
                        arrivals = trees[name].streams(prompts[:streams], max_new_tokens)
                        samples.setdefault(f"{name}_{streams}", []).append(steady_tok_s(arrivals))
    return samples


class Arrivals(list):
    """One stream's text arrival times (perf_counter), and its completion tokens."""
    tokens = 0


def steady_tok_s(streams: list[Arrivals]) -> float:
    """Tokens arriving while every stream decodes (after the last stream's first token, up to the first
    stream's last one) over that window; a stream's arrivals weighted by its tokens per arrival (a piece
    of text may hold more than one token)."""
    start, end = max(times[0] for times in streams), min(times[-1] for times in streams)
    if end <= start:
        raise RuntimeError("a stream ended before the last one started: raise --max-new-tokens")
    tokens = sum(sum(start < at <= end for at in times) * times.tokens / len(times) for times in streams)
    return tokens / (end - start)


def aggregate_tok_s(streams: list[Arrivals]) -> float:
    return generation.aggregate_tok_s([StreamTimes(times[0], times[-1], times.tokens) for times in streams])


def engine_streams(engine: Engine, prompts: list[list[int]], max_new_tokens: int,
                   response_format: ResponseFormat | None = None) -> list[Arrivals]:
    """The prompts as concurrent greedy requests to ``engine``, in one event loop of this process."""
    async def one(prompt: list[int]) -> Arrivals:
        arrivals = Arrivals()
        sampling = Sampling(max_new_tokens=max_new_tokens, response_format=response_format)
        stream = engine.submit(GenerationRequest(prompt, sampling))
        async for item in stream:
            if isinstance(item, Delta):
                arrivals.append(time.perf_counter())
            else:
                arrivals.tokens = item.completion_tokens
        return arrivals

    async def run() -> list[Arrivals]:
        return await asyncio.gather(*(one(prompt) for prompt in prompts))

    return asyncio.run(run())


def gateway_streams(stub, streams: int, max_new_tokens: int) -> list[Arrivals]:
    """``streams`` concurrent GenerateStream calls (cache bypassed), one thread each."""
    results = [Arrivals() for _ in range(streams)]
    barrier = threading.Barrier(streams)

    def run(index: int) -> None:
        request = bypass_request(index, max_new_tokens)
        barrier.wait()
        for chunk in stub.GenerateStream(request, timeout=600):
            if chunk.delta:
                results[index].append(time.perf_counter())
            if chunk.done:
                results[index].tokens = chunk.usage.completion_tokens

    threads = [threading.Thread(target=run, args=(index,)) for index in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def step_split(engine: Engine) -> dict:
    """Median ms per decode step and part, by batch size, over the engine's latest steps."""
    by_batch: dict[int, list] = {}
    for step in engine.step_times:
        by_batch.setdefault(step.batch, []).append(step)
    result = {}
    for batch in sorted(by_batch):
        steps = by_batch[batch]
        if len(steps) < 5:
            continue
        parts = {name: statistics.median(getattr(step, name) for step in steps) * 1000
                 for name in ("forward", "sampling_and_text", "delivery")}
        result[str(batch)] = {"steps": len(steps), **parts}
    return result


# -- prefill beside decode --------------------------------------------------------------


def bench_prefill_stall(start: Callable[[EngineOptions], Engine], variants: dict[str, EngineOptions], tokenizer,
                        rounds: int) -> dict:
    """Each variant's engine is started for its turn and closed after it: every engine's worker owns an
    OpenMP team, and with several alive their threads sleep between regions (services/inference/threads.py),
    which would slow every variant. A turn begins with an unmeasured run, so buffers grown for the long
    prompt are in place as in a serving engine (``kv_regrown_each_prompt`` drops them when idle)."""
    long_prompt = tokenizer.encode(generation.LONG_TEXT)[:LONG_PROMPT_TOKENS]
    running = chat_ids(tokenizer, question(0))
    samples: dict[str, list[float]] = {"alone": [], **{name: [] for name in variants}}
    ttft: dict[str, list[float]] = {name: [] for name in variants}
    for index in range(rounds):
        say(f"prefill beside decode: round {index + 1}/{rounds}")
        for name, options in variants.items():
            engine = start(options)
            try:
                admitted_ms(engine, running, long_prompt)  # warm
                if name == "one_forward":
                    samples["alone"] += admitted_ms(engine, running, None)[0]
                gaps, first_token = admitted_ms(engine, running, long_prompt)
            finally:
                engine.close()
            samples[name] += gaps
            ttft[name].append(first_token)
    alone = statistics.median(samples["alone"])
    result = {"running_stream_alone": gap_summary(samples["alone"])}
    for name in variants:
        row = gap_summary(samples[name])
        row["p99_over_alone_p50"] = row["p99_ms"] / alone
        row["long_prompt_ttft_p50_ms"] = statistics.median(ttft[name])
        result[f"beside_{LONG_PROMPT_TOKENS}_token_prompt_{name}"] = row
    return result


def admitted_ms(engine: Engine, running: list[int], long_prompt: list[int] | None) -> tuple[list[float], float]:
    """A stream of RUNNING_STREAM_TOKENS tokens, the long prompt admitted once it has ADMIT_AFTER_TOKENS:
    the stream's gaps between tokens (ms) and the long prompt's time to first token (ms)."""
    async def run() -> tuple[list[float], float]:
        arrivals: list[float] = []
        first_token = 0.0
        stream = engine.submit(GenerationRequest(running, Sampling(max_new_tokens=RUNNING_STREAM_TOKENS)))

        async def long_one(at: float) -> None:
            nonlocal first_token
            async with engine.submit(GenerationRequest(long_prompt, Sampling(max_new_tokens=1))) as other:
                async for _ in other:
                    first_token = (time.perf_counter() - at) * 1000
                    break

        admitted = None
        async for item in stream:
            if isinstance(item, Delta):
                arrivals.append(time.perf_counter())
                if long_prompt is not None and admitted is None and len(arrivals) == ADMIT_AFTER_TOKENS:
                    admitted = asyncio.create_task(long_one(time.perf_counter()))
        if admitted is not None:
            await admitted
        return [(b - a) * 1000 for a, b in zip(arrivals[ADMIT_AFTER_TOKENS - 1 :], arrivals[ADMIT_AFTER_TOKENS:])], \
            first_token

    return asyncio.run(run())


def gap_summary(values_ms: list[float]) -> dict:
    return {"n": len(values_ms), "p50_ms": statistics.median(values_ms), "p99_ms": percentile(values_ms, 99),
            "max_ms": max(values_ms)}


# -- table ------------------------------------------------------------------------------


def lines(result: dict) -> list[str]:
    out = [f"engine decode, greedy, {result['precision']}, {result['threads']} threads "
           f"(the worker thread's torch threads: {result['worker_torch_threads']}): decode tok/s while every stream "
           "decodes (p50 / p99-low)"]
    out.append(f"{'streams':<10}{'engine in process':>20}{'gateway':>18}{'HF generate':>18}{'engine/HF':>11}"
               f"{'gateway/HF':>12}")
    for name, row in result["decode"].items():
        cells = [row["engine_tok_s"], row["gateway_tok_s"], row["hf_generate_tok_s"]]
        out.append(f"{name.split('_')[0]:<10}" + "".join(f"{c['p50']:>12.1f} / {c['p99_low']:<5.1f}" for c in cells)
                   + f"{row['engine_ratio_to_hf']:>10.2f}x{row['gateway_ratio_to_hf']:>11.2f}x")
        if "llama_cpp_tok_s" in row:
            cell = row["llama_cpp_tok_s"]
            out.append(f"{'':<10}llama.cpp (Q4_1 GGUF) {cell['p50']:.1f} / {cell['p99_low']:.1f} tok/s: engine "
                       f"{row['engine_ratio_to_llama_cpp']:.2f}x, gateway {row['gateway_ratio_to_llama_cpp']:.2f}x")
    if "decode_vs_baseline" in result:
        out += ["", f"engine decode against {result['decode_vs_baseline']['source']}, each engine in a process of "
                    "its own: tok/s while every stream decodes (p50 / p99-low)",
                f"{'streams':<10}{'baseline':>18}{'this tree':>18}{'again':>18}{'this/baseline':>15}"
                f"{'noise floor':>13}"]
        for name, row in result["decode_vs_baseline"].items():
            if name == "source":
                continue
            cells = [row[f"{tree}_tok_s"] for tree in TREES]
            out.append(f"{name.split('_')[0]:<10}" + "".join(f"{c['p50']:>12.1f} / {c['p99_low']:<5.1f}" for c in cells)
                       + f"{row['ratio_to_baseline']:>14.3f}x{row['noise_floor_ratio']:>12.3f}x")
    out += ["", f"{'decode step, engine in process':<32}{'steps':>7}{'forward ms':>12}{'sampling+text':>15}"
                f"{'delivery':>10}"]
    for batch, row in result["step_ms"].items():
        out.append(f"{'batch ' + batch:<32}{row['steps']:>7}{row['forward']:>12.2f}{row['sampling_and_text']:>15.2f}"
                   f"{row['delivery']:>10.2f}")
    out += ["", f"running stream's gaps (max_batched_tokens {result['max_batched_tokens']}, default prefill_share "
                f"{result['prefill_share']:g})            {'n':>6}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}  notes"]
    for name, row in result["prefill_stall"].items():
        notes = ""
        if "p99_over_alone_p50" in row:
            notes = (f"p99 {row['p99_over_alone_p50']:.2f}x the stream's p50 alone; long prompt's first token "
                     f"{row['long_prompt_ttft_p50_ms']:.0f} ms")
        out.append(f"{name:<66}{row['n']:>6}{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}{row['max_ms']:>9.1f}  {notes}")
    return out
