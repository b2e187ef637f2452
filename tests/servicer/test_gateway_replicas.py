"""The gateway's channels over several replicas: round_robin, client-side health checks, retries by
policy, and the inference stream retried only before its first token. Real in-process gRPC servers
(fakes of the services), the gateway's own Downstream."""
import asyncio
from contextlib import AsyncExitStack

import pytest
from grpc_health.v1 import health, health_pb2
from nlpmesh.inference.v1 import inference_pb2

from gateway import balancing
from gateway.downstream import Downstream
from gateway.downstream_health import GENERATION_PATH, DownstreamHealth, HealthChecks
from gateway.inference_stream import GenerationEnd, TokenDelta
from gateway.request import TemplateCall
from gateway.settings import GatewaySettings
from meshkit.errors import Unavailable
from meshkit.sampling import Sampling
from meshkit.server import NOT_SERVING, SERVING, rpc_method
from tests.polling import until
from tests.servicer.fakes import FakeInference, FakeTemplate, FakeTokenizer, fake_spec


class DownBeforeTheFirstToken(FakeInference):
    """A replica that fails every stream UNAVAILABLE before any token (a replica on its way down)."""

    @rpc_method
    async def Generate(self, request, context):
        self.saw(context)
        raise Unavailable("going away")
        yield  # an async generator, like the real one


class DownAfterTheFirstToken(FakeInference):
    """A replica that sends one token, then fails UNAVAILABLE (killed mid-stream)."""

    @rpc_method
    async def Generate(self, request, context):
        self.saw(context)
        yield inference_pb2.GenerateChunk(delta="Hel")
        raise Unavailable("gone mid-stream")


class UnavailableOnce(FakeTemplate):
    """A template replica whose first Render fails UNAVAILABLE."""

    @rpc_method
    async def Render(self, request, context):
        if not self.calls:
            self.saw(context)
            raise Unavailable("restarting")
        return await FakeTemplate.Render.__wrapped__(self, request, context)


async def _replicas(stack: AsyncExitStack, inprocess_server, name: str, servicers) -> tuple[str, list]:
    running = [await stack.enter_async_context(inprocess_server(fake_spec(name, s), GatewaySettings()))
               for s in servicers]
    return ",".join(r.address for r in running), running


async def _downstream(stack, inprocess_server, inference=(), template=None) -> tuple[Downstream, list]:
    inference_addr, replicas = await _replicas(stack, inprocess_server, "inf", inference or [FakeInference()])
    template_addr, _ = await _replicas(stack, inprocess_server, "tpl", [template or FakeTemplate()])
    tokenizer_addr, _ = await _replicas(stack, inprocess_server, "tok", [FakeTokenizer()])
    settings = GatewaySettings(template_addr=template_addr, tokenizer_addr=tokenizer_addr,
                               cache_addr=tokenizer_addr, inference_addr=inference_addr)
    downstream = Downstream(settings)
    await downstream.open()
    stack.push_async_callback(downstream.close)
    await downstream.connected(5.0)
    await downstream.pools[0].connected(5.0)
    return downstream, replicas


async def _generate(downstream: Downstream, timeout: float = 5.0) -> list:
    return [event async for event in downstream.pools[0].generate([1, 2, 3], Sampling(), "t", timeout)]


async def _set_health(replica, status) -> None:
    for name in ("", balancing.INFERENCE_SERVICE):
        await replica.health.set(name, status)


def test_calls_are_balanced_round_robin_and_a_not_serving_replica_leaves_the_rotation_until_serving_again(
        inprocess_server):
    async def scenario():
        async with AsyncExitStack() as stack:
            fakes = [FakeInference(), FakeInference()]
            downstream, replicas = await _downstream(stack, inprocess_server, fakes)
            await until(lambda: _spread(downstream, fakes), what="both replicas in rotation")
            for _ in range(10):
                await _generate(downstream)
            assert all(f.calls >= 4 for f in fakes), [f.calls for f in fakes]

            await _set_health(replicas[0], NOT_SERVING)  # draining: reported over the Watch stream
            await until(lambda: _only(downstream, fakes, 1), what="replica 0 out of rotation")
            before = fakes[0].calls
            for _ in range(10):
                assert isinstance((await _generate(downstream))[-1], GenerationEnd)
            assert fakes[0].calls == before

            await _set_health(replicas[0], SERVING)
            await until(lambda: _spread(downstream, fakes), what="replica 0 back in rotation")

    asyncio.run(scenario())


async def _spread(downstream, fakes) -> bool:
    before = [f.calls for f in fakes]
    for _ in range(4):
        await _generate(downstream)
    return all(f.calls > b for f, b in zip(fakes, before))


async def _only(downstream, fakes, index) -> bool:
    before = [f.calls for f in fakes]
    for _ in range(4):
        await _generate(downstream)
    return all(f.calls == b for i, (f, b) in enumerate(zip(fakes, before)) if i != index)


def test_a_stream_failing_before_its_first_token_is_retried_on_another_replica(inprocess_server):
    async def scenario():
        async with AsyncExitStack() as stack:
            down, up = DownBeforeTheFirstToken(), FakeInference()
            downstream, _ = await _downstream(stack, inprocess_server, [down, up])
            for _ in range(6):
                events = await _generate(downstream)
                assert "".join(e.text for e in events if isinstance(e, TokenDelta)) == "Hello 世界"
            assert down.calls >= 1 and up.calls == 6  # every failed attempt went on to the other replica

    asyncio.run(scenario())


def test_a_stream_that_sent_a_token_is_never_retried_it_ends_unavailable(inprocess_server):
    async def scenario():
        async with AsyncExitStack() as stack:
            fakes = [DownAfterTheFirstToken(), DownAfterTheFirstToken()]
            downstream, _ = await _downstream(stack, inprocess_server, fakes)
            for attempt in range(1, 5):
                seen = []
                with pytest.raises(Unavailable):
                    async for event in downstream.pools[0].generate([1], Sampling(), "t", 5.0):
                        seen.append(event)
                assert seen == [TokenDelta("Hel")]
                assert sum(f.calls for f in fakes) == attempt  # one call per stream: no retry after a token

    asyncio.run(scenario())


def test_the_inference_retries_stop_at_three_attempts_then_unavailable(inprocess_server):
    async def scenario():
        async with AsyncExitStack() as stack:
            fakes = [DownBeforeTheFirstToken(), DownBeforeTheFirstToken()]
            downstream, _ = await _downstream(stack, inprocess_server, fakes)
            with pytest.raises(Unavailable):
                await _generate(downstream)
            assert sum(f.calls for f in fakes) == balancing.MAX_ATTEMPTS

    asyncio.run(scenario())


def test_an_idempotent_call_failing_unavailable_is_retried_by_the_channel_policy(inprocess_server):
    async def scenario():
        async with AsyncExitStack() as stack:
            template = UnavailableOnce()
            downstream, _ = await _downstream(stack, inprocess_server, template=template)
            rendered = await downstream.render(TemplateCall("finance_question", "", {"question": "q"}), 2.0)
            assert rendered.messages == (("user", "q"),)
            assert template.calls == 2  # the failed attempt and its retry, inside one call

    asyncio.run(scenario())


def test_the_generation_path_stays_serving_while_one_replica_is_and_turns_not_serving_when_none_is(
        inprocess_server):
    async def scenario():
        async with AsyncExitStack() as stack:
            downstream, replicas = await _downstream(stack, inprocess_server, [FakeInference(), FakeInference()])
            gateway = health.aio.HealthServicer()
            for name in GENERATION_PATH:
                await gateway.set(name, SERVING)
            checks = HealthChecks(interval_s=0.05, timeout_s=0.5, failures=2)
            watch = asyncio.create_task(DownstreamHealth(lambda: _generation_path(downstream), checks).watch(gateway))
            stack.callback(watch.cancel)
            await _set_health(replicas[0], NOT_SERVING)
            for _ in range(10):  # many checks, on both replicas' turns: still SERVING
                await asyncio.sleep(0.05)
                assert await _status(gateway) == SERVING
            await _set_health(replicas[1], NOT_SERVING)
            await until(lambda: _is(gateway, NOT_SERVING), what="generation NOT_SERVING with no replica ready")
            await _set_health(replicas[1], SERVING)
            await until(lambda: _is(gateway, SERVING), what="generation SERVING again")

    asyncio.run(scenario())


def _generation_path(downstream: Downstream) -> dict:
    """The channels the gateway's generation path watches: template, tokenizer and the default model's inference."""
    return {**downstream.required_channels(), "inference": downstream.pools[0].channel}


async def _status(servicer) -> int:
    return (await servicer.Check(health_pb2.HealthCheckRequest(service=""), None)).status


async def _is(servicer, status) -> bool:
    return await _status(servicer) == status

