"""Every model a mesh serves, side by side: what a caller gets from each through the gateway.

For each model (its catalogue id in the request's ``model``), rounds interleaved with its baselines:
- decode: 1 and 8 streams submitted at once through the gateway (cache bypassed), aggregate tok/s
  from the first stream's first token to the last stream's last (bench/generation.py), against
  transformers' ``generate`` on the same converted weights in the same precision, in a process of its
  own (bench/hf_generate.py), on the same prompts padded into one batch;
- time to first token of a 300-token prompt, cold (a new prompt each call, so no prefix reuse):
  through the gateway (template, tokenizer and inference hops), straight to the model's inference
  service with the same number of token ids (what the gateway adds is the difference of the two p50s),
  and ``generate`` with one new token;
- llama.cpp on the model's own GGUF, where ``llama-cpp-python`` is installed (bench/llama_cpp.py).
"""
from __future__ import annotations

import statistics
import time

import grpc
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from nlpmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from transformers import AutoTokenizer

from bench import llama_cpp
from bench.generation import LONG_TEXT, aggregate_tok_s, chat_ids, gateway_streams, ms_summary, question, rate_summary
from bench.hf_generate import HfGenerate
from cli.launcher import LocalMesh
from meshkit.settings import default_home
from modelfiles.convert import load_model_files
from services.inference.settings import InferenceSettings

STREAMS = (1, 8)
PROMPT_TOKENS = 300


def say(line: str) -> None:
    print(f"[bench] {line}", flush=True)


def bench(mesh: LocalMesh, models: list[str], rounds: int, max_new_tokens: int) -> dict:
    return {model: bench_model(mesh, model, rounds, max_new_tokens) for model in models}


def bench_model(mesh: LocalMesh, model: str, rounds: int, max_new_tokens: int) -> dict:
    settings = InferenceSettings()
    files = load_model_files(default_home(), model)
    tokenizer = AutoTokenizer.from_pretrained(files.path)
    say(f"{model}: transformers' generate in a process of its own ({settings.dtype}, as the inference service)")
    hf = HfGenerate(settings.dtype, settings.threads, model)
    llama = llama_cpp.LlamaCpp(settings.threads, model) if llama_cpp.available(model) else None
    prompts = [chat_ids(tokenizer, question(index)) for index in range(max(STREAMS))]
    long_ids = tokenizer.encode(LONG_TEXT, add_special_tokens=False)
    samples: dict[str, list[float]] = {}

    def add(name: str, value: float) -> None:
        samples.setdefault(name, []).append(value)

    try:
        with mesh.gateway_access().channel() as channel, _inference_channel(mesh, model) as direct:
            stub, inference = gateway_pb2_grpc.GatewayStub(channel), inference_pb2_grpc.InferenceServiceStub(direct)
            gateway_streams(stub, 1, max_new_tokens, model=model)  # warm
            for index in range(rounds):
                say(f"{model}: round {index + 1}/{rounds}")
                for streams in STREAMS:
                    add(f"gateway_{streams}", aggregate_tok_s(gateway_streams(stub, streams, max_new_tokens,
                                                                              model=model)))
                    add(f"hf_generate_{streams}", hf.decode_tok_s(prompts[:streams], max_new_tokens))
                if llama is not None:
                    add("llama_cpp_1", llama.decode_tok_s(prompts[0], max_new_tokens))
                for turn in range(3):  # a new window of the text each call: every one cold
                    window = long_ids[(index * 3 + turn) * 11:][: PROMPT_TOKENS]
                    add("ttft_gateway", gateway_first_token_ms(stub, tokenizer, window, model))
                    add("ttft_inference_direct", inference_first_token_ms(inference, _chat(tokenizer, window), model))
                add("ttft_hf_generate", hf.first_token_ms(_chat(tokenizer, long_ids[index * 5:][:PROMPT_TOKENS])))
                if llama is not None:
                    add("ttft_llama_cpp", llama.first_token_ms(_chat(tokenizer, long_ids[index * 5:][:PROMPT_TOKENS])))
        precision = hf.precision()
    finally:
        hf.close()
        if llama is not None:
            llama.close()
    return summarise(samples, precision, files.revision)


def summarise(samples: dict[str, list[float]], precision: str, revision: str) -> dict:
    result: dict = {"precision": precision, "revision": revision, "decode": {}, "ttft_300": {}}
    for streams in STREAMS:
        gateway, baseline = samples[f"gateway_{streams}"], samples[f"hf_generate_{streams}"]
        row = {"gateway_tok_s": rate_summary(gateway), "hf_generate_tok_s": rate_summary(baseline),
               "ratio_to_hf_generate": statistics.median(gateway) / statistics.median(baseline)}
        if streams == 1 and "llama_cpp_1" in samples:
            row["llama_cpp_tok_s"] = rate_summary(samples["llama_cpp_1"])
            row["ratio_to_llama_cpp"] = statistics.median(gateway) / statistics.median(samples["llama_cpp_1"])
        result["decode"][f"{streams}_streams"] = row
    ttft = {name.removeprefix("ttft_"): ms_summary(values) for name, values in samples.items()
            if name.startswith("ttft_")}
    ttft["gateway_adds_p50_ms"] = ttft["gateway"]["p50_ms"] - ttft["inference_direct"]["p50_ms"]
    result["ttft_300"] = ttft
    return result


def _chat(tokenizer, window: list[int]) -> list[int]:
    """The window's text as one user turn, through the model's chat template: what the gateway sends."""
    return chat_ids(tokenizer, tokenizer.decode(window))


def gateway_first_token_ms(stub, tokenizer, window: list[int], model: str) -> float:
    request = gateway_pb2.GenerateRequest(
        chat=gateway_pb2.Chat(messages=[gateway_pb2.ChatMessage(role="user", content=tokenizer.decode(window))]),
        model=model, sampling=gateway_pb2.SamplingParams(max_new_tokens=1),
        cache_mode=gateway_pb2.CACHE_MODE_BYPASS)
    return _first_chunk_ms(lambda: stub.GenerateStream(request, timeout=120))


def inference_first_token_ms(stub, prompt: list[int], model: str) -> float:
    request = inference_pb2.GenerateRequest(model=model, prompt_token_ids=prompt, tenant="bench",
                                            sampling=inference_pb2.Sampling(max_new_tokens=1))
    return _first_chunk_ms(lambda: stub.Generate(request, timeout=120))


def _first_chunk_ms(call) -> float:
    started = time.perf_counter()
    first = None
    for chunk in call():
        if first is None and (chunk.delta or chunk.done):
            first = time.perf_counter()
    return (first - started) * 1000


def _inference_channel(mesh: LocalMesh, model: str) -> grpc.Channel:
    """A channel straight to the model's (first) inference replica (the bench's mesh runs plaintext)."""
    return grpc.insecure_channel(mesh.address(mesh.model_instances[model][0]))


def lines(result: dict) -> list[str]:
    out = []
    for model, row in result.items():
        out.append(f"{model} (precision {row['precision']}, revision {row['revision']}): aggregate tok/s, "
                   "streams at once through the gateway (p50 / p99-low)")
        out.append(f"{'streams':<10}{'gateway':>18}{'HF generate':>18}{'ratio':>8}{'llama.cpp':>18}{'ratio':>8}")
        for name, cells in row["decode"].items():
            text = (f"{name.split('_')[0]:<10}"
                    + "".join(f"{c['p50']:>10.1f} / {c['p99_low']:<5.1f}"
                              for c in (cells["gateway_tok_s"], cells["hf_generate_tok_s"]))
                    + f"{cells['ratio_to_hf_generate']:>7.2f}x")
            if "llama_cpp_tok_s" in cells:
                text += (f"{cells['llama_cpp_tok_s']['p50']:>10.1f} / {cells['llama_cpp_tok_s']['p99_low']:<5.1f}"
                         f"{cells['ratio_to_llama_cpp']:>7.2f}x")
            out.append(text)
        ttft = row["ttft_300"]
        out.append(f"time to first token, {PROMPT_TOKENS}-token prompt, cold{'':<14}p50 ms   p99 ms")
        for name in ("gateway", "inference_direct", "hf_generate", "llama_cpp"):
            if name in ttft:
                out.append(f"  {name:<44}{ttft[name]['p50_ms']:>9.1f}{ttft[name]['p99_ms']:>9.1f}")
        out.append(f"  the gateway adds to TTFT p50: {ttft['gateway_adds_p50_ms']:.1f} ms")
        out.append("")
    return out[:-1]
