"""A service stopped by SIGTERM writes the spans it still held (no model needed)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import grpc
import pytest
from google.protobuf import struct_pb2
from nlpmesh.template.v1 import template_pb2, template_pb2_grpc

from cli.launcher import check_health, free_port
from cli.topology import REPO_ROOT
from meshkit.tracing.span_file import read_spans
from tests.polling import wait_until

pytestmark = pytest.mark.e2e


def test_spans_held_in_the_batch_are_written_when_the_service_stops(tmp_path):
    port = free_port()
    env = {**os.environ, "NLPMESH_TEMPLATE_PORT": str(port), "NLPMESH_TRACE_DIR": str(tmp_path),
           "OTEL_BSP_SCHEDULE_DELAY": "600000"}  # nothing is written until the stop
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    process = subprocess.Popen([sys.executable, "-m", "services.template"], cwd=REPO_ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def serving() -> bool:
            assert process.poll() is None, f"the template service exited with {process.returncode}"
            return check_health(f"127.0.0.1:{port}", 0.5) == "SERVING"

        wait_until(serving, timeout_s=60, every_s=0.1, what="the template service to report SERVING")
        variables = struct_pb2.Struct()
        variables.update({"question": "What is a bond?"})
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            template_pb2_grpc.TemplateServiceStub(channel).Render(
                template_pb2.RenderRequest(id="finance_question", variables=variables), timeout=5)
        assert read_spans(tmp_path) == []
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    names = {s.name for s in read_spans(tmp_path)}
    assert {"nlpmesh.template.v1.TemplateService/Render", "template render"} <= names
