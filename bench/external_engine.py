"""An external engine behind the inference hop (services/inference/external): what the mesh adds in front of it.

llama.cpp's OpenAI-compatible server (llama-cpp-python, started through tests/llama_server.py) serves the
default model's GGUF; a mesh serves it as the external catalogue entry ``llamacpp`` beside the built-in model.
Rounds interleaved, at 1 and 8 streams submitted at once (cache bypassed, a different question per stream):
- through the gateway (template, tokenizer, adapter),
- straight to the adapter over gRPC with the chat's token ids (what the adapter alone adds), and
- straight to the server over HTTP (httpx, streamed /v1/completions) with the same prompt text;
time to first token per stream and aggregate decode tok/s (from the first stream's first token to the last
stream's last). The server runs one request at a time (it queues the others), so at 8 streams the later
streams' first token waits for the earlier ones in both paths alike. And a prompt-cache hit on the external
model against one on the built-in model, through the same gateway. And time to first token on its own, one
call at a time, ``TTFT_CALLS`` calls a path (2 new tokens each, each path first in turn): three 128-token streams
a path give too few first tokens for a p50 of a few milliseconds. The same again, ``INSTANT_CALLS`` calls a
path, with bench/instant_engine.py behind a second adapter (catalogue entry ``instant``): an engine that
answers at once, so what the mesh adds is measured without llama.cpp's prefill and decode on the same two
cores as the mesh's processes. Both times a fourth path takes its turns beside the other three:
bench/bare_gateway.py, a gateway that makes the same two hops (the mesh's tokenizer, then the model's adapter)
and nothing else, so that what three Python gRPC hops cost on this machine is set beside what the gateway adds.
"""
from __future__ import annotations

import importlib.util
import itertools
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from nlpmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from transformers import AutoTokenizer

from bench.generation import question, rate_summary
from bench.stats import summary_ms
from cli.launcher import LocalMesh, free_port
from cli.processes import die_with_this_thread
from cli.topology import REPO_ROOT
from meshkit.grpc_io import with_mesh_grpc_io
from meshkit.settings import default_home
from modelfiles.catalogue import MODELS_FILE_ENV, load_catalogue
from modelfiles.convert import default_model_id, gguf_path, load_model_files

STREAMS = (1, 8)
EXTERNAL = "llamacpp"
SERVED = "bench-llamacpp"
INSTANT = "instant"
SERVED_INSTANT = "bench-instant"
CACHE_HITS = 200
TTFT_CALLS = 60
INSTANT_CALLS = 400


def say(line: str) -> None:
    print(f"[bench] {line}", flush=True)


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


@dataclass(frozen=True)
class Stream:
    started: float
    first: float
    last: float
    tokens: int


def _catalogue(port: int, instant_port: int) -> str:
    builtin = load_catalogue().get(default_model_id())
    external = "".join(
        f'\n[models.{model}]\nengine = "openai"\ntokenizer = "{builtin.id}"\n'
        f'[models.{model}.endpoint]\nurls = ["http://127.0.0.1:{at}"]\nmodel = "{served}"\n'
        f'prompt = "text"\nmax_in_flight = 16\n'
        for model, at, served in ((EXTERNAL, port, SERVED), (INSTANT, instant_port, SERVED_INSTANT)))
    return (f'[models.{builtin.id}]\nname = "{builtin.name}"\n'
            f'source = {{ kind = "pypi", package = "{builtin.source.package}", file = "{builtin.source.file}" }}\n'
            f'chat_template = "model"\n' + external)


def _start_server(port: int, log: Path) -> subprocess.Popen:
    return _started("llama.cpp's server", port, log, 120, [
        "-m", "tests.llama_server", "--model", str(gguf_path()), "--host", "127.0.0.1", "--port", str(port),
        "--model_alias", SERVED, "--n_ctx", "4096", "--n_threads", "2", "--verbose", "false",
        "--interrupt_requests", "false"])


def _start_instant_engine(port: int, log: Path) -> subprocess.Popen:
    return _started("the instant engine", port, log, 30,
                    ["-m", "bench.instant_engine", "--port", str(port), "--model", SERVED_INSTANT])


def _http_answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _started(what: str, port: int, log: Path, wait_s: float, arguments: list[str],
             answers: Callable[[int], bool] = _http_answers, env: dict[str, str] | None = None
             ) -> subprocess.Popen:
    """``python ARGUMENTS``, once ``answers(port)`` (default: its /v1/models answers), RuntimeError after
    ``wait_s``."""
    process = subprocess.Popen(die_with_this_thread([sys.executable, *arguments]),
                               stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if answers(port):
            return process
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"{what} did not start: {log}")


def _grpc_answers(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=2)
        except grpc.FutureTimeoutError:
            return False
    return True


def _start_bare_gateway(port: int, log: Path, tokenizer: str, inference: dict[str, str]) -> subprocess.Popen:
    """bench/bare_gateway.py on ``port``, on the mesh's gRPC I/O setting (as every mesh process)."""
    routes = [f"--inference={model}={address}" for model, address in inference.items()]
    return _started("the bare gateway", port, log, 30,
                    ["-m", "bench.bare_gateway", "--port", str(port), "--tokenizer", tokenizer, *routes],
                    _grpc_answers, with_mesh_grpc_io(dict(os.environ)))


def _together(streams: int, one) -> list[Stream]:
    results: list[Stream | None] = [None] * streams
    barrier = threading.Barrier(streams)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            barrier.wait()
            results[index] = one(index)
        except BaseException as error:  # reported below, once every stream ended
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {streams} streams failed: {errors[0]!r}")
    return results


_calls = itertools.count()


def _fresh(index: int) -> str:
    """Question ``index`` after a tag no call had: the server reuses the KV of the prompt before (its prefix
    cache), and with the tag first every call shares only the chat template's opening with the call before it,
    whichever path made either (with the tag last, the second of two calls of one question got its KV)."""
    return f"(ref {next(_calls)}) {question(index)}"


def _timed(started: float, chunks, tokens_of) -> Stream:
    """A gRPC stream of chunks with ``delta`` and ``done`` (the gateway's or the inference service's)."""
    first = last = None
    tokens = 0
    for chunk in chunks:
        now = time.perf_counter()
        if chunk.delta:
            first, last = first or now, now
        if chunk.done:
            tokens = tokens_of(chunk)
    return Stream(started, first, last, tokens)


def _through_gateway(stub, max_new_tokens: int, model: str = EXTERNAL):
    def one(index: int) -> Stream:
        request = gateway_pb2.GenerateRequest(
            chat=gateway_pb2.Chat(messages=[gateway_pb2.ChatMessage(role="user", content=_fresh(index))]),
            model=model, sampling=gateway_pb2.SamplingParams(max_new_tokens=max_new_tokens),
            cache_mode=gateway_pb2.CACHE_MODE_BYPASS)
        started = time.perf_counter()
        return _timed(started, stub.GenerateStream(request, timeout=600), lambda done: done.usage.completion_tokens)
    return one


def _adapter(stub, tokenizer, max_new_tokens: int, model: str = EXTERNAL):
    """Straight to the adapter (the external model's inference service) with the chat's token ids: what the
    adapter alone adds to the engine, without the gateway's template and tokenizer hops."""
    def one(index: int) -> Stream:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": _fresh(index)}], tokenize=True,
                                            add_generation_prompt=True, return_dict=False)
        request = inference_pb2.GenerateRequest(model=model, prompt_token_ids=list(ids),
                                                sampling=inference_pb2.Sampling(max_new_tokens=max_new_tokens))
        started = time.perf_counter()
        return _timed(started, stub.Generate(request, timeout=600), lambda done: done.completion_tokens)
    return one


def _direct(client: httpx.Client, port: int, tokenizer, max_new_tokens: int, served: str = SERVED):
    """The same chat as the gateway sends, rendered with the model's chat template here (before the clock)."""
    def one(index: int) -> Stream:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": _fresh(index)}], tokenize=False,
                                               add_generation_prompt=True)
        body = {"model": served, "prompt": prompt, "stream": True,
                "max_tokens": max_new_tokens, "temperature": 0.0}
        started, first, last, tokens = time.perf_counter(), None, None, 0
        with client.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=600) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.startswith("data:") and '"text": ""' not in line and "[DONE]" not in line:
                    now = time.perf_counter()
                    first, last, tokens = first or now, now, tokens + 1
        return Stream(started, first, last, tokens)
    return one


def _decode_tok_s(streams: list[Stream]) -> float:
    window = max(s.last for s in streams) - min(s.first for s in streams)
    return sum(s.tokens - 1 for s in streams) / window


def _ttft_alone(stub, adapter_stub, bare_stub, client: httpx.Client, port: int, tokenizer, calls: int = TTFT_CALLS,
                model: str = EXTERNAL, served: str = SERVED) -> dict:
    """One call at a time, each path first in turn, ``calls`` a path: each path's TTFT, and what the gateway,
    the adapter and the bare gateway (bench/bare_gateway.py) add to direct HTTP (the difference of p50s, and
    the p50 of the differences within each turn)."""
    paths = {"gateway": _through_gateway(stub, 2, model), "adapter": _adapter(adapter_stub, tokenizer, 2, model),
             "bare_gateway": _through_gateway(bare_stub, 2, model),
             "direct_http": _direct(client, port, tokenizer, 2, served)}
    for one in paths.values():  # warm every path's connection
        one(0)
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    names = list(paths)
    for turn in range(calls):
        for name in names[turn % len(names):] + names[:turn % len(names)]:
            stream = paths[name](turn)
            seconds[name].append(stream.first - stream.started)
    result: dict = {name: summary_ms(values) for name, values in seconds.items()}
    for name in ("gateway", "adapter", "bare_gateway"):
        differences = [ours - direct for ours, direct in zip(seconds[name], seconds["direct_http"])]
        result[f"{name}_added_p50_ms"] = result[name]["p50_ms"] - result["direct_http"]["p50_ms"]
        result[f"{name}_added_paired_p50_ms"] = summary_ms(differences)["p50_ms"]
    result["calls"] = calls
    return result


def _hits_ms(stub, model: str) -> list[float]:
    request = gateway_pb2.GenerateRequest(
        chat=gateway_pb2.Chat(messages=[gateway_pb2.ChatMessage(role="user", content=question(0))]),
        model=model, sampling=gateway_pb2.SamplingParams(max_new_tokens=16), cache_mode=gateway_pb2.CACHE_MODE_USE)
    for _ in range(100):
        if stub.Generate(request, timeout=120).cache_hit:
            break
        time.sleep(0.05)
    else:
        raise RuntimeError(f"{model}: the answer never reached the prompt cache")
    seconds = []
    for _ in range(CACHE_HITS):
        started = time.perf_counter()
        stub.Generate(request, timeout=10)
        seconds.append(time.perf_counter() - started)
    return seconds


def bench(rounds: int, max_new_tokens: int) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="nlpmesh-bench-external-"))
    port, instant_port, bare_port = free_port(), free_port(), free_port()
    server = _start_server(port, run_dir / "llama-server.log")
    instant = _start_instant_engine(instant_port, run_dir / "instant-engine.log")
    processes = [server, instant]
    catalogue = run_dir / "models.toml"
    catalogue.write_text(_catalogue(port, instant_port))
    previous = os.environ.get(MODELS_FILE_ENV)
    os.environ[MODELS_FILE_ENV] = str(catalogue)  # the launcher reads the catalogue too
    builtin = default_model_id()
    mesh = LocalMesh(run_dir / "mesh", free_ports=True, progress=say, models=(builtin, EXTERNAL, INSTANT),
                     extra_env={MODELS_FILE_ENV: str(catalogue)})
    try:
        mesh.start()
        adapters = {model: mesh.address(mesh.model_instances[model][0]) for model in (EXTERNAL, INSTANT)}
        processes.append(
            _start_bare_gateway(bare_port, run_dir / "bare-gateway.log", mesh.address("tokenizer"), adapters))
        tokenizer = AutoTokenizer.from_pretrained(load_model_files(default_home(), builtin).path)
        result: dict = {"max_new_tokens": max_new_tokens, "engine": "llama-cpp-python server (CPU, 2 threads)"}
        adapter_address = mesh.address(mesh.model_instances[EXTERNAL][0])
        with grpc.insecure_channel(mesh.gateway_address) as channel, httpx.Client() as client, \
                grpc.insecure_channel(adapter_address) as adapter_channel, \
                grpc.insecure_channel(mesh.address(mesh.model_instances[INSTANT][0])) as instant_channel, \
                grpc.insecure_channel(f"127.0.0.1:{bare_port}") as bare_channel:
            stub, bare_stub = gateway_pb2_grpc.GatewayStub(channel), gateway_pb2_grpc.GatewayStub(bare_channel)
            paths = {"gateway": _through_gateway(stub, max_new_tokens),
                     "adapter": _adapter(inference_pb2_grpc.InferenceServiceStub(adapter_channel), tokenizer,
                                         max_new_tokens),
                     "direct_http": _direct(client, port, tokenizer, max_new_tokens)}
            samples = {(n, p): {"ttft": [], "tok_s": []} for n in STREAMS for p in paths}
            for round_index in range(rounds):
                for streams in STREAMS:
                    order = list(paths.items())
                    for name, one in (order if round_index % 2 == 0 else order[::-1]):
                        times = _together(streams, one)
                        samples[streams, name]["ttft"] += [s.first - s.started for s in times]
                        samples[streams, name]["tok_s"].append(_decode_tok_s(times))
                say(f"round {round_index + 1}/{rounds} done")
            for streams in STREAMS:
                row = {name: {"ttft": summary_ms(samples[streams, name]["ttft"]),
                              "decode_tok_s": rate_summary(samples[streams, name]["tok_s"])} for name in paths}
                gateway, direct = row["gateway"], row["direct_http"]
                row["ttft_added_p50_ms"] = gateway["ttft"]["p50_ms"] - direct["ttft"]["p50_ms"]
                row["decode_ratio_p50"] = gateway["decode_tok_s"]["p50"] / direct["decode_tok_s"]["p50"]
                row["adapter_ttft_added_p50_ms"] = row["adapter"]["ttft"]["p50_ms"] - direct["ttft"]["p50_ms"]
                row["adapter_decode_ratio_p50"] = row["adapter"]["decode_tok_s"]["p50"] / direct["decode_tok_s"]["p50"]
                result[f"{streams}_streams"] = row
            result["ttft_alone"] = _ttft_alone(stub, inference_pb2_grpc.InferenceServiceStub(adapter_channel),
                                               bare_stub, client, port, tokenizer)
            say(f"time to first token with an engine that answers at once, {INSTANT_CALLS} calls a path")
            result["ttft_alone_instant_engine"] = _ttft_alone(
                stub, inference_pb2_grpc.InferenceServiceStub(instant_channel), bare_stub, client, instant_port,
                tokenizer, INSTANT_CALLS, INSTANT, SERVED_INSTANT)
            result["cache_hit"] = {EXTERNAL: summary_ms(_hits_ms(stub, EXTERNAL)),
                                   builtin: summary_ms(_hits_ms(stub, builtin))}
            result["cache_hit"]["ratio_external_to_builtin_p50"] = (
                result["cache_hit"][EXTERNAL]["p50_ms"] / result["cache_hit"][builtin]["p50_ms"])
        return result
    finally:
        mesh.stop()
        for process in processes:
            process.kill()
            process.wait(10)
        if previous is None:
            os.environ.pop(MODELS_FILE_ENV, None)
        else:
            os.environ[MODELS_FILE_ENV] = previous


def lines(result: dict) -> list[str]:
    out = [f"external engine ({result['engine']}), {result['max_new_tokens']} new tokens: gateway vs direct HTTP"]
    out.append(f"{'streams':<10}{'TTFT p50 gw':>14}{'direct':>10}{'added':>10}{'tok/s gw':>11}{'direct':>10}"
               f"{'ratio':>8}")
    for streams in STREAMS:
        row = result[f"{streams}_streams"]
        out.append(f"{streams:<10}{row['gateway']['ttft']['p50_ms']:>12.1f}ms{row['direct_http']['ttft']['p50_ms']:>8.1f}ms"
                   f"{row['ttft_added_p50_ms']:>8.1f}ms{row['gateway']['decode_tok_s']['p50']:>11.1f}"
                   f"{row['direct_http']['decode_tok_s']['p50']:>10.1f}{row['decode_ratio_p50']:>7.2f}x")
        out.append(f"{'':<10}adapter alone: TTFT p50 {row['adapter']['ttft']['p50_ms']:.1f}ms, added "
                   f"{row['adapter_ttft_added_p50_ms']:.1f}ms, decode {row['adapter_decode_ratio_p50']:.2f}x direct")
    for key, engine in (("ttft_alone", "llama.cpp"), ("ttft_alone_instant_engine", "an engine that answers at once")):
        if key not in result:
            continue
        alone = result[key]
        out.append(f"time to first token, {engine}, one call at a time ({alone['calls']} calls a path): p50 gateway "
                   f"{alone['gateway']['p50_ms']:.1f} ms, adapter {alone['adapter']['p50_ms']:.1f} ms, direct HTTP "
                   f"{alone['direct_http']['p50_ms']:.1f} ms")
        out.append(f"  the gateway adds {alone['gateway_added_p50_ms']:.1f} ms (p50 of paired differences "
                   f"{alone['gateway_added_paired_p50_ms']:.1f} ms; goal <= 3 ms), the adapter alone "
                   f"{alone['adapter_added_p50_ms']:.1f} ms ({alone['adapter_added_paired_p50_ms']:.1f} ms)")
        if "bare_gateway" in alone:  # runs before 2026-12-06 had no bare gateway
            own_ms = alone["gateway"]["p50_ms"] - alone["bare_gateway"]["p50_ms"]
            out.append(f"  a gateway of the two hops alone (bench/bare_gateway.py) adds "
                       f"{alone['bare_gateway_added_p50_ms']:.1f} ms ({alone['bare_gateway_added_paired_p50_ms']:.1f} "
                       f"ms): the gateway's own work is {own_ms:.1f} ms of what it adds")
    hits = result["cache_hit"]
    models = ", ".join(f"{k} {v['p50_ms']:.2f} ms" for k, v in hits.items() if isinstance(v, dict))
    out.append(f"cache hit p50: {models} (external/built-in {hits['ratio_external_to_builtin_p50']:.2f}x)")
    return out
