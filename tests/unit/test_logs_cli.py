"""`nlpmesh logs --request-id`: one request's lines across the services' log files, in time order."""
from __future__ import annotations

import json
from datetime import UTC, datetime

from cli.logs import request_lines
from cli.main import main


def text_line(local: str, message: str, request_id: str) -> str:
    return f"{local} INFO nlpmesh.x: {message} request_id={request_id} trace_id=-\n"


def json_line(at: datetime, message: str, request_id: str) -> str:
    return json.dumps({"ts": at.isoformat(timespec="milliseconds"), "level": "DEBUG", "logger": "nlpmesh.calls",
                       "message": message, "request_id": request_id, "trace_id": "-"}) + "\n"


def local_text_time(at: datetime) -> str:
    local = at.astimezone()
    return local.strftime("%Y-%m-%d %H:%M:%S,") + f"{local.microsecond // 1000:03d}"


def mesh_logs(tmp_path):
    base = datetime(2026, 12, 5, 8, 0, 0, tzinfo=UTC)

    def at(ms: int) -> datetime:
        return base.replace(microsecond=ms * 1000)

    (tmp_path / "gateway.log").write_text(
        text_line(local_text_time(at(300)), "access method=Generate status=OK", "req-1")
        + text_line(local_text_time(at(100)), "access method=Generate status=OK", "req-10")
        + "Traceback (most recent call last): request_id=req-1\n")
    (tmp_path / "template.log").write_text(json_line(at(120), "call method=Render", "req-1")
                                           + json_line(at(130), "call method=Render", "req-2"))
    (tmp_path / "inference.log").write_text(json_line(at(250), "call method=Generate", "req-1")
                                            + "not a log line at all, req-1\n")
    (tmp_path / "notes.txt").write_text(json_line(at(1), "not a service log", "req-1"))
    return tmp_path


def test_a_requests_lines_come_from_every_service_in_time_order_and_no_other_requests(tmp_path):
    lines = request_lines(mesh_logs(tmp_path), "req-1")
    assert [line.service for line in lines] == ["template", "inference", "gateway"]
    assert "method=Render" in lines[0].text and "status=OK" in lines[2].text
    assert not any("req-10" in line.text or "req-2" in line.text for line in lines)


def test_the_command_prints_each_line_with_its_service_and_fails_when_there_is_none(tmp_path, capsys):
    logs_dir = mesh_logs(tmp_path)
    assert main(["logs", "--request-id", "req-1", "--dir", str(logs_dir)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed] == ["template", "inference", "gateway"]
    assert main(["logs", "--request-id", "req-404", "--dir", str(logs_dir)]) == 1
    assert "no line of request req-404" in capsys.readouterr().out
