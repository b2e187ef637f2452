"""The mesh's gRPC I/O setting: set where a process starts, an operator's own kept, the image in step."""
from __future__ import annotations

import re

from cli.topology import REPO_ROOT
from meshkit.grpc_io import GRPC_EXPERIMENTS_ENV, MESH_GRPC_EXPERIMENTS, describe_grpc_io, with_mesh_grpc_io


def test_a_process_environment_gets_the_mesh_value_unless_it_names_its_own():
    assert with_mesh_grpc_io({"PATH": "/bin"}) == {"PATH": "/bin", GRPC_EXPERIMENTS_ENV: MESH_GRPC_EXPERIMENTS}
    assert with_mesh_grpc_io({GRPC_EXPERIMENTS_ENV: "-event_engine_fork"}) == {
        GRPC_EXPERIMENTS_ENV: "-event_engine_fork"}
    # Empty: the operator asks for gRPC's defaults, and gets them.
    assert with_mesh_grpc_io({GRPC_EXPERIMENTS_ENV: ""}) == {GRPC_EXPERIMENTS_ENV: ""}


def test_the_first_log_line_names_what_grpc_was_started_with():
    assert describe_grpc_io({GRPC_EXPERIMENTS_ENV: MESH_GRPC_EXPERIMENTS}) == (
        f"GRPC_EXPERIMENTS={MESH_GRPC_EXPERIMENTS}")
    assert describe_grpc_io({}) == "gRPC's default experiments"
    assert describe_grpc_io({GRPC_EXPERIMENTS_ENV: " "}) == "gRPC's default experiments"


def test_the_image_starts_every_service_with_the_same_value():
    # compose and Kubernetes run the image: its ENV is how their processes get the setting.
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    values = re.findall(r"^ENV\s+GRPC_EXPERIMENTS=(\S+)\s*$", dockerfile, flags=re.MULTILINE)
    assert values == [MESH_GRPC_EXPERIMENTS]
