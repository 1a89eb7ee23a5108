"""SERVER spans of gRPC calls: an interceptor that opens one per call, as the child of the caller's span (W3C
tracecontext read from the call's metadata through OpenTelemetry's global propagator), and
server_interceptors(), what a server adds to trace its calls. The client side is telemetry.client_spans.

Why not opentelemetry-instrumentation-grpc's server_interceptor: on this project's CPU it cost ~180 us
per call (it wraps the servicer context, parses the peer address and sets a dozen attributes), which is
most of what tracing cost a speculative round of ~3 calls. This one does what a latency study needs and
no more: the span (named after the full method, as the instrumentation names it), the RPC semantic
conventions' rpc.system / rpc.service / rpc.method / rpc.grpc.status_code, an error status when the
handler fails, and the span made current so that the handler can put its queue and compute times on it
(serving/model_service.py) and any span it makes nests under it. Health checks are not traced
(Kubernetes probes them every few seconds).

Knows gRPC calls and spans, not what the calls carry.
"""

from __future__ import annotations

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.trace import SpanKind

from telemetry.rpc_spans import end_rpc_span, rpc_attributes
from telemetry.tracing import installed_provider

_UNTRACED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def server_interceptors() -> list:
    """A SERVER span per call (not health checks) as the child of the caller's span; none while tracing is off."""
    provider = installed_provider()
    return [] if provider is None else [TracingServerInterceptor(provider.get_tracer("specdec.grpc"))]


class TracingServerInterceptor(grpc.ServerInterceptor):
    def __init__(self, tracer: trace.Tracer):
        self._tracer = tracer

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_UNTRACED_PREFIXES):
            return handler
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(handler.unary_unary, method))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._streaming(handler.unary_stream, method))
        return handler  # client- and bidi-streaming: none in this system's services

    def _start(self, method: str, context):
        """The SERVER span of one call, made current so that the handler's own spans nest under it."""
        parent = extract({key: value for key, value in context.invocation_metadata() if not key.endswith("-bin")})
        span = self._tracer.start_span(method, context=parent, kind=SpanKind.SERVER,
                                       attributes=rpc_attributes(method))
        return span, otel_context.attach(trace.set_span_in_context(span, parent))

    @staticmethod
    def _finish(span, token, context, error: BaseException | None) -> None:
        """The span's status from the call's, then the span ends and stops being current."""
        details = context.details() if hasattr(context, "details") else None
        end_rpc_span(span, _status_code(context, error), details or error)
        otel_context.detach(token)

    # Plain try/finally rather than a context manager: this runs on every call.
    def _unary(self, behavior, method: str):
        def traced(request, context):
            span, token = self._start(method, context)
            error = None
            try:
                return behavior(request, context)
            except BaseException as raised:
                error = raised
                raise
            finally:
                self._finish(span, token, context, error)
        return traced

    def _streaming(self, behavior, method: str):
        def traced(request, context):
            span, token = self._start(method, context)
            error = None
            try:
                yield from behavior(request, context)
            except BaseException as raised:  # GeneratorExit included: a streaming call the client cancelled
                error = raised
                raise
            finally:
                self._finish(span, token, context, error)
        return traced


def _status_code(context, error: BaseException | None) -> grpc.StatusCode:
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode):
        return code
    if error is None:
        return grpc.StatusCode.OK
    return grpc.StatusCode.CANCELLED if isinstance(error, GeneratorExit) else grpc.StatusCode.UNKNOWN
