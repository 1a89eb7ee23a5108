"""A collector stand-in for measuring what OTLP export costs the stack: an OTLP/gRPC trace endpoint that
counts the spans it receives and keeps nothing, run as its own process so that its work is not counted
as the stack's.

    python -m benchmarking.otlp_sink --port 4317

Knows the OTLP trace service, not what the spans mean.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class CountingTraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.spans = 0
        self._lock = threading.Lock()

    def Export(self, request, context):
        count = sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)
        with self._lock:
            self.spans += count
        return trace_service_pb2.ExportTraceServiceResponse()


def serve(port: int) -> None:
    service = CountingTraceService()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(service, server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise SystemExit(f"cannot listen on 127.0.0.1:{port}")
    server.start()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    print("listening", flush=True)
    try:
        stopped.wait()
    except KeyboardInterrupt:
        pass
    server.stop(1).wait()
    print(f"received {service.spans} spans", flush=True)


@contextmanager
def otlp_sink_process(timeout_s: float = 30.0, report: list | None = None) -> Iterator[str]:
    """A sink in a child process on a free loopback port; yields its endpoint (http://127.0.0.1:PORT).
    When it has stopped, `report` (if given) gets its last line ("received N spans")."""
    from local_stack.paths import REPO_ROOT
    from transport import free_port

    port = free_port()
    # From the checkout's root: benchmarking/ is not installed, so `-m` finds it only there.
    process = subprocess.Popen([sys.executable, "-m", "benchmarking.otlp_sink", "--port", str(port)],
                               stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        ready = threading.Event()
        threading.Thread(target=lambda: process.stdout.readline() and ready.set(), daemon=True).start()
        if not ready.wait(timeout_s):
            raise RuntimeError(f"the OTLP sink did not start within {timeout_s:.0f} s")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            remaining, _ = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            remaining, _ = process.communicate()
        if report is not None:
            report.extend(remaining.splitlines()[-1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=4317)
    serve(parser.parse_args(argv).port)


if __name__ == "__main__":
    main()
