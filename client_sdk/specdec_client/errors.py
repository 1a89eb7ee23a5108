"""SDK exceptions: the one place grpc.RpcError becomes a typed error."""

from __future__ import annotations

import grpc


class SpecDecError(Exception):
    """Base of every SDK error; `code` is the gRPC status code, `details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgument(SpecDecError): ...
class OutOfRange(SpecDecError): ...
class FailedPrecondition(SpecDecError): ...
class ResourceExhausted(SpecDecError): ...
class Unavailable(SpecDecError): ...
class DeadlineExceeded(SpecDecError): ...
class Cancelled(SpecDecError): ...
class Unauthenticated(SpecDecError):
    """No API key, or one the server does not accept: pass api_key= (CLI: --api-key / SPECDEC_API_KEY)."""
class PermissionDenied(SpecDecError): ...


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRange,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def from_rpc_error(error: grpc.RpcError) -> SpecDecError:
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    return _BY_CODE.get(code, SpecDecError)(code, details or "")
