"""Errors a person can act on, and their one translation into gRPC status codes (server side).

Handlers raise these; `StatusInterceptor` turns them into `context.abort` with the matching code, so no
servicer method contains status-code plumbing. Anything else becomes INTERNAL with the exception text.
"""

from __future__ import annotations

import logging

import grpc

log = logging.getLogger(__name__)

# Trailing metadata key set on FAILED_PRECONDITION when the service does not hold the session.
ERROR_KIND_KEY = "specdec-error"
SESSION_LOST = "session-lost"


class ServiceError(Exception):
    code = grpc.StatusCode.INTERNAL
    kind = ""


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class OutOfRange(ServiceError):
    code = grpc.StatusCode.OUT_OF_RANGE


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class SessionLost(FailedPrecondition):
    kind = SESSION_LOST


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Downstream(ServiceError):
    """A service this one called failed: pass its status code on, saying which service it was."""

    def __init__(self, service: str, error: grpc.RpcError):
        super().__init__(f"{service} service: {error.details()}")
        self.code = error.code()


def _abort(context: grpc.ServicerContext, error: Exception) -> None:
    if isinstance(error, ServiceError):
        if error.kind:
            context.set_trailing_metadata(((ERROR_KIND_KEY, error.kind),))
        context.abort(error.code, str(error))
    log.exception("unexpected error")
    context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")


class StatusInterceptor(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary:
            inner = handler.unary_unary

            def unary(request, context):
                try:
                    return inner(request, context)
                except Exception as error:  # noqa: BLE001 - translated, not swallowed
                    if _is_abort(error):
                        raise
                    _abort(context, error)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            def stream(request, context):
                try:
                    yield from inner_stream(request, context)
                except Exception as error:  # noqa: BLE001
                    if _is_abort(error):
                        raise
                    _abort(context, error)

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler


def _is_abort(error: Exception) -> bool:
    # context.abort raises a bare Exception subclass private to grpc; let it through untouched.
    return type(error).__name__ == "_AbortError" or isinstance(error, grpc.RpcError)
