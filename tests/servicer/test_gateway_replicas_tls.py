"""Replicas under mTLS: the balanced channel over an address list, and the per-endpoint channels of
prefix-affine routing (a list, and the addresses a dns:/// name resolves to), verify the replicas'
certificates and present the gateway's."""
import asyncio
from contextlib import AsyncExitStack

import pytest

from cli.certs import init_certs
from gateway.inference_pool import InferencePool
from gateway.inference_stream import GenerationEnd
from gateway.settings import GatewaySettings
from meshkit.sampling import Sampling
from meshkit.settings import ServiceSettings
from tests.polling import until
from tests.servicer.fakes import FakeInference, fake_spec


class InferenceSettings(ServiceSettings, service="inference"):
    pass


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs")
    init_certs(folder)
    return folder


@pytest.mark.parametrize("routing, address", [("round_robin", "list"), ("prefix", "list"), ("prefix", "dns")])
def test_generations_reach_both_replicas_over_mtls(inprocess_server, certs, routing, address):
    async def scenario():
        async with AsyncExitStack() as stack:
            fakes = [FakeInference(), FakeInference()]
            replicas = [await stack.enter_async_context(inprocess_server(fake_spec("inf", f),
                                                                         InferenceSettings(tls_dir=str(certs))))
                        for f in fakes]
            ports = [r.address.rpartition(":")[2] for r in replicas]
            if address == "list":
                inference_addr = ",".join(r.address for r in replicas)
            else:  # resolved by the test: both replicas behind one name, as a headless Service
                inference_addr = "dns:///localhost:50055"

                async def resolve(self, host, port):
                    return [f"127.0.0.1:{p}" for p in ports]

                InferencePool._resolve, original = resolve, InferencePool._resolve
                stack.callback(setattr, InferencePool, "_resolve", original)
            settings = GatewaySettings(tls_dir=str(certs), inference_addr=inference_addr, inference_routing=routing,
                                       affinity_block_tokens=4, affinity_resolve_s=0.05)
            downstream = InferencePool(settings)
            await downstream.open()
            stack.push_async_callback(downstream.close)
            if routing == "prefix":  # connected and SERVING: the health checks went over mTLS too
                await until(lambda: len(downstream.router.endpoints) == 2
                            and all(downstream.router.ready(e) for e in downstream.router.endpoints),
                            what="both endpoints ready")

            async def both_answered() -> bool:
                # Prefix routing is deterministic per prompt, and the ring changes with the free ports: 8
                # prompts all owned by one replica was a 1-in-128 chance. Up to 64 distinct prompts (2^-63).
                for prefix in range(64):
                    events = [e async for e in downstream.generate([prefix] * 8, Sampling(), "t", 5.0)]
                    assert isinstance(events[-1], GenerationEnd)
                    if all(f.calls for f in fakes):
                        return True
                return False

            await until(both_answered, timeout_s=10, what="both replicas answering over mTLS")

    asyncio.run(scenario())
