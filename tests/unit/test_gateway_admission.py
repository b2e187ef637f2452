"""Capacity control with plain objects: in-flight generations against the inference service's reports."""
from __future__ import annotations

import pytest

from gateway.capacity import CapacityGate, CapacitySettings
from gateway.refusal_metrics import ADMISSION_REFUSALS
from meshkit.errors import ResourceExhausted
from meshkit.wire import LOAD_HEADER, InferenceLoad


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def capacity_gate(clock=None, **settings) -> CapacityGate:
    return CapacityGate(CapacitySettings(**settings), clock or Clock())


def refusal(gate: CapacityGate) -> ResourceExhausted:
    with pytest.raises(ResourceExhausted) as caught, gate.generation():
        pass
    return caught.value


def test_before_any_report_every_generation_is_admitted():
    gate = capacity_gate()
    with gate.generation(), gate.generation(), gate.generation():
        assert gate.in_flight == 3
    assert gate.in_flight == 0


def test_in_flight_at_the_reported_capacity_is_refused_with_retry_info():
    gate = capacity_gate(retry_after_s=0.5)
    gate.observe(InferenceLoad(active=0, capacity=2))
    counted = ADMISSION_REFUSALS.labels("GATEWAY_AT_CAPACITY")._value.get()
    with gate.generation(), gate.generation():
        refused = refusal(gate)
    assert refused.retry_after_s == 0.5 and refused.reason == "GATEWAY_AT_CAPACITY"
    assert ADMISSION_REFUSALS.labels("GATEWAY_AT_CAPACITY")._value.get() == counted + 1  # what the alert reads
    assert gate.in_flight == 0  # the refused one never counted
    with gate.generation():  # a place freed: admitted again
        pass


def test_a_failed_generation_frees_its_place():
    gate = capacity_gate()
    gate.observe(InferenceLoad(0, 1))
    with pytest.raises(RuntimeError), gate.generation():
        raise RuntimeError("the tokenizer failed")
    with gate.generation():
        pass


def test_max_in_flight_overrides_the_reported_capacity():
    gate = capacity_gate(max_in_flight=1)
    gate.observe(InferenceLoad(0, 72))
    with gate.generation():
        assert refusal(gate).reason == "GATEWAY_AT_CAPACITY"


def test_a_fresh_report_of_a_full_inference_refuses_until_it_ages_or_a_newer_one_lifts_it():
    clock = Clock()
    gate = capacity_gate(clock, full_hold_s=0.5)
    gate.observe(InferenceLoad(active=4, capacity=4))  # filled by other gateways: this one has none in flight
    assert refusal(gate).reason == "INFERENCE_AT_CAPACITY"
    clock.now += 0.6
    with gate.generation():
        pass
    gate.observe(InferenceLoad(4, 4))
    gate.observe(InferenceLoad(3, 4))  # a generation ended
    with gate.generation():
        pass


def test_a_call_without_a_report_keeps_the_last_one():
    gate = capacity_gate()
    gate.observe(InferenceLoad(0, 1))
    gate.observe(None)
    with gate.generation():
        refusal(gate)


def test_off_admits_everything():
    gate = capacity_gate(enabled=False)
    gate.observe(InferenceLoad(9, 1))
    with gate.generation(), gate.generation():
        pass


@pytest.mark.parametrize("metadata, load", [
    (((LOAD_HEADER, "3/72"),), InferenceLoad(3, 72)),
    ((("x-request-id", "r"), (LOAD_HEADER, "0/8")), InferenceLoad(0, 8)),
    ((), None),
    (None, None),
    (((LOAD_HEADER, "3/0"),), None),
    (((LOAD_HEADER, "-1/8"),), None),
    (((LOAD_HEADER, "lots"),), None),
])
def test_the_load_report_reads_back_what_was_written_and_nothing_malformed(metadata, load):
    assert InferenceLoad.from_metadata(metadata) == load
    if load is not None:
        assert InferenceLoad.from_metadata(load.to_metadata()) == load


def test_a_cancelled_generation_takes_its_place_off_its_replicas_full_report_at_once():
    clock = Clock()
    gate = capacity_gate(clock, full_hold_s=30.0)
    gate.observe(InferenceLoad(active=2, capacity=2, replica="r1"))  # one of them ours, then cancelled
    gate.observe(InferenceLoad(active=2, capacity=2, replica="r2"))
    assert refusal(gate).reason == "INFERENCE_AT_CAPACITY"
    gate.cancelled("r1")
    with gate.generation():  # the same instant: no wait for the hold to age
        pass
    gate.observe(InferenceLoad(2, 2, "r1"))
    gate.cancelled("r3")  # a replica never heard from changes nothing
    assert refusal(gate).reason == "INFERENCE_AT_CAPACITY"
    for _ in range(3):
        gate.cancelled("r2")  # never below zero
    with gate.generation():
        pass
