"""benchmarking.tracing_overhead's statistics: the bootstrap interval it reports around the per-prompt median."""

import random
import statistics

from benchmarking.tracing_overhead import median_ci95


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

    from benchmarking.otlp_sink import otlp_sink_process
    from specdec_api.method_paths import VERIFY

    report = []
    with otlp_sink_process(report=report) as endpoint:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
        tracer = provider.get_tracer("specdec")
        for _ in range(5):
            with tracer.start_as_current_span("round"):
                tracer.start_span(VERIFY).end()
        provider.shutdown()
    assert report == ["received 10 spans"]
