"""Tracing end to end: one generation's span tree across the client, the orchestrator, the draft and the
verify processes (W3C tracecontext over gRPC metadata), the local span file and its setup from the
environment, metrics on the orchestrator's Prometheus endpoint, and tracing off installing nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections import defaultdict

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from local_stack.processes import local_stack
from transport import free_port
from local_stack.paths import REPO_ROOT
from specdec_api.method_paths import GENERATE, PROPOSE, VERIFY
from specdec_cli.trace_report import load_rounds, trace_report
from specdec_client import Client
from telemetry.client_spans import traced_channel
from telemetry.span_file import span_record
from trace_analysis.span_reader import read_spans



def _python(code: str, env: dict) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SPECDEC_"))}
    done = subprocess.run([sys.executable, "-c", code], env={**clean, "PYTHONPATH": str(REPO_ROOT), **env},
                          capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_without_an_exporter_tracing_installs_nothing():
    out = _python("""
import json, grpc
from opentelemetry import trace
from telemetry.client_spans import traced_channel
from telemetry.metrics import configure_metrics
from telemetry.server_spans import server_interceptors
from telemetry.tracing import configure_tracing, get_tracer, tracing_enabled
channel = grpc.insecure_channel("localhost:1")
print(json.dumps({"configured": configure_tracing("svc"), "enabled": tracing_enabled(),
                  "interceptors": len(server_interceptors()), "same_channel": traced_channel(channel) is channel,
                  "provider": type(trace.get_tracer_provider()).__name__,
                  "recording": get_tracer().start_span("x").is_recording(),
                  "metrics": configure_metrics("svc", None)}))
""", {})
    assert json.loads(out) == {"configured": False, "enabled": False, "interceptors": 0, "same_channel": True,
                               "provider": "ProxyTracerProvider", "recording": False, "metrics": False}


def test_trace_file_from_the_environment_gets_one_span_per_line_with_parents_and_service(tmp_path):
    _python("""
from telemetry.tracing import configure_tracing, get_tracer, shutdown_tracing
assert configure_tracing("specdec-test")
with get_tracer().start_as_current_span("outer", attributes={"n": 1}):
    with get_tracer().start_as_current_span("inner"):
        pass
shutdown_tracing()
""", {"SPECDEC_TRACE_FILE": str(tmp_path / "{service}.jsonl")})
    spans = {s["name"]: s for s in read_spans([tmp_path / "specdec-test.jsonl"])}
    assert set(spans) == {"outer", "inner"}
    assert spans["inner"]["parent_span_id"] == spans["outer"]["span_id"]
    assert spans["outer"]["parent_span_id"] is None and spans["outer"]["attributes"] == {"n": 1}
    assert spans["inner"]["trace_id"] == spans["outer"]["trace_id"]
    assert spans["outer"]["resource"]["service.name"] == "specdec-test"
    assert spans["outer"]["start_time_unix_nano"] <= spans["inner"]["start_time_unix_nano"] \
        <= spans["inner"]["end_time_unix_nano"] <= spans["outer"]["end_time_unix_nano"]


@pytest.fixture(scope="module")
def traced_generation(tiny, tmp_path_factory):
    """One greedy generation through three traced processes; the client's spans kept in memory, the
    processes' in the span files of the returned directory."""
    run = tmp_path_factory.mktemp("traced")
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    metrics_port = free_port()
    with local_stack(str(tiny.target), str(tiny.draft), env_extra={"SPECDEC_TRACE_FILE": str(run / "{service}.jsonl")},
                     orchestrator_args=("--metrics-port", str(metrics_port)), log_dir=run) as stack:
        channel = traced_channel(grpc.insecure_channel(stack.orchestrator), tracer_provider=provider)
        with Client(stack.orchestrator, timeout=120, channel=channel) as client:
            result = client.generate("def main():\n", max_new_tokens=12, num_draft_tokens=3)
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    # Leaving the stack stopped the services (SIGTERM), which flushed their span files.
    spans = [span_record(s) for s in memory.get_finished_spans()] + read_spans(sorted(run.glob("*.jsonl")))
    return result, spans, scraped, run


def _duration(span) -> int:
    return span["end_time_unix_nano"] - span["start_time_unix_nano"]


def _tree(spans):
    by_id = {s["span_id"]: s for s in spans}
    children = defaultdict(list)
    for s in spans:
        children[s["parent_span_id"]].append(s)
    return by_id, children


def test_one_generation_is_one_trace_from_the_client_to_both_model_services(traced_generation):
    result, spans, _, _ = traced_generation
    client_span = next(s for s in spans if s["name"] == GENERATE and s["kind"] == "CLIENT")
    trace = [s for s in spans if s["trace_id"] == client_span["trace_id"]]
    by_id, children = _tree(trace)
    service = lambda s: s["resource"].get("service.name")  # noqa: E731

    (server,) = [s for s in children[client_span["span_id"]] if s["kind"] == "SERVER"]
    assert server["name"] == GENERATE and server["parent_is_remote"] and service(server) == "specdec-orchestrator"
    (generation,) = [s for s in children[server["span_id"]] if s["name"] == "generation"]
    assert generation["attributes"]["specdec.prompt_tokens"] > 0
    assert generation["attributes"]["specdec.new_tokens"] == len(result.token_ids)
    assert generation["attributes"]["specdec.temperature"] == 0
    session = generation["attributes"]["specdec.session"]

    rounds = sorted((s for s in children[generation["span_id"]] if s["name"] == "round"),
                    key=lambda s: s["start_time_unix_nano"])
    assert len(rounds) == result.stats["rounds"] > 0
    proposals = []
    for r in rounds:
        a = r["attributes"]
        assert a["specdec.session"] == session
        assert a["specdec.outcome"] in {"recovered", "bonus", "target_only"}
        assert 0 <= a["specdec.accepted"] <= a["specdec.gamma"] <= 3
        assert a["specdec.round_ms"] > 0
        kids = children[r["span_id"]]
        # The accept step is recorded once: as the round's specdec.accept_ms, or (older orchestrators) a span.
        assert [k["name"] for k in kids].count("accept") == (0 if "specdec.accept_ms" in a else 1)
        client_calls = [k for k in kids if k["name"] in (PROPOSE, VERIFY)]
        assert [k["name"] for k in client_calls].count(VERIFY) == 1
        if a["specdec.outcome"] == "target_only":
            assert PROPOSE not in [k["name"] for k in client_calls]
        proposals += [k for k in client_calls if k["name"] == PROPOSE]
        # The measured split: verify is one call per round; draft too unless the round overlapped.
        for side in ("verify",) if a.get("specdec.overlapped") else ("verify", "draft"):
            if f"specdec.{side}.observed_ms" in a:
                assert a[f"specdec.{side}.observed_ms"] >= a[f"specdec.{side}.server_ms"] \
                    >= a[f"specdec.{side}.compute_ms"] > 0, (side, a)
        for client_call in client_calls:
            method = client_call["name"]
            assert client_call["kind"] == "CLIENT"
            (server_call,) = children[client_call["span_id"]]
            service_name = "specdec-draft" if method == PROPOSE else "specdec-verify"
            assert (server_call["name"], server_call["kind"], service(server_call), server_call["parent_is_remote"]) \
                == (method, "SERVER", service_name, True)
            # Queue wait and forward pass are the server span's attributes, not spans of their own.
            assert children[server_call["span_id"]] == []
            reported = server_call["attributes"]
            assert reported["specdec.lane"] == "main"  # no prefill lane in this stack
            # The services name the session by the same one-way tag as the round: the id itself, which lets
            # a caller touch the session, stays out of every span.
            assert reported["specdec.session"] == session
            assert reported["specdec.tokens"] > 0
            # Same host, so the clocks agree here: the call as the client saw it lasts at least as long as
            # the server's part of it, which holds the queue wait and the forward pass.
            assert _duration(client_call) >= _duration(server_call) \
                >= (reported["specdec.queue_ms"] + reported["specdec.compute_ms"]) * 1e6
            assert reported["specdec.compute_ms"] > 0 and reported["specdec.queue_ms"] >= 0
            if method == VERIFY:  # one verify call per round: the span says what the response reported
                assert (reported["specdec.compute_ms"], reported["specdec.queue_ms"]) == \
                    pytest.approx((a["specdec.verify.compute_ms"], a["specdec.verify.queue_ms"]))
    assert proposals  # the draft was asked, and each call shows in the draft service
    assert not [s for s in trace if "specdec.session_id" in s["attributes"]]
    assert len(session) == 12 and int(session, 16) >= 0
    assert {service(s) for s in trace} >= {"specdec-orchestrator", "specdec-draft", "specdec-verify"}
    assert all(s["parent_span_id"] in by_id for s in trace if s is not client_span)  # no orphans


def test_the_trace_report_of_a_real_run_splits_each_round_into_parts_that_sum_to_its_wall_time(
        traced_generation, tmp_path):
    result, _, _, run = traced_generation
    files = sorted(run.glob("*.jsonl"))
    rounds = load_rounds(files)
    assert len(rounds) == result.stats["rounds"]
    for r in rounds:  # the parts are the round's own measured time, split
        assert sum(r.parts.values()) == pytest.approx(r.attributes["specdec.round_ms"], abs=1e-6)
        assert r.parts["verify compute"] > 0 and r.parts["accept"] > 0
    summary = trace_report(files, tmp_path / "c.png", tmp_path / "t.json", as_json=True)
    # The round span also holds the round's reporting after specdec.round_ms is taken (~0.13 ms here, 4 % of
    # a tiny model's 3 ms round; well under 1 % of the reference pair's): hence the lower bound.
    assert 0.9 <= summary["covers_wall_fraction"] <= 1.0 + 1e-9, summary
    events = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    assert {"queue wait", "forward", "accept"} <= {e["name"] for e in events}


def test_orchestrator_metrics_count_the_generations_rounds_and_draft_positions(traced_generation):
    result, _, scraped, _ = traced_generation
    samples = {}
    for line in scraped.splitlines():
        if line and not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            samples[name_labels] = float(value)

    def total(name, **labels):
        return sum(v for k, v in samples.items() if k.split("{")[0] == name
                   and all(f'{key}="{val}"' in k for key, val in labels.items()))

    stats = result.stats
    assert total("specdec_rounds_total") == stats["rounds"]
    assert total("specdec_generations_total") == 1
    assert total("specdec_tokens_total") == stats["new_tokens"]
    assert total("specdec_draft_accepted_total") == stats["accepted_tokens"]
    assert total("specdec_draft_proposed_total") == stats["drafted_tokens"]
    assert total("specdec_draft_proposed_total", position=0) >= total("specdec_draft_proposed_total", position=2)
    assert total("specdec_round_duration_milliseconds_count") == stats["rounds"]
    assert total("specdec_round_network_duration_milliseconds_count") == stats["rounds"]


def test_an_otlp_endpoint_in_the_environment_sends_spans_to_that_collector():
    from concurrent import futures

    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received = []

    class Collector(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            received.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        _python("""
from telemetry.tracing import configure_tracing, get_tracer, shutdown_tracing
assert configure_tracing("specdec-otlp-test")
with get_tracer().start_as_current_span("sent over otlp"):
    pass
shutdown_tracing()
""", {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"})
    finally:
        server.stop(None)
    spans = [(span.name, {a.key: a.value.string_value for a in rs.resource.attributes}["service.name"])
             for request in received for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans]
    assert spans == [("sent over otlp", "specdec-otlp-test")]


def test_health_checks_are_not_traced(traced_generation):
    """local_stack polled every service's health before the generation; none of it is in the traces."""
    _, spans, _, _ = traced_generation
    assert spans and not [s for s in spans if "grpc.health" in s["name"]]


def test_the_server_interceptor_continues_the_callers_trace_and_records_failures():
    from concurrent import futures

    from opentelemetry.trace import StatusCode

    from telemetry.server_spans import TracingServerInterceptor

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    def echo(request, context):
        with provider.get_tracer("test").start_as_current_span("inside"):
            pass
        if request == b"bad":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad request")
        return request

    def count(request, context):
        yield from (b"1", b"2")

    server = grpc.server(futures.ThreadPoolExecutor(2),
                         interceptors=[TracingServerInterceptor(provider.get_tracer("specdec.grpc"))])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Count": grpc.unary_stream_rpc_method_handler(count)}),))
    port = server.add_insecure_port("localhost:0")
    server.start()
    try:
        client_tracer = provider.get_tracer("client")
        with grpc.insecure_channel(f"localhost:{port}") as raw:
            channel = traced_channel(raw, tracer_provider=provider)
            with client_tracer.start_as_current_span("caller") as caller:
                assert channel.unary_unary("/t.S/Echo")(b"ok", timeout=5) == b"ok"
                with pytest.raises(grpc.RpcError) as failed:
                    channel.unary_unary("/t.S/Echo")(b"bad", timeout=5)
                assert list(channel.unary_stream("/t.S/Count")(b"", timeout=5)) == [b"1", b"2"]
    finally:
        server.stop(None)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    spans = exporter.get_finished_spans()
    servers = [s for s in spans if s.kind.name == "SERVER"]
    assert [s.name for s in servers] == ["/t.S/Echo", "/t.S/Echo", "/t.S/Count"]
    clients = {s.context.span_id: s for s in spans if s.kind.name == "CLIENT"}
    for span in servers:  # each server span is the child of its client span, in the caller's trace
        assert span.parent.span_id in clients and span.context.trace_id == caller.get_span_context().trace_id
        assert span.attributes["rpc.system"] == "grpc" and span.attributes["rpc.service"] == "t.S"
    ok, bad, stream = servers
    assert ok.attributes["rpc.grpc.status_code"] == 0 and ok.status.status_code != StatusCode.ERROR
    assert bad.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert bad.status.status_code == StatusCode.ERROR and "INVALID_ARGUMENT" in bad.status.description
    assert stream.attributes["rpc.grpc.status_code"] == 0
    inside = [s for s in spans if s.name == "inside"]
    assert {s.parent.span_id for s in inside} == {ok.context.span_id, bad.context.span_id}
