"""What the CLIENT and SERVER spans of a gRPC call share: the RPC semantic conventions' attributes of the
method, and how a span ends from the call's status code.

Knows gRPC calls and spans, not what the calls carry.
"""

from __future__ import annotations

import functools

import grpc
from opentelemetry.trace import Status, StatusCode


@functools.lru_cache(maxsize=256)
def rpc_attributes(method: str) -> dict:
    """The RPC semantic conventions' attributes of a full method name ("/pkg.Service/Method"), made once
    per method (client and server spans alike; the tracer copies them into each span)."""
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


def end_rpc_span(span, code: grpc.StatusCode | None, details: object = None) -> None:
    """rpc.grpc.status_code from the call's code (None: OK), an error status unless OK, then the end."""
    code = code or grpc.StatusCode.OK
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code != grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details or ''}"))
    span.end()
