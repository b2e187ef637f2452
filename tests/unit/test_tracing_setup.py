"""Where spans go: the span files the CLI reads, the OTLP switch, the launcher's trace folder."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode

from cli.launcher import LocalMesh
from gateway import hop_spans
from meshkit import span_names as names
from meshkit.settings import ServiceSettings
from meshkit.tracing.propagation import outgoing_metadata
from meshkit.tracing.provider import ChosenIds, _otlp_wanted
from meshkit.tracing.span_file import read_spans, span_file_exporter
from meshkit.tracing.stand_in import StandInSpan, span_later, start_span_later


def test_span_files_hold_one_json_line_per_span_in_the_form_the_cli_reads(tmp_path):
    provider = TracerProvider(resource=Resource.create({names.SERVICE_NAME: "nlpmesh-demo"}))
    provider.add_span_processor(SimpleSpanProcessor(span_file_exporter(tmp_path / "traces" / "demo.jsonl")))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("outer") as outer, hop_spans.hop_span(tracer, "cache", outer, 5.0) as hop:
        hop_spans.record_hop(hop, 7.5, 5.0, True)
    provider.shutdown()

    lines = (tmp_path / "traces" / "demo.jsonl").read_text().splitlines()
    assert len(lines) == 2
    spans = {s.name: s for s in read_spans(tmp_path / "traces")}
    parent, child = spans["outer"], spans["hop cache"]
    assert parent.trace_id == child.trace_id == format(outer.get_span_context().trace_id, "032x")
    assert child.parent_id == parent.span_id and parent.parent_id is None
    assert child.service == "nlpmesh-demo" and child.short_service == "demo" and child.kind == "CLIENT"
    assert (child.hop, child.budget_ms, child.elapsed_ms, child.over_budget) == ("cache", 5.0, 7.5, True)
    assert parent.start_ns <= child.start_ns <= child.end_ns <= parent.end_ns


@pytest.mark.parametrize("env, wanted", [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, True),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_TRACES_EXPORTER": "none"}, False),
])
def test_otlp_export_follows_the_standard_variables(monkeypatch, env, wanted):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _otlp_wanted() is wanted


def test_every_service_reads_the_one_trace_dir_variable(monkeypatch):
    class DemoSettings(ServiceSettings, service="demo"):
        pass

    assert DemoSettings().trace_dir == ""
    monkeypatch.setenv("NLPMESH_TRACE_DIR", "/var/spans")
    assert DemoSettings.load().trace_dir == "/var/spans"


def test_the_launcher_keeps_traces_in_its_run_folder_unless_told_otherwise(tmp_path, monkeypatch):
    monkeypatch.delenv("NLPMESH_TRACE_DIR", raising=False)
    assert LocalMesh(tmp_path / "run").trace_dir == tmp_path / "run" / "traces"
    assert LocalMesh(tmp_path, extra_env={"NLPMESH_TRACE_DIR": "/elsewhere"}).trace_dir == Path("/elsewhere")
    assert LocalMesh(tmp_path, extra_env={"NLPMESH_TRACE_DIR": ""}).trace_dir is None  # no files
    monkeypatch.setenv("NLPMESH_TRACE_DIR", "/from/env")
    assert LocalMesh(tmp_path).trace_dir == Path("/from/env")


@pytest.fixture
def recorded():
    """A tracer of its own and the spans it finished: ``tracer, finished()``."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test"), lambda: {s.name: s for s in exporter.get_finished_spans()}
    provider.shutdown()


def test_a_deferred_hop_that_stays_in_the_process_makes_no_span_and_names_its_tier_on_the_request_span(recorded):
    tracer, finished = recorded
    with (tracer.start_as_current_span("request") as request,
          hop_spans.hop_span(tracer, "cache", request, 10.0, deferred=True) as hop):
        trace.get_current_span().set_attribute(names.CACHE_TIER, "near")  # as the near tier does
        hop_spans.record_hop(hop, 0.02, 10.0, False)
    spans = finished()
    assert set(spans) == {"request"}
    assert spans["request"].attributes[names.CACHE_TIER] == "near"
    assert names.BUDGET_MS not in spans["request"].attributes  # the hop's budget is not the request's


def test_a_deferred_hop_starts_its_span_from_the_hops_start_once_a_child_needs_it(recorded):
    tracer, finished = recorded
    with (tracer.start_as_current_span("request") as request,
          hop_spans.hop_span(tracer, "cache", request, 10.0, deferred=True) as hop):
        hop.set_attribute(names.CACHE_TIER, "redis")
        with tracer.start_as_current_span(names.REDIS_LOOKUP):  # as the Redis tier does
            pass
        hop_spans.record_hop(hop, 0.4, 10.0, False)
    spans = finished()
    hop_span, lookup = spans["hop cache"], spans[names.REDIS_LOOKUP]
    assert lookup.parent.span_id == hop_span.context.span_id
    assert hop_span.parent.span_id == spans["request"].context.span_id
    assert hop_span.start_time < lookup.start_time <= lookup.end_time <= hop_span.end_time
    assert hop_span.attributes[names.HOP] == "cache" and hop_span.attributes[names.CACHE_TIER] == "redis"
    assert (hop_span.attributes[names.ELAPSED_MS], hop_span.attributes[names.BUDGET_MS]) == (0.4, 10.0)
    assert names.CACHE_TIER not in spans["request"].attributes


def test_a_deferred_hop_carries_the_trace_context_to_a_downstream_call(recorded):
    tracer, finished = recorded
    with (tracer.start_as_current_span("request") as request,
          hop_spans.hop_span(tracer, "cache", request, 10.0, deferred=True) as hop):
        metadata = dict(outgoing_metadata(hop))
    hop_span = finished()["hop cache"]
    assert metadata["traceparent"].startswith(f"00-{hop_span.context.trace_id:032x}-{hop_span.context.span_id:016x}-")


def test_a_deferred_hop_over_its_budget_shows_as_a_span(recorded):
    tracer, finished = recorded
    with (tracer.start_as_current_span("request") as request,
          hop_spans.hop_span(tracer, "cache", request, 10.0, deferred=True) as hop):
        hop_spans.record_hop(hop, 12.5, 10.0, True)
    hop_span = finished()["hop cache"]
    assert hop_span.attributes[names.OVER_BUDGET] is True and hop_span.attributes[names.ELAPSED_MS] == 12.5
    assert hop_span.parent.span_id == finished()["request"].context.span_id


def test_a_deferred_hop_that_fails_shows_as_an_error_span(recorded):
    tracer, finished = recorded
    with (tracer.start_as_current_span("request") as request, pytest.raises(TimeoutError),
          hop_spans.hop_span(tracer, "cache", request, 10.0, deferred=True)):
        raise TimeoutError
    hop_span = finished()["hop cache"]
    assert hop_span.status.status_code == StatusCode.ERROR and hop_span.status.description == "TimeoutError"


def test_a_hop_under_a_parent_that_records_nothing_makes_no_span_and_passes_the_parents_context_on(recorded):
    tracer, finished = recorded
    sampled_out = trace.NonRecordingSpan(trace.SpanContext(
        0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7, is_remote=True, trace_flags=trace.TraceFlags(0)))
    for deferred in (False, True):
        with hop_spans.hop_span(tracer, "template", sampled_out, 100.0, deferred=deferred) as hop:
            assert hop is sampled_out
            assert dict(outgoing_metadata(hop))["traceparent"] == (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00")
    assert finished() == {}


def _chosen_ids_tracer(sampler=None):
    exporter = InMemorySpanExporter()
    provider = TracerProvider(id_generator=ChosenIds(), **({"sampler": sampler} if sampler else {}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


def test_chosen_ids_are_random_except_inside_chosen():
    ids = ChosenIds()
    assert ids.generate_span_id() != ids.generate_span_id()
    with ids.chosen(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7):
        assert (ids.generate_trace_id(), ids.generate_span_id()) == (0x4BF92F3577B34DA6A3CE929D0E0E4736,
                                                                     0x00F067AA0BA902B7)
    assert ids.generate_span_id() != 0x00F067AA0BA902B7


def test_a_server_span_is_exported_when_it_ends_with_the_ids_and_start_it_had_from_the_first():
    tracer, exporter = _chosen_ids_tracer()
    server = StandInSpan(tracer, "served", trace.set_span_in_context(trace.INVALID_SPAN), SpanKind.SERVER)
    assert server.is_recording() and exporter.get_finished_spans() == ()
    with tracer.start_as_current_span("child", context=trace.set_span_in_context(server)):
        pass
    server.set_attribute(names.CACHE_TIER, "near")
    server.add_event("answered")
    server.set_status(StatusCode.ERROR, "it broke")
    server.end()
    child, exported = exporter.get_finished_spans()
    assert exported.context == server.get_span_context() and exported.parent is None
    assert exported.kind == SpanKind.SERVER and exported.attributes[names.CACHE_TIER] == "near"
    assert child.parent.span_id == exported.context.span_id
    assert exported.start_time <= child.start_time <= child.end_time <= exported.end_time
    assert [e.name for e in exported.events] == ["answered"] and exported.status.description == "it broke"


def test_a_server_span_the_sampler_drops_records_nothing_and_its_children_see_it_unsampled():
    tracer, exporter = _chosen_ids_tracer(ALWAYS_OFF)
    server = StandInSpan(tracer, "served", trace.set_span_in_context(trace.INVALID_SPAN), SpanKind.SERVER)
    assert not server.is_recording() and not server.get_span_context().trace_flags.sampled
    assert dict(outgoing_metadata(server))["traceparent"].endswith("-02")  # random id, not sampled
    server.end()
    assert exporter.get_finished_spans() == ()


def test_a_stand_in_ended_in_an_event_loop_is_made_on_its_next_turn_dated_when_it_ended():
    tracer, exporter = _chosen_ids_tracer()
    request = tracer.start_span("request")

    async def scenario():
        hop = start_span_later(tracer, "hop tokenizer", trace.set_span_in_context(request), SpanKind.CLIENT,
                               {names.HOP: "tokenizer"})
        assert isinstance(hop, StandInSpan) and hop.get_span_context().trace_id == request.get_span_context().trace_id
        hop.set_attribute(names.ELAPSED_MS, 1.5)
        hop.end()
        ended_by = time.time_ns()
        made_before = exporter.get_finished_spans()  # still on the request's path
        await asyncio.sleep(0.01)
        return hop.get_span_context(), ended_by, made_before

    context, ended_by, made_before = asyncio.run(scenario())
    assert made_before == ()
    (made,) = exporter.get_finished_spans()
    assert made.context == context and made.parent.span_id == request.get_span_context().span_id
    assert made.kind == SpanKind.CLIENT and made.attributes[names.HOP] == "tokenizer"
    assert made.attributes[names.ELAPSED_MS] == 1.5 and made.end_time <= ended_by


def test_a_tracer_that_does_not_take_chosen_ids_gets_its_own_span_at_once():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()  # random ids only: no stand-in can promise its ids
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    span = start_span_later(provider.get_tracer("test"), "hop", trace.set_span_in_context(trace.INVALID_SPAN))
    assert not isinstance(span, StandInSpan)
    span.end()
    assert [s.name for s in exporter.get_finished_spans()] == ["hop"]


def test_an_error_leaving_a_span_later_block_is_on_its_span_as_on_an_sdk_span():
    tracer, exporter = _chosen_ids_tracer()
    with pytest.raises(ValueError), tracer.start_as_current_span("sdk"):
        raise ValueError("bad")
    with pytest.raises(ValueError), span_later(tracer, "stand-in") as span:
        assert trace.get_current_span() is span
        raise ValueError("bad")
    sdk, stand_in = exporter.get_finished_spans()
    assert stand_in.status.status_code == sdk.status.status_code == StatusCode.ERROR
    assert stand_in.status.description == sdk.status.description
    assert [e.name for e in stand_in.events] == [e.name for e in sdk.events] == ["exception"]
