"""Where spans go: the span files the CLI reads, the OTLP switch, the launcher's trace folder."""
from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from cli.launcher import LocalMesh
from cli.traces import read_spans
from meshkit import span_names as names
from meshkit import tracing
from meshkit.settings import ServiceSettings


def test_span_files_hold_one_json_line_per_span_in_the_form_the_cli_reads(tmp_path):
    provider = TracerProvider(resource=Resource.create({names.SERVICE_NAME: "nlpmesh-demo"}))
    provider.add_span_processor(SimpleSpanProcessor(tracing.span_file_exporter(tmp_path / "traces" / "demo.jsonl")))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("outer") as outer, tracing.hop_span(tracer, "cache", outer, 5.0) as hop:
        tracing.record_hop(hop, 7.5, 5.0, True)
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
    assert tracing._otlp_wanted() is wanted


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
