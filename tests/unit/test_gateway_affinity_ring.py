"""Prefix-affine routing: the route key, the consistent-hash ring, bounded load (no network)."""
import grpc
import pytest

from gateway.affinity import AffineRouter, HashRing, route_key
from meshkit.wire import InferenceLoad

ENDPOINTS = ["127.0.0.1:50055", "127.0.0.1:50065", "127.0.0.1:50075"]


class FakeChannel:
    def __init__(self):
        self.state = grpc.ChannelConnectivity.READY

    def get_state(self, try_to_connect=False):
        return self.state


def _router(endpoints=ENDPOINTS, **kwargs):
    channels = {e: FakeChannel() for e in endpoints}
    return AffineRouter(channels, **kwargs), channels


def _keys(count):
    return [route_key(list(range(i, i + 20)), 16, "t", "m") for i in range(count)]


def test_the_key_is_the_first_block_salted_by_tenant_and_model_and_none_without_a_full_block_to_reuse():
    prompt = list(range(40))
    assert route_key(prompt, 16, "a", "m") == route_key(prompt[:16] + [999] * 30, 16, "a", "m")  # only the first block
    assert route_key(prompt, 16, "a", "m") != route_key([1] + prompt[1:], 16, "a", "m")
    assert route_key(prompt, 16, "a", "m") != route_key(prompt, 16, "b", "m")  # tenants never share blocks
    assert route_key(prompt, 16, "a", "m") != route_key(prompt, 16, "a", "n")  # nor do models
    assert route_key(prompt, 16, "a", "m") != route_key(prompt, 16, "am", "")  # the parts are delimited
    assert route_key(prompt[:16], 16, "a", "m") is None  # one block, all of it prefilled: nothing to reuse
    assert route_key(prompt[:17], 16, "a", "m") is not None


def test_the_ring_spreads_keys_and_losing_an_endpoint_moves_only_its_keys():
    keys = _keys(600)
    full, less = HashRing(ENDPOINTS), HashRing(ENDPOINTS[:2])
    owners = [next(full.walk(k)) for k in keys]
    share = {e: owners.count(e) / len(keys) for e in ENDPOINTS}
    assert all(0.2 < s < 0.47 for s in share.values()), share
    for key, owner in zip(keys, owners):
        if owner != ENDPOINTS[2]:
            assert next(less.walk(key)) == owner
    assert sorted(full.walk(keys[0])) == sorted(ENDPOINTS)  # every endpoint once


def test_a_key_sticks_to_its_replica_while_load_is_within_the_bound_then_spills_along_the_ring():
    router, _ = _router(load_factor=1.25)
    key = _keys(1)[0]
    owner = router.pick(key)
    assert all(router.pick(key) == owner for _ in range(10))  # nothing in flight: always the owner
    held = []
    spilled = set()
    for _ in range(6):  # a hot prefix under concurrency: bounded by 1.25 x the mean
        endpoint = router.pick(key)
        spilled.add(endpoint)
        held.append(router.call(endpoint))
        held[-1].__enter__()
    assert owner in spilled and len(spilled) > 1
    assert max(router.in_flight(e) for e in ENDPOINTS) <= 3
    for call in held:
        call.__exit__(None, None, None)
    assert router.pick(key) == owner


def test_a_replica_reported_full_or_not_ready_is_passed_over():
    now = [10.0]
    router, channels = _router(full_hold_s=0.5, clock=lambda: now[0])
    key = _keys(1)[0]
    owner = router.pick(key)
    router.observe(owner, InferenceLoad(4, 4))
    assert router.pick(key) != owner
    now[0] += 1.0  # the report is old: maybe room again
    assert router.pick(key) == owner
    channels[owner].state = grpc.ChannelConnectivity.TRANSIENT_FAILURE  # down, or NOT_SERVING (draining)
    second = router.pick(key)
    assert second != owner
    assert router.pick(key, frozenset({second})) not in (owner, second)
    for channel in channels.values():
        channel.state = grpc.ChannelConnectivity.CONNECTING
    assert router.pick(key) is None


def test_a_load_factor_below_one_is_refused():
    with pytest.raises(ValueError):
        _router(load_factor=0.5)


def test_a_call_that_outlives_its_endpoints_place_on_the_ring_reports_without_failing():
    # A rolling update: the name stops resolving to a draining replica while its stream still runs.
    router, channels = _router()
    gone = ENDPOINTS[2]
    with router.call(gone):
        router.observe(gone, InferenceLoad(1, 4, "r3"))
        router.update({e: c for e, c in channels.items() if e != gone})
        router.observe(gone, InferenceLoad(0, 4, "r3"))  # its trailing report: nothing to keep, no KeyError
    assert gone not in {router.pick(key, frozenset()) for key in _keys(50)}
