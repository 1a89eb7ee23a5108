"""Health checking stays live through Watch streams that come and go while the status changes."""

from __future__ import annotations

import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service_common.server import start_server


def test_stopping_while_watch_streams_end_does_not_hang():
    """grpc_health's own servicer sent statuses under its lock while an ending Watch stream's callback
    waited for that lock on the server's polling thread: stop() hung forever (seen in a full run)."""
    for _ in range(5):
        # The plaintext health port serves Watch without interceptors, as a non-blocking stream: the
        # deadlock's setting (on the main port interceptors wrap it into a blocking generator).
        running = start_server([], ["specdec.test.Nothing"], port=0, host="localhost", health_port=0)
        channel = grpc.insecure_channel(f"localhost:{running.health_port}")
        stub = health_pb2_grpc.HealthStub(channel)
        watches = [stub.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(40)]
        for watch in watches:
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        for watch in watches:
            watch.cancel()
        stopper = threading.Thread(target=running.stop, kwargs={"grace": None}, daemon=True)
        stopper.start()
        stopper.join(timeout=20)
        assert not stopper.is_alive(), "stop() hung"
        channel.close()


def test_a_watch_stream_sees_the_server_go_not_serving_when_it_drains():
    running = start_server([], ["specdec.test.Nothing"], port=0, host="localhost")
    try:
        with grpc.insecure_channel(f"localhost:{running.port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            running.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            unknown = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="nope"), timeout=30)
            assert next(unknown).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            unknown.cancel()
            watch.cancel()
    finally:
        running.stop(grace=None)


def test_watch_streams_on_the_main_port_hold_no_handler_thread():
    """Watch is served by callbacks behind the interceptors too: 40 of them on a server with 4 handler
    threads leave a Check answered (each Watch used to hold a thread for as long as it lasted)."""
    running = start_server([], ["specdec.test.Nothing"], port=0, host="localhost", max_workers=4)
    try:
        with grpc.insecure_channel(f"localhost:{running.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watches = [stub.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(40)]
            for watch in watches:
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
            for watch in watches:
                watch.cancel()
    finally:
        running.stop(grace=None)
