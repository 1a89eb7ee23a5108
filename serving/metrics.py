"""Serving metrics of the model services: batch sizes, queue wait, live sessions, session memory,
evictions. OTel instruments from the global meter provider (set up by telemetry.metrics at `serve`);
without one they are no-ops."""

from __future__ import annotations

from opentelemetry import metrics

_meter = metrics.get_meter("specdec.serving")
_batch_size = _meter.create_histogram("specdec.batch_size", unit="{request}",
                                      description="requests sharing one forward pass")
_queue_wait = _meter.create_histogram("specdec.queue_wait", unit="ms",
                                      description="wait of a batch's oldest request before its forward pass")


def record_batch(size: int, queue_wait_ms: float) -> None:
    _batch_size.record(size)
    _queue_wait.record(queue_wait_ms)


def watch_sessions(service_name: str, store) -> None:
    """Observable gauges/counters read from the session store at each collection."""
    attributes = {"service": service_name}

    def live(_options):
        yield metrics.Observation(store.stats().live_sessions, attributes)

    def used(_options):
        yield metrics.Observation(store.stats().bytes_used, attributes)

    def evicted(_options):
        yield metrics.Observation(store.stats().evictions, attributes)

    def created(_options):
        yield metrics.Observation(store.stats().created, attributes)

    _meter.create_observable_gauge("specdec.sessions.live", [live], unit="{session}")
    # Sessions started (or restarted from prefix 0) here: with several replicas, how sessions spread,
    # and (summed over a role's replicas against generations) whether any moved.
    _meter.create_observable_counter("specdec.sessions.created", [created], unit="{session}")
    _meter.create_observable_gauge("specdec.sessions.bytes", [used], unit="By")
    _meter.create_observable_counter("specdec.sessions.evictions", [evicted], unit="{session}")
