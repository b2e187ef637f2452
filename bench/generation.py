"""Generation speed: decode tok/s at 1, 4 and 8 streams, and time to first token with prefix reuse.

Every figure stands beside its baseline, measured in the same run, rounds
interleaved:
- decode: N concurrent streams through the gateway (the mesh's inference
  service, continuous batching) against transformers' ``generate`` in this
  process on the same N prompts padded into one batch, in the same precision;
- time to first token for a 300-token prompt, in this process: cold, with 270
  tokens cached in the engine's own prefix tier, and with those 270 tokens
  cached in Redis by another engine (a second replica); beside ``generate``
  with one new token on the same prompt.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from bench import llama_cpp, variants
from bench.hf_generate import HfGenerate
from bench.stats import summary_ms
from cli.connect import GatewayAccess
from cli.launcher import LocalMesh
from meshkit.percentile import percentile
from meshkit.sampling import Sampling
from meshkit.settings import default_home
from modelfiles.convert import load_model_files
from services.inference.engine import Engine
from services.inference.generation_types import Delta, GenerationRequest
from services.inference.loading import load_model
from services.inference.precision import model_precision
from services.inference.prefix import PrefixCache, RedisBlocks
from services.inference.settings import InferenceSettings
from services.inference.threads import in_thread_that_ends
from services.inference.tiles import BY_POSITION

STREAMS = (1, 4, 8)
# Questions that draw long answers, so that streams decode for their whole max_new_tokens.
TOPICS = [
    "the history of the printing press", "how vaccines train the immune system", "the water cycle",
    "how a bill becomes law in a parliament", "the causes of the first world war", "how compilers work",
    "photosynthesis in plants", "the economics of inflation",
]
PROMPT_TOKENS, SHARED_TOKENS = 300, 270
# About 1,300 tokens of public-domain prose: the 300-token prompts are windows into it.
LONG_TEXT = (Path(__file__).resolve().parent.parent / "tests" / "data" / "perplexity.txt").read_text()


def say(line: str) -> None:
    print(f"[bench] {line}", flush=True)


@dataclass(frozen=True)
class StreamTimes:
    first: float  # perf_counter of the first text
    last: float  # ... of the last text
    tokens: int


def question(index: int) -> str:
    return f"Write a long, detailed essay about {TOPICS[index % len(TOPICS)]}."


def bench(mesh: LocalMesh, rounds: int, max_new_tokens: int) -> dict:
    settings = InferenceSettings()
    say(f"loading the model in-process ({settings.dtype}) for the prefix runs, and in a process of its own for "
        "generate")
    torch.set_num_threads(settings.threads)
    # Loaded in a thread that ends, generate in a process of its own: the engines' workers own this
    # process's OpenMP teams, as in the inference service (services/inference/threads.py).
    model, tokenizer = in_thread_that_ends(lambda: load_model(load_model_files(default_home()), settings.dtype))
    precision = model_precision(model)  # what auto chose on this CPU; generate gets the same
    say(f"precision {precision} (NLPMESH_INFERENCE_DTYPE={settings.dtype})")
    hf = HfGenerate(precision, settings.threads)
    tls_env, tls_ca = variants.tls_edge_variant(mesh.run_dir / "certs")
    process, address = variants.spawn_gateway(mesh, tls_env,
                                              health_credentials=grpc.ssl_channel_credentials(tls_ca.read_bytes()))
    tls_edge = dataclasses.replace(mesh.gateway_access(), address=address, ca_file=tls_ca)
    try:
        decode = bench_decode(mesh, hf, tokenizer, rounds, max_new_tokens, tls_edge)
        ttft = bench_prefix_ttft(mesh.resolved_redis_url, model, tokenizer, hf, max(5, rounds + 2), settings)
    finally:
        process.terminate()
        process.wait(timeout=10)
        hf.close()
    return {"precision": precision, "decode": decode, "ttft_300": ttft}


# -- decode -------------------------------------------------------------------


def bench_decode(mesh: LocalMesh, hf: HfGenerate, tokenizer, rounds: int, max_new_tokens: int,
                 tls_edge: GatewayAccess) -> dict:
    """Decode tok/s through the gateway, through a gateway serving TLS to its caller (the same
    services), and in transformers' ``generate`` on the same weights, rounds interleaved."""
    prompts = [chat_ids(tokenizer, question(index)) for index in range(max(STREAMS))]
    samples: dict[str, list[float]] = {}
    with mesh.gateway_access().channel() as channel, tls_edge.channel() as tls_channel:
        stub, tls_stub = gateway_pb2_grpc.GatewayStub(channel), gateway_pb2_grpc.GatewayStub(tls_channel)
        gateway_streams(stub, 1, max_new_tokens)  # warm
        gateway_streams(tls_stub, 1, max_new_tokens)
        for index in range(rounds):
            for streams in STREAMS:
                say(f"decode: round {index + 1}/{rounds}, {streams} streams")
                times = gateway_streams(stub, streams, max_new_tokens)
                samples.setdefault(f"gateway_{streams}", []).append(aggregate_tok_s(times))
                samples.setdefault(f"gateway_{streams}_per_stream", []).extend(per_stream_tok_s(times))
                samples.setdefault(f"tls_edge_{streams}", []).append(
                    aggregate_tok_s(gateway_streams(tls_stub, streams, max_new_tokens)))
                samples.setdefault(f"hf_generate_{streams}", []).append(hf.decode_tok_s(prompts[:streams],
                                                                                      max_new_tokens))
    result = {}
    for streams in STREAMS:
        gateway, baseline = samples[f"gateway_{streams}"], samples[f"hf_generate_{streams}"]
        tls = samples[f"tls_edge_{streams}"]
        result[f"{streams}_streams"] = {
            "gateway_tok_s": rate_summary(gateway),
            "gateway_per_stream_tok_s": rate_summary(samples[f"gateway_{streams}_per_stream"]),
            "hf_generate_tok_s": rate_summary(baseline),
            "ratio_to_hf_generate": statistics.median(gateway) / statistics.median(baseline),
            "tls_edge_tok_s": rate_summary(tls),
            "tls_edge_ratio_to_plaintext": statistics.median(tls) / statistics.median(gateway),
        }
    return result


def bypass_request(index: int, max_new_tokens: int, model: str = "") -> gateway_pb2.GenerateRequest:
    """Question ``index`` as a chat to ``model`` (empty: the default), the prompt cache bypassed: always a
    generation."""
    return gateway_pb2.GenerateRequest(
        chat=gateway_pb2.Chat(messages=[gateway_pb2.ChatMessage(role="user", content=question(index))]),
        model=model, sampling=gateway_pb2.SamplingParams(max_new_tokens=max_new_tokens),
        cache_mode=gateway_pb2.CACHE_MODE_BYPASS,
    )


def gateway_streams(stub, streams: int, max_new_tokens: int, model: str = "") -> list[StreamTimes]:
    """``streams`` concurrent GenerateStream calls to ``model`` (cache bypassed), one thread each."""
    times: list[StreamTimes | None] = [None] * streams
    barrier = threading.Barrier(streams)

    def run(index: int) -> None:
        request = bypass_request(index, max_new_tokens, model)
        barrier.wait()
        first = last = None
        tokens = 0
        for chunk in stub.GenerateStream(request, timeout=600):
            now = time.perf_counter()
            if chunk.delta:
                first = first or now
                last = now
            if chunk.done:
                tokens = chunk.usage.completion_tokens
        times[index] = StreamTimes(first, last, tokens)

    failures: list[grpc.RpcError] = []

    def guarded(index: int) -> None:
        try:
            run(index)
        except grpc.RpcError as error:  # reported once all streams are done
            failures.append(error)

    threads = [threading.Thread(target=guarded, args=(index,)) for index in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        error = failures[0]
        raise RuntimeError(f"{len(failures)} of {streams} streams failed, e.g. {error.code().name}: {error.details()}")
    return times


def aggregate_tok_s(times: list[StreamTimes]) -> float:
    """Tokens after each stream's first, over the time from the first stream's first token to the end."""
    window = max(t.last for t in times) - min(t.first for t in times)
    return sum(t.tokens - 1 for t in times) / window


def per_stream_tok_s(times: list[StreamTimes]) -> list[float]:
    return [(t.tokens - 1) / (t.last - t.first) for t in times if t.tokens > 1 and t.last > t.first]


def hf_decode_tok_s(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]],
                    max_new_tokens: int) -> float:
    """transformers' generate on the prompts left-padded into one batch: decode tokens over decode time."""
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def generate(new_tokens: int) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, pad_token_id=pad)
        return time.perf_counter() - started

    prefill = generate(1)
    whole = generate(max_new_tokens)
    return len(prompts) * (max_new_tokens - 1) / max(whole - prefill, 1e-9)


# -- time to first token with prefix reuse ----------------------------------------


def bench_prefix_ttft(redis_url: str, model, tokenizer, hf: HfGenerate, rounds: int,
                      settings: InferenceSettings) -> dict:
    if not redis_url:
        raise RuntimeError("the prefix TTFT bench needs Redis: set REDIS_URL or install redis-server")
    namespace = f"nlpmesh:bench:kv:{uuid.uuid4().hex}"

    text_ids = tokenizer.encode(LONG_TEXT)

    @contextlib.contextmanager
    def replica(block_tokens: int = settings.prefix_block_tokens) -> Iterator[Engine]:
        """A warmed-up engine with a prefix cache of its own and the shared Redis tier, as another process
        would have; closed after its turn (its Redis writes flushed): each engine's worker owns an OpenMP
        team, and with several alive every team sleeps between regions (services/inference/threads.py)."""
        shared = RedisBlocks(redis_url, key_prefix=f"{namespace}:{block_tokens}", ttl_s=300,
                             budget_s=settings.prefix_redis_budget_ms / 1000)
        prefix = PrefixCache(model="bench", revision="bench", block_tokens=block_tokens, shared=shared)
        engine = Engine(model, tokenizer, settings.engine_options(), prefix_cache=prefix)
        try:
            first_token_ms(engine, text_ids[-PROMPT_TOKENS:])  # warm the code paths
            yield engine
        finally:
            engine.close()

    samples: dict[str, list[float]] = {"cold": [], "local_prefix_hit": [], "redis_prefix_hit": [], "hf_generate": [],
                                       f"cold_{BEFORE}": [], f"local_prefix_hit_{BEFORE}": []}
    llama = llama_cpp.LlamaCpp(threads=settings.threads) if llama_cpp.available() else None
    if llama is not None:
        samples["llama_cpp"] = []
    try:
        for index in range(rounds):
            say(f"time to first token, {PROMPT_TOKENS}-token prompt: round {index + 1}/{rounds}")
            shared = text_ids[index * 7 : index * 7 + SHARED_TOKENS]  # a new prefix each round: cold is cold
            tails = [text_ids[-(k + 1) * 40 : -(k + 1) * 40 + PROMPT_TOKENS - SHARED_TOKENS] for k in range(3)]
            with replica() as first:
                samples["cold"].append(first_token_ms(first, shared + tails[0]))
                samples["local_prefix_hit"].append(first_token_ms(first, shared + tails[1]))
            # Before: 16-token blocks, prefill rows placed by absolute position (one more tile for a tail).
            # The engine's own plan, which its worker reads as it prefills.
            with replica(BEFORE_BLOCK_TOKENS) as before, before.kernels.placement_tried(BY_POSITION):
                samples[f"cold_{BEFORE}"].append(first_token_ms(before, shared + tails[0]))
                samples[f"local_prefix_hit_{BEFORE}"].append(first_token_ms(before, shared + tails[1]))
            with replica() as second:  # a replica that never saw the prompt: the first one's blocks are in Redis
                samples["redis_prefix_hit"].append(first_token_ms(second, shared + tails[2]))
            samples["hf_generate"].append(hf.first_token_ms(shared + tails[0]))
            if llama is not None:
                samples["llama_cpp"].append(llama.first_token_ms(shared + tails[0]))
    finally:
        if llama is not None:
            llama.close()
    cold = statistics.median(samples["cold"])
    result = {name: ms_summary(values) for name, values in samples.items()}
    for name in ("local_prefix_hit", "redis_prefix_hit", "hf_generate", "llama_cpp"):
        if name not in result:
            continue
        result[name]["ratio_to_cold_p50"] = result[name]["p50_ms"] / cold
    result[f"local_prefix_hit_{BEFORE}"]["ratio_to_cold_p50"] = (
        result[f"local_prefix_hit_{BEFORE}"]["p50_ms"] / result[f"cold_{BEFORE}"]["p50_ms"])
    return result


BEFORE_BLOCK_TOKENS = 16
BEFORE = f"{BEFORE_BLOCK_TOKENS}_token_blocks_placed_by_position"


def first_token_ms(engine: Engine, prompt: list[int]) -> float:
    async def run() -> float:
        started = time.perf_counter()
        stream = engine.submit(GenerationRequest(prompt, Sampling(max_new_tokens=1), tenant="bench"))
        async with stream:
            async for item in stream:
                if not isinstance(item, Delta) or item.text:
                    break
        return (time.perf_counter() - started) * 1000

    return asyncio.run(run())


def hf_first_token_ms(model: PreTrainedModel, prompt: list[int]) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=1)
    return (time.perf_counter() - started) * 1000


# -- helpers ----------------------------------------------------------------------


def chat_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def rate_summary(values: list[float]) -> dict:
    # For rates the bad tail is the low end: "p99" is the rate 99% of samples beat.
    return {"n": len(values), "p50": statistics.median(values), "p99_low": percentile(values, 1)}


def ms_summary(values_ms: list[float]) -> dict:
    return summary_ms([value / 1000 for value in values_ms])


def lines(result: dict) -> list[str]:
    out = [f"decode, greedy, {result['precision']}: aggregate tok/s (p50 / p99-low)"]
    out.append(f"{'streams':<10}{'gateway':>18}{'per stream':>18}{'HF generate':>18}{'ratio':>8}"
               f"{'TLS edge':>18}{'vs plain':>9}")
    for name, row in result["decode"].items():
        cells = [row["gateway_tok_s"], row["gateway_per_stream_tok_s"], row["hf_generate_tok_s"]]
        out.append(f"{name.split('_')[0]:<10}" + "".join(f"{c['p50']:>10.1f} / {c['p99_low']:<5.1f}" for c in cells)
                   + f"{row['ratio_to_hf_generate']:>7.2f}x"
                   + f"{row['tls_edge_tok_s']['p50']:>10.1f} / {row['tls_edge_tok_s']['p99_low']:<5.1f}"
                   + f"{row['tls_edge_ratio_to_plaintext']:>8.2f}x")
    out.append("")
    out.append(f"time to first token, {PROMPT_TOKENS}-token prompt ({SHARED_TOKENS} shared)   p50 ms   p99 ms  notes")
    for name, row in result["ttft_300"].items():
        notes = f"{row['ratio_to_cold_p50']:.2f}x cold" if "ratio_to_cold_p50" in row else ""
        out.append(f"{name:<50}{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}  {notes}")
    return out

