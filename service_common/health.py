"""gRPC health checking whose status changes cannot deadlock with a Watch stream that ends.

grpc_health's HealthServicer sends each new status to the Watch streams while holding its lock, and each
send waits for the server's polling thread to complete it; that thread, when a Watch stream ends, runs
the servicer's on-close callback, which takes the same lock. A Watch cancelled while a status changes
(a draining server sets NOT_SERVING) so hung `stop()` for good: found by a test that cancels 40 Watch
streams just before its server stops. Here statuses are recorded under the lock and sent after it.
Relies on grpc_health's private fields (_lock, _server_status, _send_response_callbacks,
_gracefully_shutting_down): grpcio-health-checking is pinned in constraints.txt, and
tests/test_health.py fails if they change.
"""

from __future__ import annotations

from grpc_health.v1 import health, health_pb2


class HealthServicer(health.HealthServicer):
    def set(self, service: str, status) -> None:
        with self._lock:
            if self._gracefully_shutting_down:
                return
            self._server_status[service] = status
            callbacks = list(self._send_response_callbacks.get(service, ()))
        response = health_pb2.HealthCheckResponse(status=status)
        for send in callbacks:  # a stream that ended meanwhile answers False; nothing to undo
            send(response)

    def Watch(self, request, context, send_response_callback=None):
        if send_response_callback is None:  # a server without non-blocking streams: the library's own way
            return super().Watch(request, context)
        service = request.service
        with self._lock:
            self._send_response_callbacks.setdefault(service, set()).add(send_response_callback)
            context.add_callback(self._on_close_callback(send_response_callback, service))
            status = self._server_status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
        # After registering: a change made meanwhile is sent too, so the stream never misses the latest.
        send_response_callback(health_pb2.HealthCheckResponse(status=status))
        return None
