"""One domain error tree and one table mapping it to gRPC status codes.

    MeshError
    ├── InvalidArgument      INVALID_ARGUMENT   google.rpc.BadRequest naming each field
    ├── NotFound             NOT_FOUND
    ├── Unauthenticated      UNAUTHENTICATED
    ├── PermissionDenied     PERMISSION_DENIED
    ├── ResourceExhausted    RESOURCE_EXHAUSTED google.rpc.ErrorInfo naming the resource (if a reason),
    │                                           google.rpc.QuotaFailure naming each limit (if a quota),
    │                                           google.rpc.RetryInfo when a retry can help
    ├── DeadlineExceeded     DEADLINE_EXCEEDED  google.rpc.ErrorInfo naming the hop
    └── Unavailable          UNAVAILABLE

An error received from a downstream service (``from_rpc_error``) relays the
downstream's details to the caller unchanged.

Anything else raised inside a handler is a bug: the caller sees INTERNAL with a
fixed message, the log gets the traceback.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "nlpmesh.dev"
INTERNAL_MESSAGE = "internal error"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass(frozen=True)
class QuotaViolation:
    subject: str  # which limit, e.g. "tenant:requests_per_s"; never a tenant's raw id
    description: str


class MeshError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    # A downstream's details as it sent them (from_rpc_error): the caller gets these, not re-derived ones.
    relayed: tuple[any_pb2.Any, ...] | None = None

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def details(self) -> list[any_pb2.Any]:
        return []

    def status_details(self) -> list[any_pb2.Any]:
        """What the caller's status carries: this error's own details, then any it relays."""
        return self.details() if self.relayed is None else list(self.relayed)


class InvalidArgument(MeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, violations: list[FieldViolation] | None = None):
        super().__init__(message)
        self.violations = list(violations or [])

    @classmethod
    def for_field(cls, field: str, description: str) -> InvalidArgument:
        return cls(f"{field}: {description}", [FieldViolation(field, description)])

    def details(self) -> list[any_pb2.Any]:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in self.violations
            ]
        )
        return [_pack(bad)]


class NotFound(MeshError):
    code = grpc.StatusCode.NOT_FOUND


class Unauthenticated(MeshError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(MeshError):
    code = grpc.StatusCode.PERMISSION_DENIED

    def __init__(self, message: str, reason: str | None = None, metadata: dict[str, str] | None = None):
        """``reason``: a google.rpc.ErrorInfo reason (e.g. KEY_SCOPE), with ``metadata`` naming what was refused."""
        super().__init__(message)
        self.reason = reason
        self.metadata = dict(metadata or {})

    def details(self) -> list[any_pb2.Any]:
        if not self.reason:
            return []
        return [_pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata))]


class ResourceExhausted(MeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float | None = None,
                 violations: list[QuotaViolation] | None = None, reason: str | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.violations = list(violations or [])
        self.reason = reason  # which resource, as a google.rpc.ErrorInfo reason (e.g. GATEWAY_AT_CAPACITY)

    def details(self) -> list[any_pb2.Any]:
        details = []
        if self.reason:
            details.append(_pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN)))
        if self.violations:
            failure = error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(subject=v.subject, description=v.description)
                    for v in self.violations
                ]
            )
            details.append(_pack(failure))
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromMilliseconds(math.ceil(round(self.retry_after_s * 1000, 3)))  # never too early
            details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        return details


class DeadlineExceeded(MeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED

    def __init__(self, message: str, hop: str, facts: dict[str, str] | None = None):
        """``facts``: more ErrorInfo metadata (counts and times only, e.g. the queue wait of a refusal)."""
        super().__init__(message)
        self.hop = hop
        self.facts = dict(facts or {})

    def details(self) -> list[any_pb2.Any]:
        info = error_details_pb2.ErrorInfo(
            reason="HOP_DEADLINE_EXCEEDED", domain=ERROR_DOMAIN, metadata={**self.facts, "hop": self.hop}
        )
        return [_pack(info)]

    def status_details(self) -> list[any_pb2.Any]:
        return [*self.details(), *(self.relayed or ())]  # this hop first, then what the downstream said


class Unavailable(MeshError):
    code = grpc.StatusCode.UNAVAILABLE


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status(error: MeshError) -> grpc.Status:
    """The rich gRPC status a caller sees for a domain error."""
    status = status_pb2.Status(
        code=getattr(code_pb2, error.code.name), message=error.message, details=error.status_details()
    )
    return rpc_status.to_status(status)


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def from_rpc_error(error: grpc.RpcError, hop: str) -> MeshError:
    """Maps a downstream service's failure to the domain error the caller should see.

    Caller-facing errors (bad input, unknown template, over quota, ...) keep their
    code and message, and every ``google.rpc`` detail the downstream sent reaches
    the caller as it was sent (RetryInfo, ErrorInfo, QuotaFailure, BadRequest, ...);
    the typed fields (violations, retry_after_s) are read from them for the
    gateway's own use. A DEADLINE_EXCEEDED names this hop in an ErrorInfo ahead of
    the downstream's details. A downstream bug stays INTERNAL without its message
    or details; DebugInfo (stack entries) never crosses a hop.
    """
    code = error.code()
    details = _details_of(error)
    if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        # A mesh service that refused in time says why (the engine: its queue wait), in its own words.
        why = error.details() if _mesh_deadline_refusal(details) and error.details() else "ran out of time"
        mapped = DeadlineExceeded(f"the {hop} hop {why}" if why == "ran out of time" else why, hop=hop)
    elif code == grpc.StatusCode.UNAVAILABLE:
        mapped = Unavailable(f"the {hop} service is unavailable")
    elif code in _BY_CODE:
        mapped = _BY_CODE[code](error.details() or code.name.lower())
    else:
        return InternalFault(f"the {hop} hop failed with {code.name}")
    if isinstance(mapped, InvalidArgument):
        mapped.violations = _field_violations(details)
    elif isinstance(mapped, ResourceExhausted):
        mapped.violations = _quota_violations(details)
        mapped.retry_after_s = _retry_after_s(details)
    mapped.relayed = tuple(d for d in details if not d.Is(error_details_pb2.DebugInfo.DESCRIPTOR))
    return mapped


class InternalFault(MeshError):
    """A downstream bug seen from upstream: INTERNAL, never with the inner message."""

    code = grpc.StatusCode.INTERNAL


def _mesh_deadline_refusal(details: list[any_pb2.Any]) -> bool:
    """Whether a downstream mesh service itself refused with DEADLINE_EXCEEDED (its ErrorInfo says so)."""
    for detail in details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == ERROR_DOMAIN and info.reason == "HOP_DEADLINE_EXCEEDED":
            return True
    return False


def _details_of(error: grpc.RpcError) -> list[any_pb2.Any]:
    status = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None
    return list(status.details) if status else []


def _field_violations(details: list[any_pb2.Any]) -> list[FieldViolation]:
    violations: list[FieldViolation] = []
    for detail in details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
    return violations


def _quota_violations(details: list[any_pb2.Any]) -> list[QuotaViolation]:
    violations: list[QuotaViolation] = []
    for detail in details:
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            violations += [QuotaViolation(v.subject, v.description) for v in failure.violations]
    return violations


def _retry_after_s(details: list[any_pb2.Any]) -> float | None:
    for detail in details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToMilliseconds() / 1000.0
    return None
