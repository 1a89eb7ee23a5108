"""Tracing setup for one process: the global TracerProvider, its exporters, and the tracer spans are made with.
The gRPC spans that carry W3C tracecontext between processes are telemetry.client_spans' and
telemetry.server_spans', which build on this module (never the other way round).

Exporters come from the standard environment variables: OTEL_TRACES_EXPORTER=otlp|console|none (a comma
list), OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT and OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL=grpc|http/protobuf
(Jaeger and Tempo take OTLP directly), OTEL_TRACES_SAMPLER, OTEL_BSP_*; plus SPECDEC_TRACE_FILE=PATH for the
local JSONL file (`{service}` and `{pid}` in PATH are filled in). Unlike the SDK's own autoconfiguration,
tracing is OFF unless one of them asks for an exporter: then nothing is installed and the OpenTelemetry API
stays its no-op self, so tracing off costs nothing.

Spans are the SDK's own, made by its Tracer and exported by its exporters: hand-written replacements
for both saved ~2 % of CPU per token, too little to bind the project to one SDK version's internals
(docs/benchmarks.md, tracing overhead). Knows nothing about rounds, models or what the spans mean;
callers make their own spans with get_tracer().
"""

from __future__ import annotations

import logging
import os

from opentelemetry import trace

log = logging.getLogger(__name__)

TRACE_FILE_ENV = "SPECDEC_TRACE_FILE"

_provider = None  # the SDK TracerProvider this process installed or adopted; None while tracing is off
_tracer = trace.get_tracer("specdec")


def _env(name: str, signal_name: str | None = None) -> str:
    """The signal-specific variable (OTEL_EXPORTER_OTLP_TRACES_X) wins over the general one."""
    if signal_name and os.environ.get(signal_name):
        return os.environ[signal_name].strip()
    return os.environ.get(name, "").strip()


def requested_exporters(signal: str = "TRACES") -> list[str]:
    """Exporter names asked for by OTEL_<SIGNAL>_EXPORTER, or ["otlp"] when only an OTLP endpoint is set."""
    names = [n.strip().lower() for n in os.environ.get(f"OTEL_{signal}_EXPORTER", "").split(",") if n.strip()]
    if "none" in names:
        return []
    if not names and _env("OTEL_EXPORTER_OTLP_ENDPOINT", f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"):
        names = ["otlp"]
    return names


def otlp_protocol(signal: str = "TRACES") -> str:
    return _env("OTEL_EXPORTER_OTLP_PROTOCOL", f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or "grpc"


def trace_file_path(service_name: str) -> str | None:
    template = os.environ.get(TRACE_FILE_ENV, "").strip()
    return template.replace("{service}", service_name).replace("{pid}", str(os.getpid())) if template else None


def span_processors_from_env(service_name: str) -> list:
    """One span processor per exporter the environment asks for (see the module docstring)."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    processors = []
    for name in requested_exporters("TRACES"):
        if name == "otlp":
            if otlp_protocol("TRACES").startswith("http"):
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            else:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            processors.append(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            # Printed as each span ends, so it interleaves with the logs it explains.
            processors.append(SimpleSpanProcessor(ConsoleSpanExporter()))
        else:
            log.warning("OTEL_TRACES_EXPORTER=%s is not supported here (use otlp: Jaeger and Tempo accept it)",
                        name)
    path = trace_file_path(service_name)
    if path:
        from telemetry.span_file import JsonlSpanExporter

        processors.append(BatchSpanProcessor(JsonlSpanExporter(path)))
    return processors


def configure_tracing(service_name: str) -> bool:
    """Install a global TracerProvider when the environment asks for an exporter; True when tracing is on.

    A second call in the same process (three servers started in one test process) keeps the first setup."""
    if _provider is not None:
        return True
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    from opentelemetry.sdk.trace import TracerProvider

    existing = trace.get_tracer_provider()
    if isinstance(existing, TracerProvider):  # installed by the embedding program (a test's in-memory one)
        install_provider(existing)
        return True
    processors = span_processors_from_env(service_name)
    if not processors:
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    for processor in processors:
        provider.add_span_processor(processor)
    install_provider(provider)
    return True


def install_provider(provider) -> None:
    """Make `provider` (an SDK TracerProvider, e.g. with an in-memory exporter in a test) the global one."""
    global _provider, _tracer
    if trace.get_tracer_provider() is not provider:
        trace.set_tracer_provider(provider)
    if trace.get_tracer_provider() is not provider:
        raise RuntimeError("another TracerProvider is already installed in this process")
    _provider = provider
    _tracer = provider.get_tracer("specdec")


def tracing_enabled() -> bool:
    return _provider is not None


def get_tracer() -> trace.Tracer:
    return _tracer


def installed_provider():
    """The SDK TracerProvider this process traces with; None while tracing is off."""
    return _provider


def shutdown_tracing() -> None:
    """Export what is buffered and stop the exporters (before the process exits)."""
    if _provider is not None:
        _provider.shutdown()
