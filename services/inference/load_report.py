"""How loaded the inference service is, as it reports it to its callers in gRPC metadata.

Every ``Generate`` carries ``x-nlpmesh-inference-load: <active>/<capacity>`` in its
initial metadata (taken once the request is queued) and in its trailing metadata
(when it ends, or is refused); ``ModelInfo`` carries it too, so a caller knows the
capacity before its first generation. With several replicas, each one names itself
in ``x-nlpmesh-inference-replica`` (an id made at its start, nothing else in it), so
a caller can keep one report per replica. ``active`` is the requests queued or
running, ``capacity`` is ``max_running + max_queue``: past it the engine refuses
with RESOURCE_EXHAUSTED. The gateway's admission control reads it
(services/gateway/admission.py). Plain Python: no grpc here.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

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
