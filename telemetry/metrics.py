"""OpenTelemetry metrics for the speculative loop: tokens/s, rounds, acceptance (overall, per generation and
per draft position), mean accepted length, and round latency with each of its parts as histograms.

Exported by OTLP (OTEL_METRICS_EXPORTER=otlp, or an OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT; protocol from
OTEL_EXPORTER_OTLP_[METRICS_]PROTOCOL) and on a Prometheus scrape endpoint (a port passed in, or
OTEL_METRICS_EXPORTER=prometheus with OTEL_EXPORTER_PROMETHEUS_HOST/PORT). Not configured, the record_*
functions return at once.

Knows the numbers a round and a generation report, not how the orchestrator measures them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from opentelemetry import metrics

from telemetry.tracing import otlp_protocol, requested_exporters

log = logging.getLogger(__name__)

# Rounds last from well under a millisecond (tiny models on loopback) to seconds (big targets, far hosts).
MS_BUCKETS = (0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 250, 500, 1000, 2500, 5000)
FRACTION_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
LENGTH_BUCKETS = (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 12, 16)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
ROUND_PARTS = ("draft", "verify", "network", "other")


class Recorder:
    """The instruments, made once per meter."""

    def __init__(self, meter: metrics.Meter):
        self.tokens = meter.create_counter("specdec.tokens", "{token}", "tokens generated")
        self.generations = meter.create_counter("specdec.generations", "{generation}", "finished generations")
        self.rounds = meter.create_counter("specdec.rounds", "{round}", "rounds, by outcome")
        self.proposed = meter.create_counter(
            "specdec.draft.proposed", "{token}", "draft tokens proposed, by draft position")
        self.accepted = meter.create_counter(
            "specdec.draft.accepted", "{token}", "draft tokens accepted, by draft position")
        self.tokens_per_s = meter.create_histogram(
            "specdec.generation.tokens_per_s", "{token}/s", "tokens per second of each generation",
            explicit_bucket_boundaries_advisory=RATE_BUCKETS)
        self.acceptance_rate = meter.create_histogram(
            "specdec.generation.acceptance_rate", "1", "accepted / drafted tokens of each generation",
            explicit_bucket_boundaries_advisory=FRACTION_BUCKETS)
        self.mean_accepted_len = meter.create_histogram(
            "specdec.generation.mean_accepted_len", "{token}", "tokens committed per round of each generation",
            explicit_bucket_boundaries_advisory=LENGTH_BUCKETS)
        self.round_ms = meter.create_histogram(
            "specdec.round.duration", "ms", "wall time of a round", explicit_bucket_boundaries_advisory=MS_BUCKETS)
        self.part_ms = {part: meter.create_histogram(
            f"specdec.round.{part}.duration", "ms", f"{part} time of a round on its critical path",
            explicit_bucket_boundaries_advisory=MS_BUCKETS) for part in ROUND_PARTS}
        self._positions: dict[int, dict] = {}

    def _position(self, i: int) -> dict:
        attributes = self._positions.get(i)
        if attributes is None:
            attributes = self._positions[i] = {"position": i}
        return attributes

    def round(self, gamma: int, accepted: int, outcome: str, round_ms: float, draft_ms: float, verify_ms: float,
              network_ms: float, other_ms: float) -> None:
        self.rounds.add(1, {"outcome": outcome})
        for i in range(gamma):
            position = self._position(i)
            self.proposed.add(1, position)
            if i < accepted:
                self.accepted.add(1, position)
        self.round_ms.record(round_ms)
        for part, value in zip(ROUND_PARTS, (draft_ms, verify_ms, network_ms, other_ms)):
            self.part_ms[part].record(value)

    def generation(self, new_tokens: int, rounds: int, tokens_per_s: float, acceptance_rate: float,
                   mean_accepted_len: float) -> None:
        self.generations.add(1)
        self.tokens.add(new_tokens)
        self.tokens_per_s.record(tokens_per_s)
        if rounds:
            self.acceptance_rate.record(acceptance_rate)
            self.mean_accepted_len.record(mean_accepted_len)


@dataclass
class MetricsSetup:
    provider: object  # opentelemetry.sdk.metrics.MeterProvider
    recorder: Recorder
    prometheus_port: int | None = None
    _http_server: object = None

    def shutdown(self) -> None:
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
        self.provider.shutdown()


def _otlp_reader():
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    if otlp_protocol("METRICS").startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    return PeriodicExportingMetricReader(OTLPMetricExporter())


def build_metrics(service_name: str, prometheus_port: int | None = None, prometheus_host: str = "0.0.0.0",
                  readers=()) -> MetricsSetup | None:
    """A MeterProvider with the readers the environment asks for, plus `readers`; None when there are none.

    prometheus_port 0 binds a free port (see MetricsSetup.prometheus_port)."""
    readers = list(readers)
    names = requested_exporters("METRICS")
    if "otlp" in names:
        readers.append(_otlp_reader())
    if "console" in names:
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter, PeriodicExportingMetricReader

        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
    if prometheus_port is None and "prometheus" in names:
        prometheus_port = int(os.environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", "9464"))
        prometheus_host = os.environ.get("OTEL_EXPORTER_PROMETHEUS_HOST", prometheus_host)
    http_server = None
    if prometheus_port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, start_http_server

        # A registry of our own: several providers in one process (tests) must not share series.
        registry = CollectorRegistry()
        readers.append(PrometheusMetricReader(registry=registry))
        http_server, _ = start_http_server(prometheus_port, addr=prometheus_host, registry=registry)
        prometheus_port = http_server.server_port
    if not readers:
        return None
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    provider = MeterProvider(metric_readers=readers, resource=Resource.create({SERVICE_NAME: service_name}))
    return MetricsSetup(provider, Recorder(provider.get_meter("specdec")), prometheus_port, http_server)


_setup: MetricsSetup | None = None


def metrics_host(serve_host: str) -> str:
    """The address the Prometheus endpoint binds for a service bound to `serve_host` (its --host): the
    same interface, so `--host 127.0.0.1` does not publish metrics on every interface. gRPC's all-interfaces
    spellings ("[::]", "::", "", "0.0.0.0") bind all IPv4 interfaces, as the endpoint always did; a bracketed
    IPv6 address loses its brackets."""
    host = serve_host.strip()
    if host in ("", "[::]", "::", "0.0.0.0", "*"):
        return "0.0.0.0"
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host


def configure_metrics(service_name: str, prometheus_port: int | None = None, host: str = "[::]") -> bool:
    """Install the global MeterProvider when some exporter is asked for; True when metrics are on.

    The Prometheus endpoint binds `host`, the service's own --host (see metrics_host). A second call in
    the same process keeps the first setup."""
    global _setup
    if _setup is not None:
        return True
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    setup = build_metrics(service_name, prometheus_port, metrics_host(host))
    if setup is None:
        return False
    metrics.set_meter_provider(setup.provider)
    _setup = setup
    if setup.prometheus_port is not None:
        log.info("Prometheus metrics on port %d", setup.prometheus_port)
    return True


def metrics_setup() -> MetricsSetup | None:
    return _setup


def record_round(gamma: int, accepted: int, outcome: str, round_ms: float, draft_ms: float, verify_ms: float,
                 network_ms: float, other_ms: float) -> None:
    if _setup is not None:
        _setup.recorder.round(gamma, accepted, outcome, round_ms, draft_ms, verify_ms, network_ms, other_ms)


def record_generation(new_tokens: int, rounds: int, tokens_per_s: float, acceptance_rate: float,
                      mean_accepted_len: float) -> None:
    if _setup is not None:
        _setup.recorder.generation(new_tokens, rounds, tokens_per_s, acceptance_rate, mean_accepted_len)


def shutdown_metrics() -> None:
    if _setup is not None:
        _setup.shutdown()
