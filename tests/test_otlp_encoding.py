"""telemetry.otlp_encoding: the request it builds equals the SDK's encode_spans for every kind of span the
system or a user's code can make, and the exporter built on it delivers spans to a collector."""

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from telemetry.lean_tracer import lean_tracer
from telemetry.otlp_encoding import FastOTLPSpanExporter, encode_request


def _spans():
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "draft", "host.cores": 2}),
                              span_limits=SpanLimits(max_span_attributes=3))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    remote = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED), trace_state=TraceState([("vendor", "x1")]))
    lean, sdk = lean_tracer(provider, "specdec"), provider.get_tracer("specdec.grpc", "1.2")
    with lean.start_as_current_span("generation", attributes={"specdec.session_id": "s1", "n": 3}) as generation:
        with lean.start_as_current_span("round", kind=SpanKind.CLIENT) as span:
            span.set_attributes({"specdec.gamma": 4, "neg": -5, "ratio": 0.25, "on": True, "off": False,
                                 "text": "é \" \\ \n", "empty": "", "zero": 0, "nan": float("nan")})
            span.set_status(Status(StatusCode.ERROR, "UNAVAILABLE: draft down"))
        lean.start_span("values", attributes={"big": 1 << 70, "ids": (3, 5), "names": ("a", "b"),
                                              "raw": b"\x00\x01", "none": None}).end()
        lean.start_span("linked", links=[trace.Link(generation.get_span_context(), {"why": "test"})]).end()
        try:
            with lean.start_as_current_span("failing"):
                raise ValueError("bad token")
        except ValueError:
            pass
        ok = lean.start_span("ok")
        ok.set_status(StatusCode.OK)
        ok.end()
    served = lean.start_span("/specdec.v1.DraftService/Propose", kind=SpanKind.SERVER,
                             context=trace.set_span_in_context(NonRecordingSpan(remote)))
    served.end()
    with sdk.start_as_current_span("sdk span", kind=SpanKind.PRODUCER, attributes={"a": 1, "b": 2, "c": 3, "d": 4}):
        pass  # over the attribute limit: a dropped_attributes_count to carry
    other = TracerProvider(resource=Resource.create({"service.name": "verify"}))
    other.add_span_processor(SimpleSpanProcessor(memory))
    lean_tracer(other, "specdec").start_span("forward", kind=SpanKind.CONSUMER).end()
    return memory.get_finished_spans()


def test_the_request_equals_the_sdks_encoding():
    spans = _spans()
    assert len(spans) == 9
    assert encode_request(spans) == encode_spans(spans)
    assert encode_request(spans).SerializeToString() and len(encode_request(spans).resource_spans) == 2
    assert encode_request(spans[:1]) == encode_spans(spans[:1])
    assert encode_request([]) == encode_spans([])


def test_the_exporter_delivers_to_a_collector():
    from benchmarking.otlp_sink import otlp_sink_process

    report = []
    with otlp_sink_process(report=report) as endpoint:
        exporter = FastOTLPSpanExporter(endpoint=endpoint, insecure=True)
        assert exporter.export(_spans()).name == "SUCCESS"
        exporter.shutdown()
    assert report == ["received 9 spans"]
