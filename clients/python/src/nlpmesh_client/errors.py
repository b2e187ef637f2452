"""One exception tree for every failed call, built from the gRPC status and its google.rpc details.

    NlpmeshError              any failure: .code, .message, .hop, .retry_after_s, .request_id
    ├── InvalidArgument       INVALID_ARGUMENT   .field_violations: (field, description) pairs
    ├── NotFound              NOT_FOUND
    ├── Unauthenticated       UNAUTHENTICATED
    ├── PermissionDenied      PERMISSION_DENIED
    ├── ResourceExhausted     RESOURCE_EXHAUSTED .retry_after_s from google.rpc.RetryInfo, if sent
    ├── DeadlineExceeded      DEADLINE_EXCEEDED  .hop from google.rpc.ErrorInfo metadata "hop", if sent
    └── Unavailable           UNAVAILABLE

Any other code (INTERNAL, CANCELLED, ...) is an ``NlpmeshError`` itself.
"""
from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class NlpmeshError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, *, hop: str | None = None,
                 retry_after_s: float | None = None, request_id: str = "",
                 field_violations: tuple[tuple[str, str], ...] = ()):
        super().__init__(f"{code.name}: {message}" + (f" (hop {hop})" if hop else ""))
        self.code = code
        self.message = message
        self.hop = hop  # the hop that ran out or refused, from ErrorInfo's metadata "hop"
        self.retry_after_s = retry_after_s  # RetryInfo's delay: when a retry can help
        self.request_id = request_id  # the x-request-id of the call
        self.field_violations = field_violations  # BadRequest's (field, description) pairs


class InvalidArgument(NlpmeshError):
    pass


class NotFound(NlpmeshError):
    pass


class Unauthenticated(NlpmeshError):
    pass


class PermissionDenied(NlpmeshError):
    pass


class ResourceExhausted(NlpmeshError):
    pass


class DeadlineExceeded(NlpmeshError):
    pass


class Unavailable(NlpmeshError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[NlpmeshError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def from_rpc_error(error: grpc.RpcError, request_id: str = "") -> NlpmeshError:
    """The tree's exception for a failed call (sync or asyncio), with what its status details say."""
    code, message = error.code(), error.details() or ""
    hop, retry_after_s, violations = None, None, []
    for detail in _status_details(error):
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            hop = info.metadata.get("hop", hop)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after_s = retry.retry_delay.ToNanoseconds() / 1e9
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations += [(v.field, v.description) for v in bad.field_violations]
    return _BY_CODE.get(code, NlpmeshError)(code, message, hop=hop, retry_after_s=retry_after_s,
                                            request_id=request_id, field_violations=tuple(violations))


def _status_details(error: grpc.RpcError) -> list:
    """The google.rpc.Status details of ``grpc-status-details-bin``; none when it is absent or malformed (the
    code and message still stand)."""
    try:
        status = rpc_status.from_call(error)
    except (ValueError, DecodeError):
        return []
    return list(status.details) if status is not None else []
