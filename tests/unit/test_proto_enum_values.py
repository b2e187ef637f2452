"""Enum values written by hand in plain-Python cores agree with the generated protobuf modules."""
from nlpmesh.gateway.v1 import gateway_pb2
from nlpmesh.inference.v1 import inference_pb2

from gateway.request import CacheMode
from services.inference.generation_types import FinishReason


def named(enum_descriptor, prefix: str) -> dict[str, int]:
    """An enum's values by name, less its prefix, without the UNSPECIFIED zero."""
    return {value.name.removeprefix(prefix): value.number for value in enum_descriptor.values if value.number}


def test_the_engines_finish_reasons_are_the_inference_protos():
    assert {reason.name: reason.value for reason in FinishReason} == named(
        inference_pb2.DESCRIPTOR.enum_types_by_name["FinishReason"], "FINISH_REASON_")


def test_the_gateway_passes_an_inference_finish_reason_on_as_the_same_gateway_finish_reason():
    assert named(gateway_pb2.DESCRIPTOR.enum_types_by_name["FinishReason"], "FINISH_REASON_") == named(
        inference_pb2.DESCRIPTOR.enum_types_by_name["FinishReason"], "FINISH_REASON_")


def test_every_cache_mode_of_the_proto_has_a_meaning():
    assert {mode.name: mode.value for mode in CacheMode if mode} == named(
        gateway_pb2.DESCRIPTOR.enum_types_by_name["CacheMode"], "CACHE_MODE_")
