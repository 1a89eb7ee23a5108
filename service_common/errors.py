"""Errors a person can act on, and their one translation into gRPC status codes (server side).

Handlers raise these; `StatusInterceptor` turns them into `context.abort` with the matching code, so no
servicer method contains status-code plumbing. Running out of (device) memory becomes RESOURCE_EXHAUSTED, saying
which flags make room (`out_of_memory`). Anything else becomes INTERNAL with the exception text,
logged once with its traceback. A request body that does not parse is the caller's error:
INVALID_ARGUMENT, with one short log line at most once a second per server, never a traceback.
"""

from __future__ import annotations

import logging
import threading
import time

import grpc

log = logging.getLogger(__name__)

# Trailing metadata key saying what kind of refusal a status is: session-lost on FAILED_PRECONDITION
# (the service does not hold the session: re-send the prefix), draining on UNAVAILABLE (the replica is
# shutting down and takes no new session: start it on another replica).
ERROR_KIND_KEY = "specdec-error"
SESSION_LOST = "session-lost"
DRAINING = "draining"


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


class Draining(Unavailable):
    kind = DRAINING


class Downstream(ServiceError):
    """A service this one called failed: pass its status code on, saying which service it was."""

    def __init__(self, service: str, code: grpc.StatusCode, details: str):
        super().__init__(f"{service} service: {details}")
        self.code = code


def out_of_memory(error: BaseException) -> bool:
    """Whether an error is a device (or host) allocation failing: torch.cuda.OutOfMemoryError (torch.OutOfMemoryError),
    a RuntimeError saying "out of memory" (CUDA, MPS, XPU), a MemoryError. By name: this layer imports no torch."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


OUT_OF_MEMORY = ("the model service ran out of device memory running this request's forward pass; retry later, "
                 "or start it with a smaller --max-batch, --prefill-chunk-tokens or --pass-tokens (smaller passes), "
                 "a smaller --gpu-memory-fraction (the static runtime's KV pool) or fewer --max-sessions")


def _abort(context: grpc.ServicerContext, error: Exception) -> None:
    if isinstance(error, ServiceError):
        if error.kind:
            context.set_trailing_metadata(((ERROR_KIND_KEY, error.kind),))
        context.abort(error.code, str(error))
    if out_of_memory(error):  # the caller can retry it, and the operator can act on it: not INTERNAL
        log.warning("out of memory: %s: %s", type(error).__name__, str(error)[:300])
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{OUT_OF_MEMORY} ({type(error).__name__}: {str(error)[:200]})")
    log.exception("unexpected error")
    context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")


class StatusInterceptor(grpc.ServerInterceptor):
    """ServiceErrors become their status; anything else INTERNAL, logged once with its traceback; a
    request body that does not parse becomes INVALID_ARGUMENT, logged in one short line at most once per
    `bad_body_log_interval_s` on this server (a flood of garbage must not become a flood of logs)."""

    def __init__(self, bad_body_log_interval_s: float = 1.0):
        self._bad_body_log = _RateLimit(bad_body_log_interval_s)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        deserializer = handler.request_deserializer
        if deserializer is not None:
            deserializer = _lenient(deserializer, _message_name(deserializer, method))
        if handler.unary_unary:
            inner = handler.unary_unary

            def unary(request, context):
                if isinstance(request, _Undecodable):
                    self._refuse(method, request, context)
                try:
                    return inner(request, context)
                except Exception as error:  # noqa: BLE001 - translated, not swallowed
                    if _is_abort(error):
                        raise
                    _abort(context, error)

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=deserializer, response_serializer=handler.response_serializer)
        if handler.unary_stream and getattr(handler.unary_stream, "experimental_non_blocking", False):
            # Health's Watch streams by callbacks, holding no handler thread; a generator wrapper would
            # turn each Watch into a thread held for as long as it lasts.
            inner_callbacks = handler.unary_stream

            def non_blocking(request, context, send_response_callback=None):
                if isinstance(request, _Undecodable):
                    self._refuse(method, request, context)
                return inner_callbacks(request, context, send_response_callback=send_response_callback)

            non_blocking.experimental_non_blocking = True
            non_blocking.experimental_thread_pool = getattr(inner_callbacks, "experimental_thread_pool", None)
            return grpc.unary_stream_rpc_method_handler(
                non_blocking, request_deserializer=deserializer, response_serializer=handler.response_serializer)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            def stream(request, context):
                if isinstance(request, _Undecodable):
                    self._refuse(method, request, context)
                try:
                    yield from inner_stream(request, context)
                except Exception as error:  # noqa: BLE001
                    if _is_abort(error):
                        raise
                    _abort(context, error)

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=deserializer, response_serializer=handler.response_serializer)
        # Client streaming (reflection): each message is checked as the handler reads it.
        def checked(requests, context):
            for request in requests:
                if isinstance(request, _Undecodable):
                    self._refuse(method, request, context)
                yield request

        if handler.stream_unary:
            inner_su = handler.stream_unary
            return handler._replace(request_deserializer=deserializer,
                                    stream_unary=lambda requests, context: inner_su(checked(requests, context), context))
        if handler.stream_stream:
            inner_ss = handler.stream_stream
            return handler._replace(request_deserializer=deserializer,
                                    stream_stream=lambda requests, context: inner_ss(checked(requests, context), context))
        return handler

    def _refuse(self, method: str, request: _Undecodable, context: grpc.ServicerContext) -> None:
        suppressed = self._bad_body_log.ready()
        if suppressed is not None:
            more = f" ({suppressed} more since the last report)" if suppressed else ""
            log.warning("refused %s from %s: %s%s", method, _peer(context), request.details, more)
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)


class _Undecodable:
    """What a request body that does not parse becomes, so that the handler answers INVALID_ARGUMENT.
    (Raising from the deserializer would leave it to gRPC, whose grpc._common logs a traceback for each
    such body and answers INTERNAL "Exception deserializing request!".)"""

    __slots__ = ("details",)

    def __init__(self, details: str):
        self.details = details


def _lenient(deserializer, message_name: str):
    def deserialize(body: bytes):
        try:
            return deserializer(body)
        except Exception as error:  # noqa: BLE001 - whatever the parser raises, the body is the caller's fault
            reason = str(error) or type(error).__name__
            return _Undecodable(f"the request body is not a valid {message_name}: {reason[:200]}")
    return deserialize


def _message_name(deserializer, method: str) -> str:
    """The request message's full name (from `Message.FromString`), else the method's."""
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", None) or f"request of {method}"


def _peer(context: grpc.ServicerContext) -> str:
    try:
        return context.peer() or "an unknown peer"
    except Exception:  # noqa: BLE001
        return "an unknown peer"


class _RateLimit:
    """`ready()`: at most once per `interval_s`, the number of events it turned down since it last said
    yes (0 or more); None otherwise."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._next = 0.0
        self._skipped = 0
        self._lock = threading.Lock()

    def ready(self) -> int | None:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._skipped += 1
                return None
            self._next = now + self.interval_s
            skipped, self._skipped = self._skipped, 0
            return skipped


def _is_abort(error: Exception) -> bool:
    # context.abort raises a bare Exception subclass private to grpc; let it through untouched.
    return type(error).__name__ == "_AbortError" or isinstance(error, grpc.RpcError)
