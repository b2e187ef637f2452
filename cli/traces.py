"""`nlpmesh trace` and `nlpmesh budgets`: the span files the services write, drawn for an SRE.

Every service appends its finished spans to ``<trace dir>/<service>.jsonl``
(meshkit/tracing/span_file.py writes and reads that format). ``trace`` draws
one request as a waterfall: one line per span, indented by nesting, with its
service, duration, a bar on the request's timeline, the hop's budget and OVER
where the hop ran past it.
``budgets`` gives each hop's p50/p95/p99 (meshkit/percentile.py) against its
budget over recent requests.
"""
from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from meshkit import span_names as names
from meshkit.percentile import percentile
from meshkit.settings import TRACE_DIR_ENV, default_home
from meshkit.tracing.span_file import SpanRecord, read_spans

GATEWAY_SERVICE = names.SERVICE_PREFIX + "gateway"


def default_trace_dir() -> Path:
    """NLPMESH_TRACE_DIR, else where `nlpmesh up` keeps them: $NLPMESH_HOME/run/traces."""
    chosen = os.environ.get(TRACE_DIR_ENV)
    return Path(chosen) if chosen else default_home() / "run" / "traces"


def by_trace(spans: list[SpanRecord]) -> dict[str, list[SpanRecord]]:
    traces: dict[str, list[SpanRecord]] = {}
    for span in spans:
        traces.setdefault(span.trace_id, []).append(span)
    return traces


def request_traces(spans: list[SpanRecord]) -> list[list[SpanRecord]]:
    """Traces of gateway requests (a gateway SERVER span in them), oldest first.

    Background calls (the gateway's catalog refresh, warm-up) make traces of
    their own; they are not requests and are left out.
    """
    traces = [
        trace for trace in by_trace(spans).values()
        if any(s.service == GATEWAY_SERVICE and s.kind == "SERVER" for s in trace)
    ]
    return sorted(traces, key=lambda trace: min(s.start_ns for s in trace))


def find_trace(spans: list[SpanRecord], trace_id: str) -> list[SpanRecord]:
    """The trace with this id (or the only one starting with it); empty if none."""
    wanted = trace_id.strip().lower()
    traces = by_trace(spans)
    if wanted in traces:
        return traces[wanted]
    matches = [t for t in traces if t.startswith(wanted)] if len(wanted) >= 8 else []
    return traces[matches[0]] if len(matches) == 1 else []


def _tree(spans: list[SpanRecord]) -> list[tuple[int, SpanRecord]]:
    """(depth, span) in drawing order: each span after its parent, siblings by start time.

    A span whose parent is not in the trace (the caller's own span, or a span
    lost) is drawn as a root.
    """
    ids = {s.span_id for s in spans}
    children: dict[str | None, list[SpanRecord]] = {}
    for span in spans:
        parent = span.parent_id if span.parent_id in ids else None
        children.setdefault(parent, []).append(span)
    for siblings in children.values():
        siblings.sort(key=lambda s: (s.start_ns, -s.end_ns))
    ordered: list[tuple[int, SpanRecord]] = []
    stack = [(0, span) for span in reversed(children.get(None, []))]
    while stack:
        depth, span = stack.pop()
        ordered.append((depth, span))
        stack.extend((depth + 1, child) for child in reversed(children.get(span.span_id, [])))
    return ordered


def waterfall(spans: list[SpanRecord], width: int = 40) -> str:
    """The trace drawn as text, one line per span (see the module docstring)."""
    if not spans:
        return "no spans"
    begin = min(s.start_ns for s in spans)
    end = max(s.end_ns for s in spans)
    total_ns = max(end - begin, 1)
    rows = _tree(spans)
    name_width = min(60, max(2 * depth + len(span.name) for depth, span in rows))
    service_width = max(len("service"), *(len(span.short_service) for _, span in rows))
    services = sorted({span.short_service for _, span in rows})
    lines = [
        f"trace {spans[0].trace_id}  {total_ns / 1e6:.2f} ms  {len(spans)} spans  services: {', '.join(services)}",
        f"{'span':<{name_width}}  {'service':<{service_width}}  {'ms':>9}  {'timeline':<{width + 2}}  budget",
    ]
    for depth, span in rows:
        label = ("  " * depth + span.name)[:name_width]
        bar = _bar(span.start_ns - begin, span.end_ns - begin, total_ns, width, "#" if span.over_budget else "=")
        budget = f"{span.budget_ms:g} ms" if span.budget_ms > 0 else ""
        marks = ("  OVER" if span.over_budget else "") + ("  ERROR" if span.status == "ERROR" else "")
        lines.append(f"{label:<{name_width}}  {span.short_service:<{service_width}}  {span.duration_ms:>9.2f}  "
                     f"|{bar}|  {budget}{marks}".rstrip())
    overruns = [s for _, s in rows if s.over_budget]
    if overruns:
        lines.append("over budget: " + ", ".join(
            f"{s.hop or s.name} ({s.elapsed_ms:.2f} ms > {s.budget_ms:g} ms)" for s in overruns))
    return "\n".join(lines)


def _bar(start_ns: int, end_ns: int, total_ns: int, width: int, fill: str) -> str:
    first = min(width - 1, int(start_ns / total_ns * width))
    last = max(first + 1, min(width, math.ceil(end_ns / total_ns * width)))
    return " " * first + fill * (last - first) + " " * (width - last)


@dataclass(frozen=True)
class HopReport:
    hop: str
    count: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    budget_ms: float  # the median budget the hop had
    overruns: int


def budget_report(traces: list[list[SpanRecord]]) -> list[HopReport]:
    """Per hop, over the given traces: elapsed percentiles, the budget and the overruns."""
    hops: dict[str, list[SpanRecord]] = {}
    for trace in traces:
        for span in trace:
            if span.hop:
                hops.setdefault(span.hop, []).append(span)
    reports = []
    for hop, spans in hops.items():
        elapsed = [s.elapsed_ms for s in spans]
        reports.append(HopReport(
            hop, len(spans), percentile(elapsed, 50), percentile(elapsed, 95), percentile(elapsed, 99),
            statistics.median(s.budget_ms for s in spans), sum(s.over_budget for s in spans),
        ))
    first_seen = {hop: i for i, hop in enumerate(hops)}
    return sorted(reports, key=lambda r: first_seen[r.hop])


def budget_table(reports: list[HopReport], traces: int) -> str:
    lines = [f"last {traces} request traces",
             f"{'hop':<16} {'count':>6} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'budget ms':>10} {'over':>6}"]
    for r in reports:
        flag = "  OVER" if r.overruns else ""
        lines.append(f"{r.hop:<16} {r.count:>6} {r.p50_ms:>9.2f} {r.p95_ms:>9.2f} {r.p99_ms:>9.2f} "
                     f"{r.budget_ms:>10g} {r.overruns:>6}{flag}")
    return "\n".join(lines)


def show_trace(trace_dir: Path, trace_id: str | None, width: int = 40) -> tuple[int, str]:
    """(exit code, text) for `nlpmesh trace`: the given trace, or the last request's when None."""
    spans = read_spans(trace_dir)
    if not spans:
        return 1, f"no spans in {trace_dir} (spans are written in batches: try again in a few seconds)"
    if trace_id is None:
        requests = request_traces(spans)
        if not requests:
            return 1, f"no request traces in {trace_dir}"
        return 0, waterfall(requests[-1], width)
    trace = find_trace(spans, trace_id)
    if not trace:
        return 1, f"trace {trace_id} not found in {trace_dir} (spans are written in batches: try again shortly)"
    return 0, waterfall(trace, width)


def show_budgets(trace_dir: Path, last: int) -> tuple[int, str]:
    """(exit code, text) for `nlpmesh budgets`."""
    traces = request_traces(read_spans(trace_dir))[-last:] if last > 0 else []
    if not traces:
        return 1, f"no request traces in {trace_dir}"
    return 0, budget_table(budget_report(traces), len(traces))
