"""The floor under `overhead_ms_p50`: what one trivial gRPC Python unary call costs on this machine.

    python -m benchmarking.rpc_floor            # server on core 1, client on core 0, as in the pinned bench

A server process with an empty handler and a client process calling it, pinned like the verify service
and the orchestrator, (a) back to back and (b) with a pause between calls as in a speculative round (the
handler "computes" for a while, so both sides go idle between messages). Three transports: a gRPC unary
call (what the services use), one message each way on a long-lived gRPC bidi stream, and a raw TCP echo
(the kernel's share). Prints one JSON object with the p50 / p90 round trip in ms of each. A round makes
two unary calls (draft, verify) plus their payloads.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import statistics
import subprocess
import sys
import time
from concurrent import futures

import grpc

_METHOD = "/floor.Echo/Call"
_STREAM = "/floor.Echo/Stream"


def _serve(port: int, tcp_port: int) -> None:
    def call(request, context):
        return request

    def stream(requests, context):
        yield from requests

    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "floor.Echo", {"Call": grpc.unary_unary_rpc_method_handler(call),
                       "Stream": grpc.stream_stream_rpc_method_handler(stream)}),))
    server.add_insecure_port(f"localhost:{port}")
    server.start()
    listener = socket.create_server(("localhost", tcp_port))
    while True:
        connection, _ = listener.accept()
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := connection.recv(65536):
            connection.sendall(data)
        connection.close()


def _time(exchange, calls: int, pause_s: float) -> dict:
    for _ in range(20):
        exchange()
    times = []
    for _ in range(calls):
        if pause_s:
            time.sleep(pause_s)
        started = time.perf_counter()
        exchange()
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {"p50_ms": round(statistics.median(times), 3), "p90_ms": round(times[int(0.9 * (len(times) - 1))], 3)}


def _measure(port: int, tcp_port: int, calls: int, pause_s: float) -> dict:
    payload = b"x" * 64
    with grpc.insecure_channel(f"localhost:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        unary = channel.unary_unary(_METHOD)
        outbox: queue.Queue = queue.Queue()
        replies = channel.stream_stream(_STREAM)(iter(outbox.get, None))

        def over_stream():
            outbox.put(payload)
            next(replies)

        result = {"grpc_unary": _time(lambda: unary(payload), calls, pause_s),
                  "grpc_bidi_stream": _time(over_stream, calls, pause_s)}
        outbox.put(None)
    with socket.create_connection(("localhost", tcp_port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def echo():
            sock.sendall(payload)
            received = 0
            while received < len(payload):
                received += len(sock.recv(65536))

        result["raw_tcp"] = _time(echo, calls, pause_s)
    return result


def _wait_listening(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("localhost", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--pause-ms", type=float, default=6.0, help="idle time between calls in (b)")
    parser.add_argument("--server-cpu", type=int, default=1)
    parser.add_argument("--client-cpu", type=int, default=0)
    parser.add_argument("--serve", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        os.sched_setaffinity(0, {args.server_cpu})
        _serve(*args.serve)
        return
    from local_stack.paths import REPO_ROOT
    from transport import free_port

    port, tcp_port = free_port(), free_port()
    # From the checkout's root: benchmarking/ is not installed, so `-m` finds it only there.
    server = subprocess.Popen([sys.executable, "-m", "benchmarking.rpc_floor", "--serve", str(port), str(tcp_port),
                               "--server-cpu", str(args.server_cpu)], cwd=REPO_ROOT)
    try:
        os.sched_setaffinity(0, {args.client_cpu})
        _wait_listening(tcp_port)
        result = {"server_cpu": args.server_cpu, "client_cpu": args.client_cpu,
                  "back_to_back": _measure(port, tcp_port, args.calls, 0.0),
                  f"pause_{args.pause_ms:g}_ms": _measure(port, tcp_port, args.calls, args.pause_ms / 1000)}
    finally:
        server.terminate()
        server.wait(10)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
