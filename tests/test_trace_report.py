"""`specdec trace-report` on spans made here with the real OpenTelemetry SDK, shaped as the orchestrator emits
them: the per-round parts, their shares of wall time, the critical path of overlapped rounds, the Perfetto
timeline and the chart, from our JSONL span file and from a collector's OTLP/JSON file alike."""

from __future__ import annotations

import json

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, set_span_in_context

from specdec_api.method_paths import PROPOSE, VERIFY
from specdec_cli.trace_report import trace_report
from telemetry.span_file import JsonlSpanExporter

MS = 1_000_000
T0 = 1_700_000_000_000_000_000


def _round_attributes(index, draft, verify, round_ms, accept_ms=0.5, overlapped=False):
    attributes = {"specdec.round": index, "specdec.gamma": 4, "specdec.accepted": 2, "specdec.outcome": "recovered",
                  "specdec.session_id": "s1", "specdec.round_ms": round_ms, "specdec.accept_ms": accept_ms}
    for side, (observed, server, compute, queue) in (("draft", draft), ("verify", verify)):
        attributes.update({f"specdec.{side}.observed_ms": observed, f"specdec.{side}.server_ms": server,
                           f"specdec.{side}.compute_ms": compute, f"specdec.{side}.queue_ms": queue})
    if overlapped:
        attributes["specdec.overlapped"] = True
    return attributes


def _emit(tracer, start_ms, attributes, draft_at, verify_at, accept_span_at=None):
    """A round span with its two client spans at the given (start, end) ms offsets; with `accept_span_at`,
    the accept step as the child span orchestrators emitted before specdec.accept_ms."""
    generation = tracer.start_span("generation", start_time=T0)
    context = set_span_in_context(generation)
    r = tracer.start_span("round", context, attributes=attributes, start_time=T0 + int(start_ms * MS))
    inner = set_span_in_context(r)
    steps = [(PROPOSE, draft_at, SpanKind.CLIENT), (VERIFY, verify_at, SpanKind.CLIENT)]
    if accept_span_at is not None:
        steps.append(("accept", accept_span_at, SpanKind.INTERNAL))
    for name, (a, b), kind in steps:
        tracer.start_span(name, inner, kind=kind, start_time=T0 + int(a * MS)).end(end_time=T0 + int(b * MS))
    r.end(end_time=T0 + int((start_ms + attributes["specdec.round_ms"]) * MS))
    generation.end(end_time=T0 + int((start_ms + 20) * MS))


@pytest.fixture
def span_file(tmp_path):
    path = tmp_path / "orchestrator.jsonl"
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonlSpanExporter(path)))
    yield path, provider.get_tracer("test")
    provider.shutdown()


def test_sequential_round_splits_into_network_server_accept_and_orchestrator(span_file, tmp_path, capsys):
    path, tracer = span_file
    # draft observed 3 ms (server 2: compute 1.5, queue 0.2), verify observed 4.5 (server 3.5: 3 + 0.1),
    # accept 0.5 ms, round 10 ms: orchestrator 10 - 3 - 4.5 - 0.5 = 2 ms.
    _emit(tracer, 0, _round_attributes(0, (3, 2, 1.5, 0.2), (4.5, 3.5, 3, 0.1), 10), (1, 4), (4.5, 9))
    summary = trace_report([path], tmp_path / "c.png", tmp_path / "t.json", as_json=False)
    parts = {name: p["median_ms"] for name, p in summary["parts"].items()}
    assert parts == pytest.approx({"draft compute": 1.5, "draft queue": 0.2, "draft server other": 0.3,
                                   "draft network": 1.0, "verify compute": 3.0, "verify queue": 0.1,
                                   "verify server other": 0.4, "verify network": 1.0, "accept": 0.5,
                                   "orchestrator": 2.0})
    assert summary["parts"]["verify compute"]["share"] == pytest.approx(0.3)
    assert summary["covers_wall_fraction"] == pytest.approx(1.0)
    assert summary["one_way_ms_p50"] == pytest.approx(0.5)
    printed = capsys.readouterr().out
    assert "verify compute" in printed and "30.0%" in printed and "network one-way p50 0.500 ms" in printed


def test_overlapped_round_counts_only_the_draft_time_not_hidden_behind_verify(span_file, tmp_path):
    path, tracer = span_file
    # Draft 0..6 ms and verify 1..9 ms run at once: 5 of the draft's 6 ms hide behind verify.
    _emit(tracer, 0, _round_attributes(0, (6, 6, 6, 0), (8, 8, 8, 0), 9.5, overlapped=True), (0, 6), (1, 9))
    summary = trace_report([path], tmp_path / "c.png", tmp_path / "t.json", as_json=True)
    assert summary["parts"]["draft compute"]["median_ms"] == pytest.approx(1.0)
    assert summary["parts"]["orchestrator"]["median_ms"] == pytest.approx(0.0)
    assert summary["covers_wall_fraction"] == pytest.approx(1.0)  # 1 + 8 + 0.5 of 9.5 ms
    assert summary["overlapped_rounds"] == 1


# Three calls of one overlapped round as (method, client (start, end), server (start, end), queue, compute) ms:
# a draft before verify (on the path), the verify, and the next round's drafts during verify.
THREE_CALLS = ((PROPOSE, (0.5, 3.5), (1.0, 3.0), 0.2, 1.5),
               (VERIFY, (4, 10), (4.5, 9.5), 0.1, 4.5),
               (PROPOSE, (4.2, 7.2), (4.7, 6.7), 0.2, 1.5))


def _emit_with_server_spans(tracer, calls=THREE_CALLS):
    """A 12 ms round whose calls each have the service's SERVER span, queue and compute as its attributes
    (as serving/model_service.py reports them). The round's attributes describe only the last draft call."""
    generation = tracer.start_span("generation", start_time=T0)
    r = tracer.start_span("round", set_span_in_context(generation), start_time=T0, attributes=_round_attributes(
        0, (3, 2, 1.5, 0.2), (6, 5, 4.5, 0.1), 12))
    for method, (a, b), (sa, sb), queue, compute in calls:
        client = tracer.start_span(method, set_span_in_context(r), kind=SpanKind.CLIENT, start_time=T0 + int(a * MS))
        tracer.start_span(method, set_span_in_context(client), kind=SpanKind.SERVER, start_time=T0 + int(sa * MS),
                          attributes={"specdec.queue_ms": queue, "specdec.compute_ms": compute}).end(
            end_time=T0 + int(sb * MS))
        client.end(end_time=T0 + int(b * MS))
    r.end(end_time=T0 + 12 * MS)
    generation.end(end_time=T0 + 13 * MS)


def test_server_spans_split_each_call_and_a_draft_hidden_behind_verify_is_off_the_path(span_file, tmp_path):
    path, tracer = span_file
    _emit_with_server_spans(tracer)
    summary = trace_report([path], tmp_path / "c.png", tmp_path / "t.json", as_json=True)
    parts = {name: p["median_ms"] for name, p in summary["parts"].items()}
    assert parts == pytest.approx({"draft compute": 1.5, "draft queue": 0.2, "draft server other": 0.3,
                                   "draft network": 1.0, "verify compute": 4.5, "verify queue": 0.1,
                                   "verify server other": 0.4, "verify network": 1.0, "accept": 0.5,
                                   "orchestrator": 2.5}, abs=1e-6)
    assert summary["covers_wall_fraction"] == pytest.approx(1.0)
    assert summary["overlapped_rounds"] == 1
    assert summary["one_way_ms_p50"] == pytest.approx(0.5)  # every call, the hidden one too


def test_an_accept_span_from_an_older_orchestrator_counts_as_the_attribute_does(span_file, tmp_path):
    path, tracer = span_file
    attributes = _round_attributes(0, (3, 2, 1.5, 0.2), (4.5, 3.5, 3, 0.1), 10)
    del attributes["specdec.accept_ms"]
    _emit(tracer, 0, attributes, (1, 4), (4.5, 9), accept_span_at=(9.1, 9.6))
    summary = trace_report([path], tmp_path / "c.png", tmp_path / "t.json", as_json=True)
    assert summary["parts"]["accept"]["median_ms"] == pytest.approx(0.5)
    assert summary["parts"]["orchestrator"]["median_ms"] == pytest.approx(2.0)
    assert summary["covers_wall_fraction"] == pytest.approx(1.0)
    events = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    (accept,) = [e for e in events if e["name"] == "accept"]
    assert [accept["ts"] - T0 / 1000, accept["dur"]] == pytest.approx([9100, 500])  # where the span was


def test_timeline_has_round_draft_verify_and_network_tracks_and_the_chart_is_a_png(span_file, tmp_path):
    path, tracer = span_file
    for i in range(3):
        _emit(tracer, 12 * i, _round_attributes(i, (3, 2, 1.5, 0.2), (4.5, 3.5, 3, 0.1), 10),
              (12 * i + 1, 12 * i + 4), (12 * i + 4.5, 12 * i + 9))
    trace_report([path], tmp_path / "c.png", tmp_path / "t.json", as_json=True)
    events = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    tracks = {e["args"]["name"]: e["tid"] for e in events if e["name"] == "thread_name"}
    assert set(tracks) == {"round", "draft", "network (draft)", "verify", "network (verify)", "orchestrator"}
    slices = [e for e in events if e["ph"] == "X"]
    assert [e["name"] for e in slices if e["tid"] == tracks["round"]] == ["round 0", "round 1", "round 2"]
    legs = [e for e in slices if e["tid"] in (tracks["network (draft)"], tracks["network (verify)"])]
    assert len(legs) == 12 and all(e["dur"] == pytest.approx(500) for e in legs)  # 1 ms network, two legs
    forward = next(e for e in slices if e["tid"] == tracks["verify"] and e["name"] == "forward")
    assert forward["dur"] == pytest.approx(3000)
    # Only accept's duration is recorded: it starts where the round's last call (verify, 4.5..9 ms) ended.
    accepts = [e for e in slices if e["tid"] == tracks["orchestrator"] and e["name"] == "accept"]
    assert [e["ts"] - T0 / 1000 for e in accepts] == pytest.approx([9000, 21000, 33000])
    assert [e["dur"] for e in accepts] == pytest.approx([500] * 3)
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_collectors_otlp_json_file_gives_the_same_breakdown(span_file, tmp_path):
    path, tracer = span_file
    _emit_with_server_spans(tracer)
    ours = trace_report([path], tmp_path / "a.png", tmp_path / "a.json", as_json=True)

    def value(v):
        return {"intValue": str(v)} if isinstance(v, int) and not isinstance(v, bool) else \
            {"doubleValue": v} if isinstance(v, float) else {"boolValue": v} if isinstance(v, bool) else \
            {"stringValue": v}

    spans = [json.loads(line) for line in path.read_text().splitlines()]
    otlp = {"resourceSpans": [{"resource": {"attributes": []}, "scopeSpans": [{"spans": [{
        "traceId": s["trace_id"], "spanId": s["span_id"], "parentSpanId": s["parent_span_id"] or "",
        "name": s["name"], "kind": {"SERVER": 2, "CLIENT": 3}.get(s["kind"], 1),
        "startTimeUnixNano": str(s["start_time_unix_nano"]), "endTimeUnixNano": str(s["end_time_unix_nano"]),
        "attributes": [{"key": k, "value": value(v)} for k, v in s["attributes"].items()]} for s in spans]}]}]}
    (tmp_path / "collector.json").write_text(json.dumps(otlp) + "\n")
    theirs = trace_report([tmp_path / "collector.json"], tmp_path / "b.png", tmp_path / "b.json", as_json=True)
    assert theirs["parts"] == ours["parts"]
    assert ours["parts"]["verify compute"]["median_ms"] == pytest.approx(4.5)  # the SERVER span's attribute


def test_files_without_round_spans_are_refused_with_a_hint(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no `round` spans"):
        trace_report([tmp_path / "empty.jsonl"], None, None, as_json=True)
