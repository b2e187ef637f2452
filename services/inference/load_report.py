"""How loaded the inference service is, as it reports it to its callers in gRPC metadata.

Every ``Generate`` carries ``x-nlpmesh-inference-load: <active>/<capacity>`` in its
initial metadata (taken once the request is queued) and in its trailing metadata
(when it ends, or is refused); ``ModelInfo`` carries it too, so a caller knows the
capacity before its first generation. ``active`` is the requests queued or
running, ``capacity`` is ``max_running + max_queue``: past it the engine refuses
with RESOURCE_EXHAUSTED. The gateway's admission control reads it
(services/gateway/admission.py). Plain Python: no grpc here.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

LOAD_HEADER = "x-nlpmesh-inference-load"


@dataclass(frozen=True)
class InferenceLoad:
    active: int  # requests queued or running
    capacity: int  # max_running + max_queue

    @property
    def full(self) -> bool:
        return self.active >= self.capacity

    def to_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((LOAD_HEADER, f"{self.active}/{self.capacity}"),)

    @classmethod
    def from_metadata(cls, metadata: Iterable[tuple[str, str | bytes]] | None) -> InferenceLoad | None:
        """The report in ``metadata``; None when there is none or it is malformed."""
        for key, value in metadata or ():
            if key != LOAD_HEADER or not isinstance(value, str):
                continue
            active, _, capacity = value.partition("/")
            if active.isdigit() and capacity.isdigit() and int(capacity) > 0:
                return cls(int(active), int(capacity))
            return None
        return None
