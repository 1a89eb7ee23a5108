"""The old home of start_client_call / end_client_call, kept only while orchestrator/service_clients.py
still imports them from here: delete this file when that import reads telemetry.client_spans."""

from telemetry.client_spans import end_client_call, start_client_call

__all__ = ["end_client_call", "start_client_call"]
