"""The delay relay (netlab): bytes arrive whole and in order, each direction is held the set delay once per
chunk (not once per chunk in flight), the delay can change on open connections, and closes pass through."""

from __future__ import annotations

import os
import socket
import socketserver
import statistics
import threading
import time

import pytest

from netlab.relay_process import RelayProcess


class _Echo(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := self.request.recv(1 << 16):
            self.request.sendall(data)
        self.request.sendall(b"bye")  # after the client's EOF: proves half-close went through


@pytest.fixture(scope="module")
def echo_server():
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def relay(echo_server, tmp_path):
    with RelayProcess([("127.0.0.1:0", echo_server), (f"unix:{tmp_path / 'echo.sock'}", echo_server)],
                      tmp_path / "relay.ctl") as running:
        yield running


def _connect(address) -> socket.socket:
    if address.is_unix:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(address.path)
    else:
        sock = socket.create_connection((address.host, address.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(10)
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return bytes(data)


def _median_round_trip_ms(sock: socket.socket, count: int = 25) -> float:
    times = []
    for _ in range(count):
        started = time.perf_counter()
        sock.sendall(b"x")
        _recv_exactly(sock, 1)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def _added_round_trip_ms(sock: socket.socket, set_delay, delay_ms: float) -> float:
    """Median round trip with `delay_ms` minus without it. Alternates the two a few times: this VM's speed
    drifts between seconds, and one baseline followed by one delayed sample would charge the drift to the
    relay."""
    base, delayed = [], []
    for _ in range(4):
        set_delay(0)
        base.append(_median_round_trip_ms(sock, 9))
        set_delay(delay_ms)
        delayed.append(_median_round_trip_ms(sock, 9))
    return statistics.median(delayed) - statistics.median(base)


def _within_after_retries(measure, expected: float, tolerance: float, attempts: int = 3) -> None:
    """Another complete measurement only when the last one missed, at most `attempts` in all, each held to
    the same tolerance. Fresh-clone CI runs have read 1.9, 3.6 and twice 5-12 ms off (then 6 ms off again
    on the one retry) during slow spells of this VM, in full-suite runs only; alone, the test reads within
    0.3 ms. A relay that adds the wrong delay misses every attempt alike."""
    readings = []
    for _ in range(attempts):
        readings.append(measure())
        if abs(readings[-1] - expected) <= tolerance:
            return
    raise AssertionError(f"added {', then '.join(f'{r:.2f}' for r in readings)} ms, expected {expected} ms "
                         f"± {tolerance}")


def test_every_byte_arrives_in_order_over_tcp_and_unix_listeners(relay):
    payload = os.urandom(1 << 20)
    relay.set_delay(1.0)
    for address in relay.bound:
        with _connect(address) as sock:
            received = bytearray()

            def read_back():
                received.extend(_recv_exactly(sock, len(payload)))

            reader = threading.Thread(target=read_back)
            reader.start()
            for start in range(0, len(payload), 1000):  # many small writes: many chunks held at once
                sock.sendall(payload[start:start + 1000])
            reader.join(30)
            assert bytes(received) == payload


def test_round_trip_grows_by_twice_the_one_way_delay(relay):
    with _connect(relay.bound[0]) as sock:  # the delay changes on an open connection
        _within_after_retries(lambda: _added_round_trip_ms(sock, relay.set_delay, 5), 10.0, 1.0 + 0.4)


def test_chunks_in_flight_are_held_once_not_one_after_another(relay):
    relay.set_delay(20)

    def elapsed_ms() -> float:
        with _connect(relay.bound[0]) as sock:
            started = time.perf_counter()
            for _ in range(20):  # 20 separate chunks, 1 ms apart, all in flight together
                sock.sendall(b"y")
                time.sleep(0.001)
            _recv_exactly(sock, 20)
            return (time.perf_counter() - started) * 1000

    # Held one after another they would take 20 * 40 ms every time; held once each, about 40 ms plus the
    # 20 ms of sends. Tries until one is under the bound, at most six: VM stalls have pushed single tries
    # to 102 ms, and in two full-suite runs three tries in a row to 103-292 ms.
    tries = []
    while len(tries) < 6 and (not tries or min(tries) >= 40 + 20 + 40):
        tries.append(elapsed_ms())
    assert all(t >= 40 for t in tries) and min(tries) < 40 + 20 + 40, tries


def test_half_close_reaches_the_upstream_after_the_held_bytes(relay):
    relay.set_delay(5)
    with _connect(relay.bound[1]) as sock:
        sock.sendall(b"last words")
        sock.shutdown(socket.SHUT_WR)
        data = bytearray()
        while chunk := sock.recv(100):
            data += chunk
    assert bytes(data) == b"last wordsbye"


def test_a_refused_upstream_closes_the_client_connection(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with RelayProcess([("127.0.0.1:0", f"127.0.0.1:{closed_port}")], tmp_path / "ctl") as relay:
        with _connect(relay.bound[0]) as sock:
            try:
                assert sock.recv(10) == b""
            except ConnectionResetError:
                pass  # a reset is as good as an EOF: the caller learns the upstream is not there


def test_loopback_path_puts_the_relay_in_front_of_each_service_and_says_why():
    from netlab.delay_path import delay_path

    with delay_path(["draft", "verify"], isolation="loopback") as path:
        servers = []
        for service in ("draft", "verify"):
            socketserver.TCPServer.allow_reuse_address = True
            server = socketserver.ThreadingTCPServer(path.bind[service], _Echo)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
            servers.append(server)
        try:
            assert (path.isolation, path.method) == ("loopback", "relay") and "unavailable" in path.note
            from netlab.addresses import Address

            with _connect(Address.parse(path.reach["verify"])) as sock:
                _within_after_retries(lambda: _added_round_trip_ms(sock, path.set_delay, 3), 6.0, 0.6 + 0.4)
        finally:
            for server in servers:
                server.shutdown()
                server.server_close()
