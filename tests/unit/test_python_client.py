"""nlpmesh-client (clients/python) against an in-process fake gateway: the statuses it is given are built by the
mesh's own error tree (meshkit.errors.to_status), so the client reads what the real gateway sends."""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent import futures

import grpc
import pytest
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from nlpmesh_client import (
    AsyncClient,
    Client,
    Config,
    DeadlineExceeded,
    InvalidArgument,
    NlpmeshError,
    ResourceExhausted,
    RetryPolicy,
    Sampling,
    Template,
    Unavailable,
)

from meshkit.errors import DeadlineExceeded as MeshDeadlineExceeded
from meshkit.errors import InvalidArgument as MeshInvalidArgument
from meshkit.errors import MeshError, NotFound, to_status
from meshkit.errors import ResourceExhausted as MeshResourceExhausted
from meshkit.errors import Unavailable as MeshUnavailable

ANSWER = ("Bonds ", "are ", "loans.")
TRAILER = 'template;dur=0.410;desc="budget 100", cache;dur=0.620, total;dur=12.500;desc="budget 5000"'
NO_WAIT = RetryPolicy(max_attempts=3, backoff_s=0.01, jitter=0.0)


def final_fields() -> dict:
    return dict(finish_reason=gateway_pb2.FINISH_REASON_STOP, model="smollm2", trace_id="ab" * 16, cache_hit=True,
                usage=gateway_pb2.Usage(prompt_tokens=7, completion_tokens=3),
                timings=[gateway_pb2.HopTiming(hop="total", elapsed_ms=12.5, budget_ms=5000)])


class FakeGateway:
    """Answers each RPC from a script: a MeshError in it is sent as the gateway sends it; (error, n) fails the
    stream after n chunks. Records what each call carried."""

    def __init__(self, script: list | None = None):
        self.script = list(script or [])
        self.calls: list[dict] = []
        self.ended = threading.Event()  # an "endless" stream's RPC ended

    def _next_failure(self, context):
        self.calls.append({"metadata": dict(context.invocation_metadata()), "at": time.monotonic(),
                           "time_left_s": context.time_remaining()})
        return self.script.pop(0) if self.script else None

    def _echo(self, context):
        context.send_initial_metadata((("x-request-id", dict(context.invocation_metadata())["x-request-id"]),))
        context.set_trailing_metadata((("server-timing", TRAILER),))

    def generate(self, request, context):
        failure = self._next_failure(context)
        if isinstance(failure, MeshError):
            context.abort_with_status(to_status(failure))
        if failure == "slow":
            time.sleep(1.0)
        self._echo(context)
        return gateway_pb2.GenerateResponse(text="".join(ANSWER), **final_fields())

    def generate_stream(self, request, context):
        failure = self._next_failure(context)
        if failure == "endless":
            context.add_callback(self.ended.set)
            while context.is_active():
                yield gateway_pb2.GenerateChunk(delta="more ")
                time.sleep(0.01)
            return
        error, after = failure if isinstance(failure, tuple) else (failure, 0)
        self._echo(context)
        for i, delta in enumerate(ANSWER):
            if isinstance(error, MeshError) and i == after:
                context.abort_with_status(to_status(error))
            yield gateway_pb2.GenerateChunk(delta=delta)
        yield gateway_pb2.GenerateChunk(done=True, **final_fields())

    def count_tokens(self, request, context):
        failure = self._next_failure(context)
        if isinstance(failure, MeshError):
            context.abort_with_status(to_status(failure))
        return gateway_pb2.CountTokensResponse(prompt_tokens=len(request.chat.messages[0].content), model="smollm2")

    def list_templates(self, request, context):
        self._next_failure(context)
        return gateway_pb2.ListTemplatesResponse(templates=[gateway_pb2.TemplateInfo(
            id="finance_question", version="v1", variables=[gateway_pb2.TemplateVariable(name="question",
                                                                                       required=True)])])

    def list_models(self, request, context):
        self._next_failure(context)
        return gateway_pb2.ListModelsResponse(models=[gateway_pb2.ModelInfo(id="smollm2", ready=True, default=True,
                                                                            context_length=8192)])


@pytest.fixture
def fake():
    gateway = FakeGateway()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    serve_fake(server, gateway)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    gateway.address = f"127.0.0.1:{port}"
    yield gateway
    server.stop(None)


def serve_fake(server, gateway: FakeGateway) -> None:
    class Servicer(gateway_pb2_grpc.GatewayServicer):
        Generate = staticmethod(gateway.generate)
        GenerateStream = staticmethod(gateway.generate_stream)
        CountTokens = staticmethod(gateway.count_tokens)
        ListTemplates = staticmethod(gateway.list_templates)
        ListModels = staticmethod(gateway.list_models)

    gateway_pb2_grpc.add_GatewayServicer_to_server(Servicer(), server)


def client(fake, **kwargs) -> Client:
    return Client(fake.address, plaintext=True, **{"retry": NO_WAIT, **kwargs})


def test_generate_returns_typed_results_with_the_request_id_and_the_server_timing_trailer(fake):
    with client(fake, api_key="nm_secret") as c:
        answer = c.generate(Template("finance_question", {"question": "What is a bond?"}),
                            sampling=Sampling(max_new_tokens=8))
    assert answer.text == "Bonds are loans." and answer.finish_reason == "stop" and answer.cache_hit
    assert answer.usage.prompt_tokens == 7 and answer.usage.completion_tokens == 3
    assert answer.timings[0].hop == "total" and answer.timings[0].budget_ms == 5000
    assert answer.server_timing == {"template": 0.41, "cache": 0.62, "total": 12.5}
    sent = fake.calls[0]["metadata"]
    assert sent["authorization"] == "Bearer nm_secret"
    assert answer.request_id == sent["x-request-id"] and len(answer.request_id) == 32


def test_a_request_id_given_is_passed_through(fake):
    with client(fake) as c:
        assert c.generate("Hi", request_id="order-42").request_id == "order-42"
    assert fake.calls[0]["metadata"]["x-request-id"] == "order-42"
    assert "authorization" not in fake.calls[0]["metadata"]


def test_a_retry_waits_at_least_what_retry_info_says_and_keeps_the_request_id(fake):
    fake.script = [MeshResourceExhausted("over the rate", retry_after_s=0.3)]
    with client(fake, retry=RetryPolicy(max_attempts=2, jitter=0.5, random=lambda: 1.0)) as c:
        answer = c.generate("Hi")
    assert answer.text == "Bonds are loans."
    first, second = fake.calls
    assert second["at"] - first["at"] >= 0.3 * 1.5  # RetryInfo's delay, plus the jitter drawn
    assert first["metadata"]["x-request-id"] == second["metadata"]["x-request-id"]


def test_retries_are_bounded_and_the_last_error_carries_code_and_delay(fake):
    fake.script = [MeshResourceExhausted("queue full", retry_after_s=0.01)] * 5
    with client(fake) as c, pytest.raises(ResourceExhausted) as refused:
        c.generate("Hi")
    assert len(fake.calls) == NO_WAIT.max_attempts
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and refused.value.retry_after_s == 0.01
    assert refused.value.request_id == fake.calls[0]["metadata"]["x-request-id"]


def test_unavailable_is_retried_and_other_codes_are_not(fake):
    fake.script = [MeshUnavailable("the tokenizer service is unavailable")]
    with client(fake) as c:
        assert c.count_tokens("four").prompt_tokens == 4
    assert len(fake.calls) == 2
    fake.script = [NotFound("no template 'nope'")]
    with client(fake) as c, pytest.raises(NlpmeshError) as failed:
        c.count_tokens("four")
    assert failed.value.code == grpc.StatusCode.NOT_FOUND and len(fake.calls) == 3


def test_a_retry_info_delay_past_the_deadline_is_not_waited_for(fake):
    fake.script = [MeshResourceExhausted("over the rate", retry_after_s=5.0)]
    started = time.monotonic()
    with client(fake, retry=RetryPolicy(max_delay_s=60)) as c, pytest.raises(ResourceExhausted):
        c.generate("Hi", timeout_s=2.0)
    assert time.monotonic() - started < 1.0 and len(fake.calls) == 1


def test_errors_carry_the_hop_of_error_info_and_the_fields_of_bad_request(fake):
    fake.script = [MeshDeadlineExceeded("the inference hop ran out of time", hop="inference"),
                   MeshInvalidArgument.for_field("sampling.temperature", "must be in [0, 2]")]
    with client(fake) as c:
        with pytest.raises(DeadlineExceeded) as late:
            c.generate("Hi")
        with pytest.raises(InvalidArgument) as bad:
            c.generate("Hi")
    assert late.value.hop == "inference" and "inference" in str(late.value)
    assert bad.value.field_violations == (("sampling.temperature", "must be in [0, 2]"),)


def test_every_call_has_a_deadline(fake):
    with client(fake, timeout_s=7.0) as c:
        c.list_templates()
        fake.script = ["slow"]
        with pytest.raises(DeadlineExceeded):
            c.generate("Hi", timeout_s=0.2)
    assert 6.0 < fake.calls[0]["time_left_s"] < 7.5  # the wire rounds a deadline up


def test_a_stream_is_retried_before_its_first_token_only(fake):
    fake.script = [(MeshUnavailable("down"), 0)]
    with client(fake) as c:
        stream = c.stream("Hi")
        assert "".join(stream) == "Bonds are loans." and stream.result.text == "Bonds are loans."
        assert stream.result.server_timing["total"] == 12.5 and len(fake.calls) == 2

        fake.script = [(MeshUnavailable("down"), 1)]
        stream = c.stream("Hi")
        received = []
        with pytest.raises(Unavailable):
            received.extend(stream)
    assert received == ["Bonds "] and len(fake.calls) == 3


def test_leaving_a_stream_early_cancels_it_at_the_gateway(fake):
    fake.script = ["endless"]
    with client(fake) as c:
        stream = c.stream("Hi")  # held: its call is not freed (and so cancelled) by the garbage collector
        for delta in stream:
            assert delta == "more "
            break
        assert fake.ended.wait(5)

    fake.ended.clear()
    fake.script = ["endless"]

    async def main():
        async with AsyncClient(fake.address, plaintext=True) as c:
            stream = c.stream("Hi")
            async for _ in stream:
                break  # the dropped async generator is closed by asyncio's finalizer hook
            return await asyncio.to_thread(fake.ended.wait, 5)

    assert asyncio.run(main())


def test_the_async_client_makes_the_same_calls(fake):
    fake.script = [MeshResourceExhausted("over", retry_after_s=0.01), None, (MeshUnavailable("down"), 0)]

    async def main():
        async with AsyncClient(fake.address, plaintext=True, retry=NO_WAIT) as c:
            answer = await c.generate("Hi", request_id="r-1")
            stream = c.stream("Hi")
            deltas = [delta async for delta in stream]
            return answer, deltas, stream.result, await c.list_models(), await c.list_templates()

    answer, deltas, streamed, models, templates = asyncio.run(main())
    assert answer.text == "".join(deltas) == streamed.text and answer.request_id == "r-1"
    assert streamed.server_timing["cache"] == 0.62 and len(fake.calls) == 6
    assert models[0].default and models[0].context_length == 8192
    assert templates[0].variables[0].name == "question" and templates[0].variables[0].required


def test_configuration_comes_from_arguments_then_the_environment(tmp_path):
    env = {"NLPMESH_ADDR": "gw:443", "NLPMESH_API_KEY": "nm_env", "NLPMESH_CA": str(tmp_path / "ca.pem")}
    from_env = Config.resolve(env=env)
    assert (from_env.address, from_env.api_key, from_env.ca_file) == ("gw:443", "nm_env", tmp_path / "ca.pem")
    assert not from_env.plaintext
    given = Config.resolve("other:50051", api_key="nm_arg", env=env)
    assert (given.address, given.api_key) == ("other:50051", "nm_arg")
    assert Config.resolve(env={}).address == "127.0.0.1:50051"
    assert "nm_env" not in repr(from_env)


def test_plaintext_is_only_what_is_asked_for(tmp_path):
    assert Config.resolve(env={}).credentials() is not None  # TLS, with the system's roots
    assert Config.resolve(plaintext=True, env={"NLPMESH_CA": "ca.pem"}).credentials() is None
    with pytest.raises(ValueError, match="plaintext with a CA"):
        Config.resolve(ca_file=tmp_path / "ca.pem", plaintext=True, env={})


def test_bad_arguments_are_refused_before_any_call(fake):
    with client(fake) as c:
        with pytest.raises(ValueError, match="cache"):
            c.generate("Hi", cache="sometimes")
        for bad in ("x" * 129, "", "two words", "é"):
            with pytest.raises(ValueError, match="request_id"):
                c.generate("Hi", request_id=bad)
        with pytest.raises(TypeError, match="prompt"):
            c.generate([])
    assert fake.calls == []


def test_the_retry_policy_never_waits_less_than_retry_info_and_grows_without_it():
    refused = ResourceExhausted(grpc.StatusCode.RESOURCE_EXHAUSTED, "over", retry_after_s=1.0)
    unavailable = Unavailable(grpc.StatusCode.UNAVAILABLE, "down")
    bad = InvalidArgument(grpc.StatusCode.INVALID_ARGUMENT, "bad")
    policy = RetryPolicy(max_attempts=4, backoff_s=0.1, jitter=0.2, random=lambda: 0.5)
    assert policy.delay_s(refused, 1, 60) == pytest.approx(1.1)
    assert [policy.delay_s(unavailable, n, 60) for n in (1, 2, 3)] == pytest.approx([0.11, 0.22, 0.44])
    assert policy.delay_s(unavailable, 4, 60) is None  # bounded
    assert policy.delay_s(bad, 1, 60) is None
    assert policy.delay_s(refused, 1, 1.0) is None  # would outlive the deadline
    assert RetryPolicy(max_delay_s=0.5).delay_s(refused, 1, 60) is None


def test_the_bench_waits_for_the_very_request_it_times():
    # bench/run.py waits for a cache hit through the client, then times bare stubs sending cache_hits' request.
    from nlpmesh_client.calls import generate_request

    from bench.cache_hits import generate_request as timed_request

    question = "What are the applications of real-time AI in the financial industry?"
    waited = generate_request(question, "", Sampling(max_new_tokens=32), "use", 0)
    assert waited.SerializeToString() == timed_request(question, 32, gateway_pb2.CACHE_MODE_USE).SerializeToString()
