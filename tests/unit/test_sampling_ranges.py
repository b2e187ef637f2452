"""The sampling ranges, written once in meshkit/sampling.py: each field's ends, NaN and infinities."""
from __future__ import annotations

import pytest

from meshkit.sampling import API_LIMITS, Sampling, SamplingLimits

INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("fields, field", [
    ({"temperature": 1e9}, "sampling.temperature"),
    ({"temperature": 2.000001}, "sampling.temperature"),
    ({"temperature": -0.1}, "sampling.temperature"),
    ({"temperature": NAN}, "sampling.temperature"),
    ({"temperature": INF}, "sampling.temperature"),
    ({"temperature": -INF}, "sampling.temperature"),
    ({"top_p": 1.5}, "sampling.top_p"),
    ({"top_p": -0.2}, "sampling.top_p"),
    ({"top_p": NAN}, "sampling.top_p"),
    ({"top_p": INF}, "sampling.top_p"),
    ({"top_k": 1001}, "sampling.top_k"),
    ({"top_k": -1}, "sampling.top_k"),
    ({"max_new_tokens": 2049}, "sampling.max_new_tokens"),
    ({"stop": ("a", "b", "c", "d", "e")}, "sampling.stop"),
    ({"stop": ("x" * 65,)}, "sampling.stop"),
    ({"stop": ("",)}, "sampling.stop"),
    ({"repetition_penalty": 2.01}, "sampling.repetition_penalty"),
    ({"repetition_penalty": -0.5}, "sampling.repetition_penalty"),
    ({"repetition_penalty": NAN}, "sampling.repetition_penalty"),
    ({"presence_penalty": 2.5}, "sampling.presence_penalty"),
    ({"presence_penalty": -INF}, "sampling.presence_penalty"),
    ({"frequency_penalty": -2.01}, "sampling.frequency_penalty"),
    ({"frequency_penalty": NAN}, "sampling.frequency_penalty"),
    ({"logprobs": 21}, "sampling.logprobs"),
])
def test_a_value_out_of_its_range_is_named(fields, field):
    assert [v.field for v in Sampling(**fields).violations()] == [field]


def test_the_ends_of_every_range_are_accepted():
    edges = Sampling(max_new_tokens=2048, temperature=2.0, top_p=1.0, top_k=1000, seed=2 ** 64 - 1,
                     stop=("x" * 64,) * 4, repetition_penalty=2.0, presence_penalty=-2.0, frequency_penalty=2.0,
                     logprobs=20)
    assert edges.violations() == []
    assert Sampling(logprobs=0).violations() == []  # the chosen token's alone
    assert Sampling().violations() == []  # every field unset: greedy, the server's default length


def test_every_bad_field_is_reported_at_once():
    fields = [v.field for v in Sampling(temperature=NAN, top_p=2, top_k=10 ** 6, max_new_tokens=10 ** 6,
                                        stop=("",)).violations()]
    assert fields == ["sampling.temperature", "sampling.top_p", "sampling.top_k", "sampling.max_new_tokens",
                      "sampling.stop"]


def test_a_description_states_the_range():
    [violation] = Sampling(temperature=1e9).violations()
    assert "[0, 2]" in violation.description


def test_narrower_limits_narrow_the_range():
    narrow = SamplingLimits(max_new_tokens=50)
    assert [v.field for v in Sampling(max_new_tokens=51).violations(narrow)] == ["sampling.max_new_tokens"]
    assert Sampling(max_new_tokens=51).violations(API_LIMITS) == []


def test_the_penalties_and_logprobs_cross_every_proto_and_logprobs_are_never_cached():
    from nlpmesh.cache.v1 import cache_pb2
    from nlpmesh.gateway.v1 import gateway_pb2
    from nlpmesh.inference.v1 import inference_pb2

    sampling = Sampling(temperature=0.7, seed=3, repetition_penalty=1.3, presence_penalty=-0.4,
                        frequency_penalty=0.6, logprobs=5)
    for message in (gateway_pb2.SamplingParams, inference_pb2.Sampling, cache_pb2.Sampling):
        assert Sampling.from_pb(sampling.to_pb(message)) == sampling
    assert Sampling.from_pb(Sampling(logprobs=0).to_pb(inference_pb2.Sampling)).logprobs == 0  # set, not unset
    assert Sampling(seed=1).cacheable and Sampling(repetition_penalty=1.5).cacheable
    assert not Sampling(logprobs=0).cacheable and not Sampling(temperature=0.5).cacheable
