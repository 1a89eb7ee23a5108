"""benchmarking.tracing_overhead's statistics (the bootstrap interval it reports around the per-prompt median,
the lean-vs-stock pairing), its OTLP sink, and the switch between the SDK's tracer and the lean one."""

import os
import random
import statistics
import subprocess
import sys

import pytest

from benchmarking.tracing_overhead import median_ci95
from local_stack.paths import REPO_ROOT


def test_the_median_interval_holds_the_median_and_narrows_with_more_generations():
    rng = random.Random(7)
    few = [0.98 + rng.gauss(0, 0.05) for _ in range(24)]
    many = few + [0.98 + rng.gauss(0, 0.05) for _ in range(376)]
    for values in (few, many):
        low, high = median_ci95(values)
        assert low < statistics.median(values) < high
    assert median_ci95(many)[1] - median_ci95(many)[0] < 0.5 * (median_ci95(few)[1] - median_ci95(few)[0])
    low, high = median_ci95(many)
    assert low < 0.98 < high  # the median the samples were drawn around
    assert median_ci95(few) == median_ci95(few)  # a fixed seed: the same runs report the same interval


def test_the_otlp_sink_counts_what_an_otlp_exporter_sends_it():
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from telemetry.lean_tracer import lean_tracer
    from benchmarking.otlp_sink import otlp_sink_process

    report = []
    with otlp_sink_process(report=report) as endpoint:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
        tracer = lean_tracer(provider, "specdec")
        for _ in range(5):
            with tracer.start_as_current_span("round"):
                tracer.start_span("accept").end()
        provider.shutdown()
    assert report == ["received 10 spans"]


def test_lean_vs_stock_pairs_the_two_generations_of_each_turn():
    from benchmarking.tracing_overhead import lean_vs_stock

    rates = {"stock": [50.0, 100.0, 80.0], "lean": [55.0, 110.0, 88.0]}  # every turn 10 % faster
    cpu = {"stock": [2.0, 1.0, 1.5], "lean": [1.9, 0.95, 1.425]}  # every turn 5 % less CPU
    gain = lean_vs_stock(rates, cpu)
    assert gain["tokens_per_s_gain_median"] == pytest.approx(0.10)
    assert gain["tokens_per_s_gain_median_ci95"] == pytest.approx([0.10, 0.10])
    assert gain["cpu_per_token_saving_median"] == pytest.approx(0.05)
    assert gain["cpu_per_token_saving_median_ci95"] == pytest.approx([0.05, 0.05])


@pytest.mark.parametrize("choice, tracer, exporter", [("sdk", "Tracer", "OTLPSpanExporter"),
                                                      ("", "LeanTracer", "FastOTLPSpanExporter")])
def test_specdec_tracer_chooses_the_sdks_tracer_and_exporter_or_the_lean_ones(choice, tracer, exporter):
    code = """
from telemetry.server_spans import server_interceptors
from telemetry.tracing import configure_tracing, get_tracer, installed_provider
configure_tracing("svc")
processors = installed_provider()._active_span_processor._span_processors
print(type(get_tracer()).__name__, type(server_interceptors()[0]._tracer).__name__,
      *(type(p.span_exporter).__name__ for p in processors))
"""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SPECDEC_"))}
    env = {**clean, "PYTHONPATH": str(REPO_ROOT), "SPECDEC_TRACER": choice,
           "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [tracer, tracer, exporter]
