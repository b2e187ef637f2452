"""Prometheus metrics for every service (filled in by the metrics work).

The gateway calls ``observe_hop`` once per hop of every request.
"""
from __future__ import annotations


def server_interceptors(service: str) -> list:
    """Interceptors that record every served call's latency and status."""
    return []


def start_metrics_server(settings) -> None:
    """Serves /metrics on ``settings.metrics_port`` (0 = no endpoint)."""


def observe_hop(hop: str, elapsed_ms: float, budget_ms: float, over_budget: bool) -> None:
    """One hop of one gateway request: latency histogram and over-budget counter."""
