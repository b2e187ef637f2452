"""`nlpmesh trace` and `nlpmesh budgets` over span files written here, in the services' format."""
from __future__ import annotations

import json

import pytest

from cli import traces
from cli.main import main

MS = 1_000_000  # nanoseconds
T0 = 1_700_000_000_000 * MS


def span(trace_id, span_id, parent_id, name, service, start_ms, end_ms, kind="INTERNAL", **attributes):
    return {"trace_id": trace_id, "span_id": span_id, "parent_id": parent_id, "name": name,
            "service": f"nlpmesh-{service}", "kind": kind, "start_ns": T0 + int(start_ms * MS),
            "end_ns": T0 + int(end_ms * MS), "status": "UNSET", "attributes": attributes}


def hop(trace_id, span_id, parent_id, name, start_ms, end_ms, budget_ms):
    elapsed = end_ms - start_ms
    return span(trace_id, span_id, parent_id, f"hop {name}", "gateway", start_ms, end_ms, "CLIENT",
                **{"nlpmesh.hop": name, "nlpmesh.budget_ms": budget_ms, "nlpmesh.elapsed_ms": elapsed,
                   "nlpmesh.over_budget": elapsed > budget_ms})


def request_trace(trace_id, offset_ms=0.0, template_ms=2.0, template_budget=5.0):
    """A generated request: template over budget when template_ms > template_budget."""
    o = offset_ms
    t_end = o + 1 + template_ms
    return [
        span(trace_id, "a1", None, "nlpmesh.gateway.v1.Gateway/Generate", "gateway", o, o + 100, "SERVER"),
        hop(trace_id, "a2", "a1", "template", o + 1, t_end, template_budget),
        span(trace_id, "b1", "a2", "nlpmesh.template.v1.TemplateService/Render", "template", o + 1.2, t_end - 0.2,
             "SERVER"),
        span(trace_id, "b2", "b1", "template render", "template", o + 1.4, t_end - 0.4),
        hop(trace_id, "a3", "a1", "inference", o + 50, o + 99, 500.0),
        span(trace_id, "c1", "a3", "nlpmesh.inference.v1.InferenceService/Generate", "inference", o + 51, o + 98,
             "SERVER"),
    ]


def write(folder, spans, torn=False):
    folder.mkdir(parents=True, exist_ok=True)
    by_service: dict[str, list[str]] = {}
    for record in spans:
        by_service.setdefault(record["service"].removeprefix("nlpmesh-"), []).append(json.dumps(record))
    for service, lines in by_service.items():
        text = "\n".join(lines) + "\n"
        if torn:
            text += '{"trace_id": "half a li'
        with (folder / f"{service}.jsonl").open("a") as out:
            out.write(text)
    return folder


def line_of(text: str, name: str) -> str:
    [line] = [line for line in text.splitlines() if line.strip().startswith(name + " ") or line.strip() == name]
    return line


def test_the_waterfall_marks_the_hop_that_ran_over_its_budget(tmp_path):
    folder = write(tmp_path / "traces", request_trace("f" * 32, template_ms=9.0, template_budget=5.0))
    code, text = traces.show_trace(folder, "f" * 32)
    assert code == 0
    template, inference = line_of(text, "hop template"), line_of(text, "hop inference")
    assert "OVER" in template and "5 ms" in template and "#" in template
    assert "OVER" not in inference and "500 ms" in inference
    assert "over budget: template (9.00 ms > 5 ms)" in text


def test_the_waterfall_nests_each_span_under_its_parent_in_time_order(tmp_path):
    folder = write(tmp_path / "traces", request_trace("e" * 32))
    _, text = traces.show_trace(folder, "e" * 32)
    names = [line.strip().split("  ")[0] for line in text.splitlines()[2:]]
    assert names == ["nlpmesh.gateway.v1.Gateway/Generate", "hop template",
                     "nlpmesh.template.v1.TemplateService/Render", "template render", "hop inference",
                     "nlpmesh.inference.v1.InferenceService/Generate"]
    indents = [len(line) - len(line.lstrip()) for line in text.splitlines()[2:]]
    assert indents == [0, 2, 4, 6, 2, 4]
    render = line_of(text, "template render")
    assert " template " in render and "1.20" in render  # service and duration (ms)


def test_each_bar_sits_where_its_span_ran_on_the_timeline(tmp_path):
    folder = write(tmp_path / "traces", request_trace("d" * 32))
    _, text = traces.show_trace(folder, "d" * 32, width=50)
    root_bar = line_of(text, "nlpmesh.gateway.v1.Gateway/Generate").split("|")[1]
    inference_bar = line_of(text, "hop inference").split("|")[1]
    assert root_bar == "=" * 50
    assert inference_bar.index("=") == 25 and inference_bar.rstrip().endswith("=") and len(inference_bar) == 50


def test_last_shows_the_newest_request_and_skips_background_traces(tmp_path):
    folder = write(tmp_path / "traces", request_trace("1" * 32) + request_trace("2" * 32, offset_ms=1000))
    # A catalog refresh after the last request: a trace of its own with no gateway request in it.
    write(folder, [span("3" * 32, "z1", None, "nlpmesh.template.v1.TemplateService/ListTemplates", "template",
                        5000, 5001, "SERVER")])
    code, text = traces.show_trace(folder, None)
    assert code == 0 and text.startswith("trace " + "2" * 32)


def test_a_trace_is_found_by_a_unique_prefix_and_a_torn_line_is_skipped(tmp_path):
    folder = write(tmp_path / "traces", request_trace("ab" * 16) + request_trace("cd" * 16), torn=True)
    code, text = traces.show_trace(folder, "abababab")
    assert code == 0 and text.startswith("trace " + "ab" * 16)
    assert traces.show_trace(folder, "9" * 32)[0] == 1


def test_the_trace_command_prints_the_waterfall_and_fails_for_an_unknown_id(tmp_path, capsys):
    folder = write(tmp_path / "traces", request_trace("c" * 32, template_ms=9.0))
    assert main(["trace", "c" * 32, "--dir", str(folder)]) == 0
    assert "OVER" in capsys.readouterr().out
    assert main(["trace", "--last", "--dir", str(folder)]) == 0
    assert main(["trace", "0" * 32, "--dir", str(folder)]) == 1
    assert "not found" in capsys.readouterr().out
    assert main(["trace", "--dir", str(folder)]) == 2  # neither an id nor --last


def test_budgets_reports_each_hops_percentiles_and_overruns_over_the_last_n_requests(tmp_path, capsys):
    spans = []
    for i in range(1, 21):  # template takes 1..20 ms against a 10 ms budget: 10 overruns
        spans += request_trace(f"{i:032x}", offset_ms=1000 * i, template_ms=float(i), template_budget=10.0)
    folder = write(tmp_path / "traces", spans)

    reports = {r.hop: r for r in traces.budget_report(traces.request_traces(traces.read_spans(folder)))}
    template = reports["template"]
    # Percentiles interpolate between ranks (meshkit/percentile.py): 1..20 ms at positions 9.5, 18.05, 18.81.
    assert (template.count, template.p50_ms) == (20, 10.5)
    assert (template.p95_ms, template.p99_ms) == (pytest.approx(19.05), pytest.approx(19.81))
    assert (template.budget_ms, template.overruns) == (10.0, 10)
    assert reports["inference"].overruns == 0 and reports["inference"].p50_ms == 49.0

    assert main(["budgets", "--last", "10", "--dir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "last 10 request traces" in out
    row = line_of(out, "template").split()
    # The last 10 requests: 11..20 ms, all over.
    assert row[:7] == ["template", "10", "15.50", "19.55", "19.91", "10", "10"] and row[-1] == "OVER"
    assert line_of(out, "inference").split()[-1] == "0"


def test_budgets_with_no_spans_says_so(tmp_path, capsys):
    assert main(["budgets", "--dir", str(tmp_path)]) == 1
    assert "no request traces" in capsys.readouterr().out
