"""Which of gRPC's I/O paths the mesh's processes run on, set where a process is started.

grpc.aio hands every completion (a call arrived, a message read, a reply sent) from gRPC's core to
the event loop through its poller thread, the one that waits on the completion queue. With gRPC's
EventEngine endpoints, the default, a socket is read and written on an EventEngine thread first, and
each event crosses one thread more before the loop sees it. Every hop of a request is a few such
events on both sides, on machines where the mesh shares its cores with an engine. gRPC 1.85 still
has its earlier path as an experiment that can be turned off: with the EventEngine client and
listener off, the thread that polls the completion queue does the socket I/O itself. The cache
bench's ``grpc_default_io`` gateway, beside the mesh's in the same run, shows what it is worth for one
hop (docs/performance.md).

gRPC reads ``GRPC_EXPERIMENTS`` once, when it is imported, so the value goes in a process's
environment before it starts: the launcher sets it for every process it starts, and the image
(Dockerfile) for compose and Kubernetes. An operator's own ``GRPC_EXPERIMENTS`` is kept as it is
(``GRPC_EXPERIMENTS=`` gives gRPC's defaults back). Each service names the value in its
``listening on`` log line.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

GRPC_EXPERIMENTS_ENV = "GRPC_EXPERIMENTS"
# gRPC's experiment names, "-" = turned off (gRPC's doc/environment_variables.md).
MESH_GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener"


def with_mesh_grpc_io(env: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """``env`` with the mesh's GRPC_EXPERIMENTS, unless it already names its own."""
    env.setdefault(GRPC_EXPERIMENTS_ENV, MESH_GRPC_EXPERIMENTS)
    return env


def describe_grpc_io(env: Mapping[str, str] = os.environ) -> str:
    """What this process's gRPC was started with, for its ``listening on`` log line."""
    chosen = env.get(GRPC_EXPERIMENTS_ENV, "").strip()
    return f"GRPC_EXPERIMENTS={chosen}" if chosen else "gRPC's default experiments"
