"""A tracer for the hot path: the OpenTelemetry API's Tracer and Span, recorded into an SDK TracerProvider's
own pipeline (its sampler, id generator, resource and span processors, hence every exporter it has) with
far less work per span than the SDK's Tracer.

Why: a speculative round makes about 14 spans (round, accept, a CLIENT and a SERVER span per call, and
queue_wait and forward inside each service). On this project's CPU the SDK's start_span + end costs
~27 us per span (each attribute value cleaned under a lock, a Span with bounded event and link lists,
on_start for every processor, a second, read-only copy of the span at end) and about twice that inside a
gRPC handler, which came to ~6 % of the CPU a token costs on the reference pair. A LeanSpan is itself
the SDK's finished-span type (ReadableSpan), so ending it hands it to the processors as it is: ~4 us per
span in the same microbenchmark (`python -m benchmarking.microbench spans`).

Same as the SDK: the provider's sampler decides (a child of an unsampled parent is a NonRecordingSpan
that still propagates the trace), ids from its id generator, status rules (OK is final, UNSET is
ignored), exceptions recorded as "exception" events, span kinds, links, events. Not done: span limits
(callers pass a few attributes of OpenTelemetry's types; values are not cleaned or truncated), processors' on_start
(the SDK's batch and simple processors do nothing there), the SDK's experimental tracer configurator and
its internal metrics. Attributes are not locked: a span is written by the thread that runs its work.

Knows spans, not what they mean.
"""

from __future__ import annotations

import logging
import traceback
from contextlib import contextmanager
from time import time_ns

from opentelemetry import trace
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

log = logging.getLogger(__name__)

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_RANDOM_TRACE_ID = getattr(TraceFlags, "RANDOM_TRACE_ID", 0)  # W3C trace context level 2; newer APIs only
_UNSET = Status(StatusCode.UNSET)
# What a ParentBased sampler with the default delegates describes itself as after its root sampler: a child
# of a sampled parent is sampled, a child of an unsampled one is not, and the parent's trace state carries on.
_FOLLOWS_PARENT = (",remoteParentSampled:AlwaysOnSampler,remoteParentNotSampled:AlwaysOffSampler,"
                   "localParentSampled:AlwaysOnSampler,localParentNotSampled:AlwaysOffSampler}")


class LeanSpan(trace.Span, ReadableSpan):
    """A recording span; at end() it goes to the provider's processors as the ReadableSpan it already is."""

    def __init__(self, name: str, context: SpanContext, parent: SpanContext | None, resource, attributes: dict,
                 kind: SpanKind, links, start_time: int, processor, scope: InstrumentationScope):
        # ReadableSpan's fields, set directly (its __init__ would make a Resource when none is given).
        self._name, self._context, self._parent, self._kind = name, context, parent, kind
        self._resource, self._attributes, self._links = resource, attributes, tuple(links or ())
        self._events: list[Event] = []
        self._status = _UNSET
        self._start_time, self._end_time = start_time, None
        self._instrumentation_info = None
        self._instrumentation_scope = scope
        self._processor = processor

    # -- the API span -------------------------------------------------------------------------------------
    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attribute(self, key: str, value) -> None:
        if self._end_time is None:
            self._attributes[key] = value

    def set_attributes(self, attributes) -> None:
        if self._end_time is None:
            self._attributes.update(attributes)

    def add_event(self, name: str, attributes=None, timestamp: int | None = None) -> None:
        if self._end_time is None:
            self._events.append(Event(name, attributes, timestamp if timestamp is not None else time_ns()))

    def add_link(self, context: SpanContext, attributes=None) -> None:
        if self._end_time is None and context.is_valid:
            self._links = (*self._links, trace.Link(context, attributes))

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status, description: str | None = None) -> None:
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return  # OK is final, as in the SDK
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def record_exception(self, exception: BaseException, attributes=None, timestamp: int | None = None,
                         escaped: bool = False) -> None:
        kind = type(exception)
        event = {"exception.type": kind.__qualname__ if kind.__module__ == "builtins"
                 else f"{kind.__module__}.{kind.__qualname__}",
                 "exception.message": str(exception),
                 "exception.stacktrace": "".join(traceback.format_exception(exception)),
                 "exception.escaped": str(escaped)}
        self.add_event("exception", {**event, **(attributes or {})}, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            log.warning("end() called on an ended span (%s)", self._name)
            return
        self._end_time = end_time if end_time is not None else time_ns()
        self._events = tuple(self._events)
        self._processor.on_end(self)


class LeanTracer(trace.Tracer):
    """start_span / start_as_current_span through an SDK Tracer's sampler, ids, resource and processors."""

    def __init__(self, sdk_tracer):
        self._sampler = sdk_tracer.sampler
        self._ids = sdk_tracer.id_generator
        self._resource = sdk_tracer.resource
        self._processor = sdk_tracer.span_processor
        info = getattr(sdk_tracer, "instrumentation_info", None)
        self._scope = InstrumentationScope(getattr(info, "name", "specdec"), getattr(info, "version", None))
        # The SDK's default samplers (parentbased_always_on, parentbased_traceidratio) decide a child by its
        # parent's flag alone: that decision is made here without the sampler call (a third of a span's cost).
        description = self._sampler.get_description()
        self._follow_parent = description.startswith("ParentBased{") and description.endswith(_FOLLOWS_PARENT)
        is_random = getattr(self._ids, "is_trace_id_random", None)
        self._root_flags = _RANDOM_TRACE_ID if is_random is not None and is_random() else 0

    def start_span(self, name: str, context=None, kind: SpanKind = SpanKind.INTERNAL, attributes=None, links=(),
                   start_time: int | None = None, record_exception: bool = True,
                   set_status_on_exception: bool = True) -> trace.Span:
        parent = trace.get_current_span(context).get_span_context()
        if parent.is_valid and self._follow_parent:
            trace_id, flags, state = parent.trace_id, parent.trace_flags, parent.trace_state
            sampled = recording = flags.sampled
            extra_flags = flags & _RANDOM_TRACE_ID
        else:
            if parent.is_valid:
                trace_id, extra_flags = parent.trace_id, parent.trace_flags & _RANDOM_TRACE_ID
            else:
                parent, trace_id, extra_flags = None, self._ids.generate_trace_id(), self._root_flags
            result = self._sampler.should_sample(context, trace_id, name, kind, attributes, links)
            sampled, recording = result.decision.is_sampled(), result.decision.is_recording()
            state, attributes = result.trace_state, result.attributes
        span_context = SpanContext(trace_id, self._ids.generate_span_id(), is_remote=False,
                                   trace_flags=TraceFlags((_SAMPLED if sampled else _NOT_SAMPLED) | extra_flags),
                                   trace_state=state)
        if not recording:
            return NonRecordingSpan(span_context)
        return LeanSpan(name, span_context, parent, self._resource, dict(attributes or {}), kind, links,
                        start_time if start_time is not None else time_ns(), self._processor, self._scope)

    @contextmanager
    def start_as_current_span(self, name: str, context=None, kind: SpanKind = SpanKind.INTERNAL, attributes=None,
                              links=(), start_time: int | None = None, record_exception: bool = True,
                              set_status_on_exception: bool = True, end_on_exit: bool = True):
        span = self.start_span(name, context, kind, attributes, links, start_time)
        with trace.use_span(span, end_on_exit=end_on_exit, record_exception=record_exception,
                            set_status_on_exception=set_status_on_exception) as current:
            yield current


def lean_tracer(provider, name: str) -> trace.Tracer:
    """A LeanTracer over an SDK provider's tracer; the provider's own tracer when it is not the SDK's."""
    tracer = provider.get_tracer(name)
    needed = ("sampler", "id_generator", "resource", "span_processor")
    return LeanTracer(tracer) if all(hasattr(tracer, field) for field in needed) else tracer
