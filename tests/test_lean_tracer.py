"""telemetry.lean_tracer: spans made through an SDK provider's own sampler, ids and processors, equal to
what the SDK's Tracer makes of the same calls (ids and times aside), and readable by the OTLP encoder."""

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import (ALWAYS_OFF, Decision, ParentBased, Sampler, SamplingResult,
                                              TraceIdRatioBased)
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from telemetry.lean_tracer import LeanTracer, lean_tracer
from telemetry.span_file import span_record


def _provider(sampler=None):
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "orchestrator"}), sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return provider, memory


def _remote(sampled: bool) -> trace.Context:
    flags = TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
    return trace.set_span_in_context(NonRecordingSpan(SpanContext(0x5B8AA5A2D2C872E8321CF37308D69DF2,
                                                                  0x051581BF3CB55C13, True, flags)))


def _workload(tracer):
    """What the system does with spans: nesting, a remote parent, attributes, an error, an event, a link."""
    with tracer.start_as_current_span("generation", attributes={"specdec.session_id": "s1"}) as g:
        with tracer.start_as_current_span("round") as span:
            span.set_attribute("specdec.gamma", 4)
            span.set_attributes({"specdec.accepted": 3, "specdec.ratio": 0.75, "specdec.overlapped": True})
            span.add_event("drafted", {"tokens": 4})
            with tracer.start_as_current_span("accept"):
                pass
        client = tracer.start_span("/specdec.v1.VerifyService/Verify", kind=SpanKind.CLIENT,
                                   links=[trace.Link(g.get_span_context(), {"why": "test"})])
        client.set_status(Status(StatusCode.ERROR, "UNAVAILABLE: verify down"))
        client.set_status(Status(StatusCode.UNSET))  # ignored: UNSET never replaces a status
        client.end()
        with pytest.raises(ValueError):
            with tracer.start_as_current_span("failing"):
                raise ValueError("bad token")
        ok = tracer.start_span("settled")
        ok.set_status(StatusCode.OK)
        ok.set_status(StatusCode.ERROR, "too late")  # ignored: OK is final
        ok.end()
    served = tracer.start_span("/specdec.v1.DraftService/Propose", context=_remote(True), kind=SpanKind.SERVER,
                               start_time=1_000, attributes={"rpc.system": "grpc"})
    served.end(end_time=5_000)


def _comparable(span) -> dict:
    record = span_record(span)
    for key in ("trace_id", "span_id", "parent_span_id", "start_time_unix_nano", "end_time_unix_nano", "resource"):
        record.pop(key)
    record["events"] = [(e.name, dict(e.attributes)) for e in span.events]
    record["events"] = [(name, {k: v for k, v in attrs.items() if k != "exception.stacktrace"})
                        for name, attrs in record["events"]]
    record["links"] = len(span.links)
    record["description"] = span.status.description
    record["has_parent"] = span.parent is not None
    return record


def test_lean_spans_equal_the_sdk_spans_of_the_same_calls():
    sdk_provider, sdk_memory = _provider()
    lean_provider, lean_memory = _provider()
    _workload(sdk_provider.get_tracer("specdec"))
    tracer = lean_tracer(lean_provider, "specdec")
    assert isinstance(tracer, LeanTracer)
    _workload(tracer)
    sdk_spans, lean_spans = sdk_memory.get_finished_spans(), lean_memory.get_finished_spans()
    assert [s.name for s in lean_spans] == ["accept", "round", "/specdec.v1.VerifyService/Verify", "failing",
                                            "settled", "generation", "/specdec.v1.DraftService/Propose"]
    assert [_comparable(s) for s in lean_spans] == [_comparable(s) for s in sdk_spans]

    by_name = {s.name: s for s in lean_spans}
    generation, round_, accept = by_name["generation"], by_name["round"], by_name["accept"]
    assert round_.parent.span_id == generation.context.span_id and accept.parent.span_id == round_.context.span_id
    assert len({s.context.trace_id for s in lean_spans[:-1]}) == 1 and generation.parent is None
    served = by_name["/specdec.v1.DraftService/Propose"]
    assert (served.context.trace_id, served.parent.span_id, served.parent.is_remote) == \
        (0x5B8AA5A2D2C872E8321CF37308D69DF2, 0x051581BF3CB55C13, True)
    assert (served.start_time, served.end_time) == (1_000, 5_000)
    failing = by_name["failing"]
    assert failing.status.status_code is StatusCode.ERROR and failing.status.description == "ValueError: bad token"
    assert "ValueError: bad token" in failing.events[0].attributes["exception.stacktrace"]
    assert all(s.resource is lean_provider.resource for s in lean_spans)


def test_the_providers_sampler_decides_and_unsampled_spans_still_carry_the_trace():
    provider, memory = _provider(ParentBased(TraceIdRatioBased(0.0)))
    tracer = lean_tracer(provider, "specdec")
    root = tracer.start_span("generation")  # a root: the ratio sampler drops it
    assert not root.is_recording() and root.get_span_context().is_valid
    assert not root.get_span_context().trace_flags.sampled
    with tracer.start_as_current_span("round", context=trace.set_span_in_context(root)) as child:
        assert not child.is_recording()
        assert child.get_span_context().trace_id == root.get_span_context().trace_id
    followed = tracer.start_span("verify", context=_remote(True))  # a sampled remote parent: recorded
    followed.end()
    tracer.start_span("verify", context=_remote(False)).end()  # an unsampled one: not
    assert [s.name for s in memory.get_finished_spans()] == ["verify"]
    assert memory.get_finished_spans()[0].context.trace_flags.sampled

    off_provider, off_memory = _provider(ALWAYS_OFF)
    lean_tracer(off_provider, "specdec").start_span("round").end()
    assert off_memory.get_finished_spans() == ()


class _NoAccept(Sampler):
    """Not a ParentBased sampler: asked about every span, children included."""

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None, trace_state=None):
        decision = Decision.DROP if name == "accept" else Decision.RECORD_AND_SAMPLE
        return SamplingResult(decision, {**(attributes or {}), "sampled.by": "test"} if decision.is_sampled() else None)

    def get_description(self):
        return "NoAccept"


def test_a_sampler_that_does_not_follow_the_parent_is_asked_about_every_span():
    provider, memory = _provider(_NoAccept())
    tracer = lean_tracer(provider, "specdec")
    with tracer.start_as_current_span("round"):
        with tracer.start_as_current_span("accept") as accept:
            assert not accept.is_recording()
        tracer.start_span("forward", attributes={"specdec.tokens": 5}).end()
    assert [(s.name, dict(s.attributes)) for s in memory.get_finished_spans()] == [
        ("forward", {"specdec.tokens": 5, "sampled.by": "test"}), ("round", {"sampled.by": "test"})]


def test_an_ended_span_takes_no_more_changes_and_is_exported_once():
    provider, memory = _provider()
    span = lean_tracer(provider, "specdec").start_span("round", attributes={"a": 1})
    span.end()
    span.set_attribute("a", 2)
    span.set_attributes({"b": 3})
    span.add_event("late")
    span.set_status(StatusCode.ERROR)
    span.update_name("renamed")
    span.end()
    (exported,) = memory.get_finished_spans()
    assert (exported.name, dict(exported.attributes), exported.events, exported.status.status_code) == \
        ("round", {"a": 1}, (), StatusCode.UNSET)
    assert not span.is_recording()


def test_lean_spans_encode_for_otlp():
    provider, memory = _provider()
    _workload(lean_tracer(provider, "specdec"))
    request = encode_spans(memory.get_finished_spans())
    (resource_spans,) = request.resource_spans
    names = [span.name for scope in resource_spans.scope_spans for span in scope.spans]
    assert sorted(names) == sorted(s.name for s in memory.get_finished_spans())
    assert resource_spans.scope_spans[0].scope.name == "specdec"


def test_a_provider_that_is_not_the_sdks_keeps_its_own_tracer():
    provider = trace.NoOpTracerProvider()
    tracer = lean_tracer(provider, "specdec")
    assert not isinstance(tracer, LeanTracer)
    assert not tracer.start_span("round").is_recording()
