"""The local span file: every line is span_record(span) of the span it came from, whatever the span holds."""

import json

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from specdec_api.method_paths import VERIFY
from telemetry.span_file import JsonlSpanExporter, span_record
from trace_analysis.span_reader import read_spans


def _spans():
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "verify", "host.cores": 2}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    remote = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED))
    tracer = provider.get_tracer("sdk")
    with tracer.start_as_current_span("generation", attributes={"specdec.prompt_tokens": 12}):
        with tracer.start_as_current_span("round", kind=SpanKind.CLIENT) as span:
            span.set_attributes({"specdec.gamma": 4, "specdec.ratio": 0.25, "specdec.overlapped": True,
                                 "specdec.ids": (3, 5, 8), "specdec.limit": float("inf"), "specdec.names": ("a", "b"),
                                 "specdec.text": 'quote " and \\ and \u00e9\n'})
            span.set_status(Status(StatusCode.ERROR, "UNAVAILABLE: draft down"))
    tracer.start_span(VERIFY, kind=SpanKind.SERVER, context=trace.set_span_in_context(NonRecordingSpan(remote))).end()
    provider.shutdown()
    return memory.get_finished_spans()


def test_each_line_is_the_span_record_of_its_span(tmp_path):
    spans = _spans()
    assert len(spans) == 3
    exporter = JsonlSpanExporter(tmp_path / "spans.jsonl")
    exporter.export(spans)
    exporter.shutdown()
    lines = (tmp_path / "spans.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [json.loads(json.dumps(span_record(span))) for span in spans]
    records = read_spans([tmp_path / "spans.jsonl"])
    assert {r["name"] for r in records} == {"generation", "round", VERIFY}
    served = [r for r in records if r["kind"] == "SERVER"]
    assert [(r["parent_span_id"], r["parent_is_remote"]) for r in served] == [("b7ad6b7169203331", True)]
    assert all(r["resource"]["service.name"] == "verify" for r in records)
    assert [r["attributes"]["specdec.text"] for r in records if r["name"] == "round"] == ['quote " and \\ and \u00e9\n']
