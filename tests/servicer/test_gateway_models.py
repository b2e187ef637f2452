"""The gateway serving several models: each request routed to its model's inference replicas (in-process
fakes), NOT_FOUND for a model not served, UNAVAILABLE and a health name NOT_SERVING for a model whose replicas
are down while the others keep serving, and a prompt-cache entry never shared between models."""
from __future__ import annotations

import asyncio
import uuid
from contextlib import AsyncExitStack

import grpc
from grpc_health.v1 import health_pb2
from nlpmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from gateway.__main__ import build_spec as gateway_spec
from gateway.health_names import model_health_name
from gateway.settings import GatewaySettings
from meshkit.server import NOT_SERVING, SERVING
from services.cache.servicer import build_spec as cache_spec
from services.cache.settings import CacheSettings
from tests.budget_policy import roomy_budgets
from tests.polling import until
from tests.servicer.fakes import FakeInference, FakeTemplate, FakeTokenizer, fake_spec
from tests.servicer.test_gateway_servicer import stored


def chat(model: str = "", text: str = "Hi!") -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(chat=gateway_pb2.Chat(messages=[gateway_pb2.ChatMessage(role="user",
                                                                                               content=text)]),
                                       model=model)


class ModelsMesh:
    """The gateway over fakes, one fake inference per model (``unready``: started NOT_SERVING)."""

    def __init__(self, stack: AsyncExitStack, inprocess_server):
        self.stack, self.server = stack, inprocess_server
        self.tokenizer = FakeTokenizer()
        self.replicas: dict[str, object] = {}

    async def _start(self, spec, settings=None, warm: bool = True):
        return await self.stack.enter_async_context(self.server(spec, settings or GatewaySettings(), warm=warm))

    async def start(self, models: dict[str, FakeInference], unready: tuple[str, ...] = (), redis_url: str = "",
                    **settings) -> gateway_pb2_grpc.GatewayStub:
        template = await self._start(fake_spec("tpl", FakeTemplate()))
        tokenizer = await self._start(fake_spec("tok", self.tokenizer))
        cache_addr = tokenizer.address
        if redis_url:
            cache_settings = CacheSettings(redis_url=redis_url, key_prefix=settings["key_prefix"])
            cache_addr = (await self._start(cache_spec(cache_settings), CacheSettings())).address
        for model, fake in models.items():
            self.replicas[model] = await self._start(fake_spec("inf", fake), warm=model not in unready)
        gateway_settings = GatewaySettings(
            template_addr=template.address, tokenizer_addr=tokenizer.address, cache_addr=cache_addr,
            inference_addrs={model: replica.address for model, replica in self.replicas.items()},
            redis_url=redis_url, auth="off", budgets_file=roomy_budgets(), downstream_health_interval_s=0.05,
            downstream_health_timeout_s=0.5, **settings)
        self.gateway = await self._start(gateway_spec(gateway_settings), gateway_settings)
        watch = asyncio.create_task(self.gateway.spec.watch_health(self.gateway.health))
        self.stack.callback(watch.cancel)
        return gateway_pb2_grpc.GatewayStub(self.gateway.channel)

    async def health(self, name: str) -> int:
        try:
            return (await self.gateway.health.Check(health_pb2.HealthCheckRequest(service=name), None)).status
        except Exception:  # not set yet: grpc_health aborts NOT_FOUND
            return -1

    async def set_replica_health(self, model: str, status: int) -> None:
        for name in ("", *self.replicas[model].spec.service_names):
            await self.replicas[model].health.set(name, status)


async def outcome(call):
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        return error


def run(inprocess_server, scenario):
    async def main():
        async with AsyncExitStack() as stack:
            return await scenario(ModelsMesh(stack, inprocess_server))

    return asyncio.run(main())


def test_each_request_goes_to_its_models_replicas_by_id_or_catalogue_name_and_the_reply_names_the_id(
        inprocess_server):
    smollm2, gemma3 = FakeInference(deltas=("small",), model="smollm2"), FakeInference(deltas=("gem",), model="gemma3")

    async def scenario(mesh):
        stub = await mesh.start({"smollm2": smollm2, "gemma3": gemma3})
        replies = {name: await stub.Generate(chat(name), timeout=10)
                   for name in ("", "smollm2", "gemma3", "SmolLM2-135M-Instruct", "gemma-3-270m")}
        counted = await stub.CountTokens(gateway_pb2.CountTokensRequest(chat=chat().chat, model="gemma-3-270m"),
                                         timeout=10)
        listed = await stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=10)
        return replies, counted, listed

    replies, counted, listed = run(inprocess_server, scenario)
    assert {name: (r.text, r.model) for name, r in replies.items()} == {
        "": ("small", "smollm2"), "smollm2": ("small", "smollm2"), "gemma3": ("gem", "gemma3"),
        "SmolLM2-135M-Instruct": ("small", "smollm2"), "gemma-3-270m": ("gem", "gemma3")}
    assert smollm2.request_models == ["smollm2"] * 3 and gemma3.request_models == ["gemma3"] * 2
    assert counted.model == "gemma3"
    assert [(m.id, m.revision, m.context_length, m.engine, m.ready, m.default) for m in listed.models] == [
        ("smollm2", "r1", 8192, "builtin", True, True), ("gemma3", "r1", 8192, "builtin", True, False)]


def test_a_model_not_served_is_not_found_naming_the_models_served(inprocess_server):
    async def scenario(mesh):
        stub = await mesh.start({"smollm2": FakeInference(), "gemma3": FakeInference(model="gemma3")})
        return (await outcome(stub.Generate(chat("gpt-9"), timeout=10)),
                await outcome(stub.CountTokens(gateway_pb2.CountTokensRequest(chat=chat().chat, model="gpt-9"),
                                               timeout=10)))

    for error in run(inprocess_server, scenario):
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert error.details() == "unknown model 'gpt-9'; this mesh serves smollm2, gemma3"


def test_the_default_model_can_be_another_than_the_first(inprocess_server):
    async def scenario(mesh):
        stub = await mesh.start({"smollm2": FakeInference(), "gemma3": FakeInference(model="gemma3")},
                                default_model="gemma3")
        return (await stub.Generate(chat(), timeout=10),
                await stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=10))

    reply, listed = run(inprocess_server, scenario)
    assert reply.model == "gemma3"
    assert [(m.id, m.default) for m in listed.models] == [("gemma3", True), ("smollm2", False)]


def test_a_model_whose_replicas_are_down_is_unavailable_and_not_serving_while_the_others_serve(inprocess_server):
    async def scenario(mesh):
        stub = await mesh.start({"smollm2": FakeInference(), "gemma3": FakeInference(model="gemma3")})
        gemma3, smollm2 = model_health_name("gemma3"), model_health_name("smollm2")
        await until(lambda: _all_serving(mesh, gemma3, smollm2, ""), what="both models SERVING")
        await mesh.set_replica_health("gemma3", NOT_SERVING)
        await until(lambda: _is(mesh, gemma3, NOT_SERVING), what="gemma3 NOT_SERVING")
        down = await outcome(stub.Generate(chat("gemma3"), timeout=10))
        still = await stub.Generate(chat("smollm2"), timeout=10)
        statuses = [await mesh.health(name) for name in (smollm2, "")]
        listed = await stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=10)
        await mesh.set_replica_health("gemma3", SERVING)
        await until(lambda: _is(mesh, gemma3, SERVING), what="gemma3 SERVING again")
        back = await stub.Generate(chat("gemma3"), timeout=10)
        return down, still, statuses, listed, back

    down, still, statuses, listed, back = run(inprocess_server, scenario)
    assert down.code() == grpc.StatusCode.UNAVAILABLE
    assert still.model == "smollm2" and statuses == [SERVING, SERVING]
    assert [(m.id, m.ready) for m in listed.models] == [("smollm2", True), ("gemma3", False)]
    assert back.model == "gemma3"


def test_the_gateway_serves_once_the_default_model_is_ready_and_another_model_when_it_answers(inprocess_server):
    async def scenario(mesh):
        stub = await mesh.start({"smollm2": FakeInference(), "gemma3": FakeInference(model="gemma3")},
                                unready=("gemma3",))
        early = await outcome(stub.Generate(chat("gemma3"), timeout=10))
        listed = await stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=10)
        default = await stub.Generate(chat(), timeout=10)
        health = await mesh.health(model_health_name("gemma3"))
        await mesh.set_replica_health("gemma3", SERVING)
        await until(lambda: _is(mesh, model_health_name("gemma3"), SERVING), what="gemma3 SERVING")
        return early, listed, default, health, await stub.Generate(chat("gemma3"), timeout=10)

    early, listed, default, health, late = run(inprocess_server, scenario)
    assert early.code() == grpc.StatusCode.UNAVAILABLE and early.details() == "model gemma3 is not ready yet"
    assert [(m.id, m.revision, m.ready) for m in listed.models] == [("smollm2", "r1", True), ("gemma3", "", False)]
    assert default.model == "smollm2" and health == NOT_SERVING
    assert late.model == "gemma3"


def test_two_models_never_share_a_prompt_cache_entry_even_with_the_same_revision(inprocess_server, redis_server):
    prefix = f"test:gw-{uuid.uuid4().hex}"
    first, second = FakeInference(deltas=("one",)), FakeInference(deltas=("two",), model="smollm2-b")

    async def scenario(mesh):
        stub = await mesh.start({"smollm2": first, "smollm2-b": second}, redis_url=redis_server, key_prefix=prefix)
        generated = await stub.Generate(chat("smollm2"), timeout=10)
        await stored(redis_server, prefix)
        hit = await stub.Generate(chat("smollm2"), timeout=10)
        other = await stub.Generate(chat("smollm2-b"), timeout=10)
        return generated, hit, other

    generated, hit, other = run(inprocess_server, scenario)
    assert (generated.text, generated.cache_hit) == ("one", False)
    assert (hit.text, hit.cache_hit) == ("one", True)  # the cache works for the same model...
    assert (other.text, other.cache_hit, other.model) == ("two", False, "smollm2-b")  # ...and is not shared
    assert (first.calls, second.calls) == (1, 1)


async def _is(mesh: ModelsMesh, name: str, status: int) -> bool:
    return await mesh.health(name) == status


async def _all_serving(mesh: ModelsMesh, *names: str) -> bool:
    return all([await mesh.health(name) == SERVING for name in names])


def test_replicas_serving_another_model_than_their_address_says_are_never_routed_to(inprocess_server):
    async def scenario(mesh):
        stub = await mesh.start({"smollm2": FakeInference(), "gemma3": FakeInference(model="smollm2")})
        await until(lambda: _is(mesh, model_health_name("smollm2"), SERVING), what="smollm2 SERVING")
        return (await outcome(stub.Generate(chat("gemma3"), timeout=10)),
                await stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=10))

    misrouted, listed = run(inprocess_server, scenario)
    assert misrouted.code() == grpc.StatusCode.UNAVAILABLE and misrouted.details() == "model gemma3 is not ready yet"
    assert [(m.id, m.ready) for m in listed.models] == [("smollm2", True), ("gemma3", False)]
