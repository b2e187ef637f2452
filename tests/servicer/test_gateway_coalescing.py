"""Request coalescing at the gateway (gateway/coalescing.py), over real in-process channels: the real template
and cache services, a private Redis, fake tokenizer and inference that count their calls."""
from __future__ import annotations

import asyncio
import time
import uuid

import grpc
from google.protobuf import struct_pb2
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from cli.launcher import free_port
from gateway.__main__ import build_spec as gateway_spec
from gateway.api_keys import create_key
from gateway.settings import GatewaySettings
from gateway.tenant import Tenant
from meshkit.errors import Unavailable
from services.cache.servicer import build_spec as cache_spec
from services.cache.settings import CacheSettings
from services.template.servicer import build_spec as template_spec
from services.template.settings import TemplateSettings
from tests.budget_policy import roomy_budgets
from tests.servicer.fakes import FakeInference, FakeTokenizer, fake_spec
from tests.servicer.gateway_mesh import run_mesh

ANSWER = "Hello 世界"  # FakeInference's deltas, joined
C = grpc.StatusCode


def question(text: str | None = None, cache_mode=gateway_pb2.CACHE_MODE_USE, budget_ms: int = 0,
             **sampling) -> gateway_pb2.GenerateRequest:
    variables = struct_pb2.Struct()
    variables.update({"question": text or f"What is a bond? ({uuid.uuid4().hex[:8]})"})
    return gateway_pb2.GenerateRequest(
        template=gateway_pb2.TemplateCall(id="finance_question", variables=variables),
        sampling=gateway_pb2.SamplingParams(max_new_tokens=3, **sampling), cache_mode=cache_mode,
        budget_ms=budget_ms)


def slow_inference(first_token_delay_s: float = 0.5) -> FakeInference:
    """Slow enough that every request of a burst arrives while the first one's generation runs."""
    return FakeInference(first_token_delay_s=first_token_delay_s)


def hops(reply) -> list[str]:
    return [t.hop for t in reply.timings]


async def streamed(stub, request, metadata=None) -> tuple[str, gateway_pb2.GenerateChunk]:
    """The whole text of a GenerateStream and its last chunk."""
    parts, last = [], None
    async for chunk in stub.GenerateStream(request, metadata=metadata, timeout=30):
        parts.append(chunk.delta)
        last = chunk
    return "".join(parts), last


def test_ten_identical_concurrent_requests_cause_one_generation(inprocess_server, redis_server):
    async def scenario(stub, tokenizer, inference):
        request = question()
        replies = await asyncio.gather(*(stub.Generate(request, timeout=30) for _ in range(10)))
        return replies, inference.calls, tokenizer.calls

    replies, generations, encodes = run_mesh(inprocess_server, redis_server, scenario, inference=slow_inference())
    assert generations == 1 and encodes == 1
    assert [r.text for r in replies] == [ANSWER] * 10
    assert all(r.usage.completion_tokens == 3 for r in replies)
    leaders = [r for r in replies if "inference" in hops(r)]
    followers = [r for r in replies if "coalesced" in hops(r)]
    assert len(leaders) == 1 and len(followers) == 9
    assert all(hops(r) == ["cache", "coalesced", "total"] for r in followers)
    assert not any(r.cache_hit for r in replies)


def test_identical_streams_coalesce_without_redis_and_each_gets_every_delta(inprocess_server, redis_server):
    async def scenario(stub, tokenizer, inference):
        request = question()
        first = asyncio.ensure_future(streamed(stub, request))
        await asyncio.sleep(0.2)  # the generation is under way: the others replay it from its start
        rest = await asyncio.gather(*(streamed(stub, request) for _ in range(4)))
        return [await first, *rest], inference.calls

    # No Redis for the gateway: no prompt cache, so coalescing is the only sharing.
    results, generations = run_mesh(inprocess_server, "", scenario, inference=slow_inference(),
                                    cache_redis_url=redis_server)
    assert generations == 1
    assert [text for text, _ in results] == [ANSWER] * 5
    assert sorted("coalesced" in hops(last) for _, last in results) == [False] + [True] * 4


def test_a_redis_that_fails_leaves_coalescing_within_the_gateway(inprocess_server, redis_server):
    async def scenario(stub, tokenizer, inference):
        request = question()
        replies = await asyncio.gather(*(stub.Generate(request, timeout=30) for _ in range(5)))
        return replies, inference.calls

    # The gateway's Redis refuses every connection: no lease, no cache, and no error for the callers.
    replies, generations = run_mesh(inprocess_server, f"redis://127.0.0.1:{free_port()}/0", scenario,
                                    inference=slow_inference(), cache_redis_url=redis_server)
    assert generations == 1
    assert [r.text for r in replies] == [ANSWER] * 5


def test_a_sampled_request_is_never_coalesced(inprocess_server, redis_server):
    async def scenario(stub, tokenizer, inference):
        request = question(temperature=0.7)  # no seed: each call may answer differently
        replies = await asyncio.gather(*(stub.Generate(request, timeout=30) for _ in range(4)))
        return replies, inference.calls

    replies, generations = run_mesh(inprocess_server, redis_server, scenario, inference=slow_inference())
    assert generations == 4
    assert not any("coalesced" in hops(r) for r in replies)


def test_a_seeded_sampled_request_is_coalesced(inprocess_server, redis_server):
    async def scenario(stub, tokenizer, inference):
        request = question(temperature=0.7, seed=7)
        await asyncio.gather(*(stub.Generate(request, timeout=30) for _ in range(4)))
        return inference.calls

    assert run_mesh(inprocess_server, redis_server, scenario, inference=slow_inference()) == 1


def test_bypass_requests_are_never_coalesced(inprocess_server, redis_server):
    async def scenario(stub, tokenizer, inference):
        request = question(cache_mode=gateway_pb2.CACHE_MODE_BYPASS)
        await asyncio.gather(*(stub.Generate(request, timeout=30) for _ in range(3)))
        return inference.calls

    assert run_mesh(inprocess_server, redis_server, scenario, inference=slow_inference()) == 3


def test_two_tenants_identical_prompts_are_never_coalesced(inprocess_server, redis_server, tmp_path):
    keys = tmp_path / "keys.toml"
    _, acme = create_key(keys, Tenant("acme"))
    _, globex = create_key(keys, Tenant("globex"))

    async def scenario(channel, tokenizer, inference):
        stub = gateway_pb2_grpc.GatewayStub(channel)
        request = question()
        replies = await asyncio.gather(*(
            stub.Generate(request, metadata=(("authorization", f"Bearer {key}"),), timeout=30)
            for key in (acme, globex, acme, globex)))
        return replies, sorted(inference.request_tenants)

    replies, tenants = run_mesh(inprocess_server, redis_server, scenario, inference=slow_inference(),
                                pass_channel=True, auth="on", auth_keys_file=keys, auth_reload_s=0.05)
    assert tenants == ["acme", "globex"]  # one generation per tenant, none shared between them
    assert sum("coalesced" in hops(r) for r in replies) == 2


def test_a_follower_that_cancels_leaves_the_others_to_complete(inprocess_server, redis_server):
    async def scenario(stub, tokenizer, inference):
        request = question()
        leader = asyncio.ensure_future(streamed(stub, request))
        await asyncio.sleep(0.1)
        quitter = stub.GenerateStream(request, timeout=30)
        others = [asyncio.ensure_future(streamed(stub, request)) for _ in range(3)]
        await asyncio.sleep(0.1)
        quitter.cancel()
        return await leader, await asyncio.gather(*others), inference.calls

    leader, others, generations = run_mesh(inprocess_server, redis_server, scenario, inference=slow_inference())
    assert generations == 1
    assert leader[0] == ANSWER and [text for text, _ in others] == [ANSWER] * 3


def test_a_leader_that_cancels_leaves_its_followers_to_complete(inprocess_server, redis_server):
    async def scenario(stub, tokenizer, inference):
        request = question()
        leader = stub.GenerateStream(request, timeout=30)
        await asyncio.sleep(0.1)  # its generation has started
        followers = [asyncio.ensure_future(streamed(stub, request)) for _ in range(3)]
        await asyncio.sleep(0.1)
        leader.cancel()
        return await asyncio.gather(*followers), inference.calls

    followers, generations = run_mesh(inprocess_server, redis_server, scenario, inference=slow_inference())
    assert generations == 1
    assert [text for text, _ in followers] == [ANSWER] * 3
    assert all("coalesced" in hops(last) for _, last in followers)


def test_a_failing_generation_gives_each_follower_its_status_quickly(inprocess_server, redis_server):
    inference = slow_inference()
    inference.fail_with = Unavailable("the engine is gone")

    async def scenario(stub, tokenizer, inference):
        request = question()
        began = time.monotonic()
        outcomes = await asyncio.gather(*(stub.Generate(request, timeout=30) for _ in range(5)),
                                        return_exceptions=True)
        return outcomes, time.monotonic() - began, inference.calls

    outcomes, seconds, generations = run_mesh(inprocess_server, redis_server, scenario, inference=inference)
    assert [o.code() for o in outcomes] == [C.UNAVAILABLE] * 5
    assert all("Traceback" not in o.details() for o in outcomes)
    assert generations <= 3  # the first failed attempt and the pool's retries: never one per caller
    assert seconds < 10


def test_a_leader_out_of_budget_leaves_its_followers_to_generate_their_own(inprocess_server, redis_server):
    async def scenario(stub, tokenizer, inference):
        text = f"What is a bond? ({uuid.uuid4().hex[:8]})"
        leader = asyncio.ensure_future(stub.Generate(question(text, budget_ms=300), timeout=30))
        await asyncio.sleep(0.1)
        followers = [asyncio.ensure_future(stub.Generate(question(text), timeout=30)) for _ in range(3)]
        leader_error = await asyncio.gather(leader, return_exceptions=True)
        return leader_error[0], await asyncio.gather(*followers), inference.calls

    leader, followers, generations = run_mesh(inprocess_server, redis_server, scenario,
                                              inference=slow_inference(first_token_delay_s=0.6))
    assert leader.code() == C.DEADLINE_EXCEEDED
    assert [r.text for r in followers] == [ANSWER] * 3
    assert generations == 2  # the leader's, cut short; then one the followers shared again
    assert sum("coalesced" in hops(r) for r in followers) == 2


def test_a_follower_on_another_gateway_waits_for_the_stored_answer(inprocess_server, redis_server):
    """Two gateways on one Redis and one inference: identical requests to each cost one generation."""
    async def scenario(first, second, inference):
        request = question()
        one = asyncio.ensure_future(first.Generate(request, timeout=30))
        await asyncio.sleep(0.1)  # the first gateway holds the lease
        two = await second.Generate(request, timeout=30)
        return await one, two, inference.calls

    one, two, generations = asyncio.run(two_gateways(inprocess_server, redis_server, scenario))
    assert generations == 1
    assert one.text == two.text == ANSWER
    assert "coalesced" in hops(two) and two.cache_hit


def test_without_the_lease_each_gateway_generates_its_own(inprocess_server, redis_server):
    """The control of the test above: coalescing off, the same two calls cost two generations."""
    async def scenario(first, second, inference):
        request = question()
        one = asyncio.ensure_future(first.Generate(request, timeout=30))
        await asyncio.sleep(0.1)
        await second.Generate(request, timeout=30)
        await one
        return inference.calls

    assert asyncio.run(two_gateways(inprocess_server, redis_server, scenario, coalescing="off")) == 2


def test_leases_are_taken_renewed_and_released_as_the_gateways_redis_user(inprocess_server, acl_redis):
    """deploy/redis/users.acl lets the gateway's user hold leases: across gateways one generation, none refused."""
    async def scenario(first, second, inference):
        request = question()
        one = asyncio.ensure_future(first.Generate(request, timeout=30))
        await asyncio.sleep(0.1)
        two = await second.Generate(request, timeout=30)
        return await one, two, inference.calls

    one, two, generations = asyncio.run(two_gateways(
        inprocess_server, acl_redis.url("gateway"), scenario, key_prefix="nlpmesh:pc",
        cache_redis_url=acl_redis.url("cache"), coalescing_lease_s=0.2))  # renewed while the generation runs
    assert generations == 1 and one.text == two.text == ANSWER
    assert acl_redis.refused() == []


async def two_gateways(inprocess_server, redis_url: str, scenario, key_prefix: str | None = None,
                       cache_redis_url: str | None = None, **gateway_settings):
    """Template, cache, fake tokenizer and inference, and two gateways sharing them and one Redis (and key
    prefix): scenario(first stub, second stub, inference)."""
    key_prefix = key_prefix or f"test:coalesce-{uuid.uuid4().hex}"
    inference = slow_inference()
    async with (
        inprocess_server(template_spec(TemplateSettings()), TemplateSettings()) as template,
        inprocess_server(cache_spec(CacheSettings(redis_url=cache_redis_url or redis_url, key_prefix=key_prefix)),
                         CacheSettings()) as cache,
        inprocess_server(fake_spec("tok", FakeTokenizer()), GatewaySettings()) as tok,
        inprocess_server(fake_spec("inf", inference), GatewaySettings()) as inf,
    ):
        settings = GatewaySettings(
            template_addr=template.address, cache_addr=cache.address, tokenizer_addr=tok.address,
            inference_addr=inf.address, redis_url=redis_url, key_prefix=key_prefix, auth="off",
            budgets_file=roomy_budgets(), **gateway_settings)
        async with (inprocess_server(gateway_spec(settings), settings) as first,
                    inprocess_server(gateway_spec(settings), settings) as second):
            return await scenario(gateway_pb2_grpc.GatewayStub(first.channel),
                                  gateway_pb2_grpc.GatewayStub(second.channel), inference)


def test_followers_request_spans_say_they_shared_and_a_coalesced_hop_span_times_the_wait(
        inprocess_server, redis_server, finished_spans):
    async def scenario(stub, tokenizer, inference):
        finished_spans.clear()
        request = question()
        await asyncio.gather(*(stub.Generate(request, timeout=30) for _ in range(3)))

    run_mesh(inprocess_server, redis_server, scenario, inference=slow_inference())
    spans = finished_spans.get_finished_spans()
    requests = [s for s in spans if s.name == "nlpmesh.gateway.v1.Gateway/Generate"]
    assert sorted(str(s.attributes.get("nlpmesh.coalesced")) for s in requests) == ["None", "stream", "stream"]
    assert len([s for s in spans if s.name == "hop coalesced"]) == 2
    assert len([s for s in spans if s.name == "hop inference"]) == 1
