"""The metadata contracts that cross process boundaries: headers, trailers and load reports.

Every process that writes one of these and every process that reads it imports it
from here, so that no service imports another service's package for a wire contract.
Plain Python: no grpc here.

- ``x-request-id``: the caller's request id, sent on to every hop and echoed back in
  the gateway's initial metadata (``meshkit.request_log``).
- ``x-nlpmesh-tenant``: the caller's tenant on every hop the gateway calls.
- ``server-timing``: the gateway's trailer with every hop's elapsed time and budget.
- ``x-nlpmesh-inference-load`` and ``x-nlpmesh-inference-replica``: how loaded an
  inference replica is, as it reports it to its callers (``InferenceLoad`` below).

Every ``Generate`` carries ``x-nlpmesh-inference-load: <active>/<capacity>`` in its
initial metadata (taken once the request is queued) and in its trailing metadata
(when it ends, or is refused); ``ModelInfo`` carries it too, so a caller knows the
capacity before its first generation. With several replicas, each one names itself
in ``x-nlpmesh-inference-replica`` (an id made at its start, nothing else in it), so
a caller can keep one report per replica. ``active`` is the requests queued or
running, ``capacity`` is ``max_running + max_queue``: past it the engine refuses
with RESOURCE_EXHAUSTED. The gateway's capacity control reads it
(gateway/capacity.py).
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

REQUEST_ID_HEADER = "x-request-id"
TENANT_HEADER = "x-nlpmesh-tenant"
SERVER_TIMING_TRAILER = "server-timing"
LOAD_HEADER = "x-nlpmesh-inference-load"
REPLICA_HEADER = "x-nlpmesh-inference-replica"
_REPLICA_ID = re.compile(r"^[0-9a-z-]{1,64}$")


@dataclass(frozen=True)
class InferenceLoad:
    active: int  # requests queued or running
    capacity: int  # max_running + max_queue
    replica: str = field(default="", compare=False)  # which replica reported; "" = unnamed

    @property
    def full(self) -> bool:
        return self.active >= self.capacity

    def to_metadata(self) -> tuple[tuple[str, str], ...]:
        load = ((LOAD_HEADER, f"{self.active}/{self.capacity}"),)
        return (*load, (REPLICA_HEADER, self.replica)) if self.replica else load

    @classmethod
    def from_metadata(cls, metadata: Iterable[tuple[str, str | bytes]] | None) -> InferenceLoad | None:
        """The report in ``metadata``; None when there is none or it is malformed."""
        pairs = [(key, value) for key, value in metadata or () if isinstance(value, str)]
        replica = next((v for k, v in pairs if k == REPLICA_HEADER and _REPLICA_ID.match(v)), "")
        for key, value in pairs:
            if key != LOAD_HEADER:
                continue
            active, _, capacity = value.partition("/")
            if active.isdigit() and capacity.isdigit() and int(capacity) > 0:
                return cls(int(active), int(capacity), replica)
            return None
        return None
