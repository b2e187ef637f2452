"""Prefix-affine routing over real in-process inference replicas (fakes), through a model's InferencePool."""
import asyncio
from contextlib import AsyncExitStack

from gateway import balancing
from gateway.inference_pool import InferencePool
from gateway.inference_stream import GenerationEnd
from gateway.settings import GatewaySettings
from meshkit.sampling import Sampling
from meshkit.server import NOT_SERVING, SERVING
from tests.polling import until
from tests.servicer.fakes import FakeInference, FakeTemplate, FakeTokenizer, fake_spec
from tests.servicer.test_gateway_replicas import DownBeforeTheFirstToken

BLOCK = 16


async def _mesh(stack, inprocess_server, fakes, routing="prefix"):
    replicas = [await stack.enter_async_context(inprocess_server(fake_spec("inf", f), GatewaySettings())) for f in fakes]
    other = await stack.enter_async_context(inprocess_server(fake_spec("tpl", FakeTemplate()), GatewaySettings()))
    tok = await stack.enter_async_context(inprocess_server(fake_spec("tok", FakeTokenizer()), GatewaySettings()))
    settings = GatewaySettings(template_addr=other.address, tokenizer_addr=tok.address, cache_addr=tok.address,
                               inference_addr=",".join(r.address for r in replicas), inference_routing=routing,
                               affinity_block_tokens=BLOCK)
    downstream = InferencePool(settings)
    await downstream.open()
    stack.push_async_callback(downstream.close)
    await downstream.connected(5.0)
    await until(lambda: all(downstream.router.ready(e) for e in downstream.router.endpoints), what="endpoints ready")
    return downstream, replicas


async def _generate(downstream, token_ids, tenant="t"):
    events = [e async for e in downstream.generate(token_ids, Sampling(), tenant, 5.0)]
    assert isinstance(events[-1], GenerationEnd)


def _prompt(prefix: int, tail: int) -> list[int]:
    return [prefix] * BLOCK + [tail] * 8


def test_prompts_sharing_their_first_block_go_to_one_replica_and_other_prefixes_spread(inprocess_server):
    async def scenario():
        async with AsyncExitStack() as stack:
            fakes = [FakeInference(), FakeInference()]
            downstream, _ = await _mesh(stack, inprocess_server, fakes)
            for tail in range(10):
                await _generate(downstream, _prompt(7, tail))
            assert sorted(f.calls for f in fakes) == [0, 10]
            for prefix in range(100, 140):
                await _generate(downstream, _prompt(prefix, 0))
            assert min(f.calls for f in fakes) >= 8, [f.calls for f in fakes]  # 40 prefixes, hashed over both

    asyncio.run(scenario())


def test_a_hot_prefix_under_concurrency_spills_to_the_other_replica_within_the_load_bound(inprocess_server):
    async def scenario():
        async with AsyncExitStack() as stack:
            fakes = [FakeInference(first_token_delay_s=0.3), FakeInference(first_token_delay_s=0.3)]
            downstream, _ = await _mesh(stack, inprocess_server, fakes)
            await asyncio.gather(*(_generate(downstream, _prompt(7, tail)) for tail in range(8)))
            assert min(f.calls for f in fakes) >= 2, [f.calls for f in fakes]

    asyncio.run(scenario())


def test_a_draining_owner_is_passed_over_and_a_failed_first_attempt_goes_to_another_replica(inprocess_server):
    async def scenario():
        async with AsyncExitStack() as stack:
            fakes = [FakeInference(), FakeInference()]
            downstream, replicas = await _mesh(stack, inprocess_server, fakes)
            await _generate(downstream, _prompt(7, 0))
            owner = next(i for i, f in enumerate(fakes) if f.calls)
            for name in ("", balancing.INFERENCE_SERVICE):
                await replicas[owner].health.set(name, NOT_SERVING)
            endpoint = downstream.router.endpoints[owner]
            await until(lambda: not downstream.router.ready(endpoint), what="the owner out of rotation")
            for tail in range(5):
                await _generate(downstream, _prompt(7, tail))
            assert fakes[owner].calls == 1 and fakes[1 - owner].calls == 5
            for name in ("", balancing.INFERENCE_SERVICE):
                await replicas[owner].health.set(name, SERVING)
            await until(lambda: downstream.router.ready(endpoint), what="the owner back")
            await _generate(downstream, _prompt(7, 9))
            assert fakes[owner].calls == 2

    asyncio.run(scenario())


def test_the_owner_failing_before_the_first_token_sends_the_retry_to_the_other_replica(inprocess_server):
    async def scenario():
        async with AsyncExitStack() as stack:
            fakes = [DownBeforeTheFirstToken(), FakeInference()]
            downstream, _ = await _mesh(stack, inprocess_server, fakes)
            for prefix in range(20):  # whichever replica owns a prefix, the answer comes
                await _generate(downstream, _prompt(prefix, 0))
            assert fakes[1].calls == 20 and 1 <= fakes[0].calls < 20

    asyncio.run(scenario())


def test_round_robin_routing_ignores_the_prefix(inprocess_server):
    async def scenario():
        async with AsyncExitStack() as stack:
            fakes = [FakeInference(), FakeInference()]
            downstream, _ = await _mesh_rr(stack, inprocess_server, fakes)
            await until(lambda: _both(downstream, fakes), what="both replicas take the same prefix")

    asyncio.run(scenario())


async def _mesh_rr(stack, inprocess_server, fakes):
    replicas = [await stack.enter_async_context(inprocess_server(fake_spec("inf", f), GatewaySettings())) for f in fakes]
    tok = await stack.enter_async_context(inprocess_server(fake_spec("tok", FakeTokenizer()), GatewaySettings()))
    settings = GatewaySettings(template_addr=tok.address, tokenizer_addr=tok.address, cache_addr=tok.address,
                               inference_addr=",".join(r.address for r in replicas), inference_routing="round_robin")
    downstream = InferencePool(settings)
    await downstream.open()
    stack.push_async_callback(downstream.close)
    assert downstream.router is None
    return downstream, replicas


async def _both(downstream, fakes) -> bool:
    for tail in range(4):
        await _generate(downstream, _prompt(7, tail))
    return all(f.calls for f in fakes)


def test_a_dns_address_is_followed_replicas_joining_and_leaving_the_ring(inprocess_server, monkeypatch):
    async def scenario():
        async with AsyncExitStack() as stack:
            fakes = [FakeInference(), FakeInference()]
            replicas = [await stack.enter_async_context(inprocess_server(fake_spec("inf", f), GatewaySettings()))
                        for f in fakes]
            tok = await stack.enter_async_context(inprocess_server(fake_spec("tok", FakeTokenizer()),
                                                                   GatewaySettings()))
            resolved = [[replicas[0].address]]  # what the name resolves to, now

            async def resolve(self, host, port):
                assert (host, port) == ("inference.test", 50055)
                return resolved[0]

            monkeypatch.setattr(InferencePool, "_resolve", resolve)
            settings = GatewaySettings(template_addr=tok.address, tokenizer_addr=tok.address, cache_addr=tok.address,
                                       inference_addr="dns:///inference.test:50055", affinity_block_tokens=BLOCK,
                                       affinity_resolve_s=0.05)
            downstream = InferencePool(settings)
            await downstream.open()
            stack.push_async_callback(downstream.close)
            router = downstream.router
            await until(lambda: router.endpoints == [replicas[0].address], what="the first address routed")
            await until(lambda: router.ready(replicas[0].address), what="ready")
            for prefix in range(10):
                await _generate(downstream, _prompt(prefix, 0))
            assert fakes[0].calls == 10
            resolved[0] = [replicas[0].address, replicas[1].address]  # scaled up
            await until(lambda: len(router.endpoints) == 2 and all(router.ready(e) for e in router.endpoints),
                        what="the second replica routed")
            for prefix in range(40):
                await _generate(downstream, _prompt(prefix, 1))
            assert fakes[1].calls >= 8
            resolved[0] = [replicas[1].address]  # scaled down
            await until(lambda: router.endpoints == [replicas[1].address], what="the first replica gone")
            before = fakes[0].calls
            for prefix in range(10):
                await _generate(downstream, _prompt(prefix, 2))
            assert fakes[0].calls == before

    asyncio.run(scenario())
