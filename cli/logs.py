"""`nlpmesh logs --request-id X`: one request's lines from every service of a local mesh, in time order.

The launcher writes each process's output to ``<run>/logs/<name>.log`` (cli/launcher.py). A line
belongs to a request when its ``request_id`` is the one asked for: the text format ends with
``request_id=X trace_id=Y``, the JSON format has the key (meshkit/request_log.py). Text lines are
dated in local time, JSON ones in UTC: both are compared as instants.
"""
from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from meshkit.settings import default_home

_TEXT_LINE = re.compile(r"^(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .* request_id=(?P<id>\S+) trace_id=\S+$")


@dataclass(frozen=True)
class LogLine:
    at: datetime
    service: str
    text: str


def default_logs_dir() -> Path:
    return default_home() / "run" / "logs"


def request_lines(logs_dir: Path, request_id: str) -> list[LogLine]:
    """Every line of ``request_id`` in the ``*.log`` files of ``logs_dir``, oldest first (ties by service)."""
    found = [line for path in sorted(logs_dir.glob("*.log")) for line in _lines_of(path, request_id)]
    return sorted(found, key=lambda line: (line.at, line.service))


def _lines_of(path: Path, request_id: str) -> Iterator[LogLine]:
    service = path.stem
    with path.open(errors="replace") as lines:
        for raw in lines:
            if request_id not in raw:  # most lines: no parsing
                continue
            line = raw.rstrip("\n")
            at = _time_of(line, request_id)
            if at is not None:
                yield LogLine(at, service, line)


def _time_of(line: str, request_id: str) -> datetime | None:
    """When the line was written, if it is a line of ``request_id`` (text or JSON format), else None."""
    if line.startswith("{"):
        try:
            record = json.loads(line)
            if record.get("request_id") == request_id:
                return datetime.fromisoformat(record["ts"])
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        return None
    match = _TEXT_LINE.match(line)
    if match is None or match["id"] != request_id:
        return None
    return datetime.strptime(match["time"], "%Y-%m-%d %H:%M:%S,%f").astimezone()  # local time, as logged


def cmd_logs(args) -> int:
    logs_dir = Path(args.dir) if args.dir else default_logs_dir()
    if not logs_dir.is_dir():
        print(f"no logs at {logs_dir}: is a mesh up (`nlpmesh up`), or is the folder another (--dir)?")
        return 1
    lines = request_lines(logs_dir, args.request_id)
    if not lines:
        print(f"no line of request {args.request_id} in {logs_dir}")
        return 1
    width = max(len(line.service) for line in lines)
    for line in lines:
        print(f"{line.service:<{width}}  {line.text}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    logs = sub.add_parser("logs", help="one request's log lines from every service of the local mesh, in time order")
    logs.add_argument("--request-id", required=True, metavar="ID",
                      help="the x-request-id a response carried (its initial metadata; `nlpmesh ask` prints it)")
    logs.add_argument("--dir", help="the logs' folder (default: $NLPMESH_HOME/run/logs, where `nlpmesh up` writes)")
    logs.set_defaults(run=cmd_logs)
