"""One request's scope: who calls, its budget, its ids and its hop timings, made once per call.

``with scope.hop(Hop.TOKENIZER) as hop:`` gives the hop's call its timeout
(min(hop budget, time left)) and outbound metadata (trace context and
``x-request-id``), and records the hop's timing in the response, the span and
the hop metrics when the block ends.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from opentelemetry import trace

from gateway import hop_metrics
from gateway.budgets import BudgetPolicy, ObservedLatency, RequestBudget
from gateway.hop import Hop, budgeted_as
from gateway.hop_spans import hop_span, record_hop, record_measured_hop
from gateway.quotas import QuotaLease
from gateway.tenant import Tenant
from gateway.timings import HopTiming
from meshkit.tracing.propagation import outgoing_metadata
from meshkit.wire import REQUEST_ID_HEADER, TENANT_HEADER


@dataclass(frozen=True)
class HopCall:
    """What one hop's downstream call needs."""

    span: trace.Span
    timeout_s: float
    metadata: tuple[tuple[str, str], ...]


@dataclass
class RequestScope:
    tenant: Tenant  # who calls, from the API key: salts the cache keys, travels on every hop
    request_id: str
    budget: RequestBudget
    span: trace.Span  # the request's span: every hop's span hangs from it
    tracer: trace.Tracer
    observed: ObservedLatency
    quota_lease: QuotaLease  # the tenant's quotas: generated tokens are counted on it
    hops: list[HopTiming] = field(default_factory=list)

    @property
    def started(self) -> float:
        return self.budget.started

    @contextmanager
    def hop(self, hop: Hop, deferred_span: bool = False) -> Iterator[HopCall]:
        """Times the block as ``hop``.

        ``deferred_span``: the hop makes a span only if it leaves the process, fails
        or runs over budget, as a cache lookup answered from the near tier does not.
        """
        begun = time.perf_counter()
        budget_ms = self.budget.budget_for(hop)
        with hop_span(self.tracer, hop, self.span, budget_ms, deferred=deferred_span) as span:
            succeeded = False
            try:
                call = HopCall(span, self.budget.deadline_s(hop),
                               () if deferred_span else self._metadata(span))
                yield call
                succeeded = True
            finally:
                self._record(hop, begun, time.perf_counter(), span, succeeded)

    def ensure_can_cover(self, hops: tuple[Hop, ...]) -> None:
        """Fails at once when the time left cannot cover ``hops``, as observed lately."""
        self.budget.ensure_can_cover(hops)

    def record_first_token(self, begun: float, ended: float, parent: trace.Span) -> None:
        """The time to first token, measured inside the inference hop, with a span of its own."""
        timing = self._record(Hop.INFERENCE_TTFT, begun, ended)
        if parent.is_recording():
            record_measured_hop(self.tracer, Hop.INFERENCE_TTFT, parent, _wall_ns(begun), _wall_ns(ended),
                                timing.elapsed_ms, timing.budget_ms, timing.over_budget)

    def record_coalesced(self, begun: float, ended: float) -> None:
        """A follower's wait for the generation it shares (perf_counter readings), with a span of its own."""
        timing = self._record(Hop.COALESCED, begun, ended)
        if self.span.is_recording():
            record_measured_hop(self.tracer, Hop.COALESCED, self.span, _wall_ns(begun), _wall_ns(ended),
                                timing.elapsed_ms, timing.budget_ms, timing.over_budget)

    def finish(self) -> list[HopTiming]:
        """The hops so far plus ``total``, the gateway's own wall time against the total budget."""
        self._record(Hop.TOTAL, self.started, time.perf_counter())
        return list(self.hops)

    def background_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata for work that outlives the reply (the store), in the request's trace."""
        return self._metadata(trace.get_current_span())

    def _metadata(self, span: trace.Span) -> tuple[tuple[str, str], ...]:
        return (*outgoing_metadata(span), (REQUEST_ID_HEADER, self.request_id), (TENANT_HEADER, self.tenant.id))

    def _record(self, hop: Hop, begun: float, ended: float, span: trace.Span | None = None,
                succeeded: bool = True) -> HopTiming:
        timing = HopTiming(hop, (ended - begun) * 1000.0, self.budget.budget_for(budgeted_as(hop)))
        self.hops.append(timing)
        request = self.span.get_span_context()
        # An exemplar names a trace only where the trace is kept: under a sampler, most requests' are not.
        hop_metrics.observe_hop(hop, timing.elapsed_ms, timing.budget_ms, timing.over_budget,
                                request.trace_id if request.trace_flags.sampled else 0)
        if span is not None:
            record_hop(span, timing.elapsed_ms, timing.budget_ms, timing.over_budget)
        if succeeded:
            self.observed.record(hop, timing.elapsed_ms)
        return timing


class RequestScopes:
    """Makes each request's scope: the budget policy, recent hop latencies and the tracer it shares."""

    def __init__(self, policy: BudgetPolicy, tracer: trace.Tracer):
        self._policy = policy
        self._tracer = tracer
        self.observed = ObservedLatency()

    def open(self, *, quota_lease: QuotaLease, span: trace.Span, request_id: str, template_id: str | None,
             budget_ms: int, time_left: Callable[[], float | None], started: float) -> RequestScope:
        budget = RequestBudget(self._policy.for_template(template_id), self.observed, time_left(), budget_ms,
                               started=started)
        return RequestScope(quota_lease.tenant, request_id, budget, span, self._tracer, self.observed, quota_lease)


def _wall_ns(perf: float) -> int:
    """A perf_counter reading as wall-clock nanoseconds (span timestamps)."""
    return time.time_ns() - int((time.perf_counter() - perf) * 1e9)
