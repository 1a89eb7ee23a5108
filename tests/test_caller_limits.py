"""Calls in flight per caller (service_common/caller_limits.py), on a real server with a small test service: the
call beyond the limit is refused RESOURCE_EXHAUSTED at once, unparsed, while another caller is served; a
stream holds its slot until it ends, is cancelled or fails; health and reflection are exempt; on the
orchestrator's public API the API key is the caller. Two loopback addresses (127.0.0.1 and [::1]) are two
callers, as two hosts would be."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from typer.testing import CliRunner

from orchestrator.server import OrchestratorSettings
from service_common.caller_limits import DEFAULT_MAX_WORKERS, CallerSlots, default_max_calls_per_caller
from service_common.server import start_server
from serving.model_server import ModelServerSettings
from transport.api_keys import bearer_metadata

SERVICE = "test.Held"
A, B = "127.0.0.1", "[::1]"


class Held:
    """Unary `Hold` and streaming `Stream` calls that stay in their handler until released; `Fail` and
    `FailStream` raise. Counts the request bodies parsed and the handlers entered."""

    def __init__(self):
        self.release = threading.Event()
        self.entered = threading.Semaphore(0)
        self.parsed = 0
        self._lock = threading.Lock()

    def parse(self, body: bytes) -> bytes:
        with self._lock:
            self.parsed += 1
        return body

    def hold(self, request, context):
        self.entered.release()
        self.release.wait(30)
        return b"done"

    def stream(self, request, context):
        self.entered.release()
        yield b"first"
        while not self.release.wait(0.01):
            if not context.is_active():
                return
        yield b"last"

    def fail(self, request, context):
        raise RuntimeError("the handler failed")

    def fail_stream(self, request, context):
        self.entered.release()
        yield b"first"
        raise RuntimeError("the stream failed")

    def add(self, _servicer, server) -> None:
        handlers = {
            "Hold": grpc.unary_unary_rpc_method_handler(self.hold, request_deserializer=self.parse),
            "Stream": grpc.unary_stream_rpc_method_handler(self.stream, request_deserializer=self.parse),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail, request_deserializer=self.parse),
            "FailStream": grpc.unary_stream_rpc_method_handler(self.fail_stream, request_deserializer=self.parse),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))

    def wait_entered(self, n: int) -> None:
        for _ in range(n):
            assert self.entered.acquire(timeout=10), "a call never reached its handler"


@pytest.fixture
def serve():
    started = []

    def start(limit: int, **kwargs):
        held = Held()
        running = start_server([(held.add, held)], [SERVICE], 0, "localhost", max_calls_per_caller=limit, **kwargs)
        started.append((held, running))
        return held, running

    yield start
    for held, running in started:
        held.release.set()
        running.stop(grace=None)


def _channel(host: str, running) -> grpc.Channel:
    return grpc.insecure_channel(f"{host}:{running.port}")


def _unary(channel, name="Hold"):
    return channel.unary_unary(f"/{SERVICE}/{name}")


def _stream(channel, name="Stream"):
    return channel.unary_stream(f"/{SERVICE}/{name}")


def _until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_call_beyond_the_limit_is_refused_at_once_unparsed_while_another_caller_is_served(serve):
    held, running = serve(2)
    slots = running.caller_limit.slots
    a, b = _channel(A, running), _channel(B, running)
    outstanding = [_unary(a).future(b"x", timeout=30) for _ in range(2)]
    held.wait_entered(2)
    parsed = held.parsed

    started = time.perf_counter()
    with pytest.raises(grpc.RpcError) as refused:
        _unary(a)(b"x", timeout=10)
    assert time.perf_counter() - started < 2.0
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = refused.value.details()
    assert "ipv4:127.0.0.1" in details and "already has 2" in details
    assert "--max-calls-per-caller" in details and "SPECDEC_MAX_CALLS_PER_CALLER" in details
    assert held.parsed == parsed  # the refused call's request was never parsed
    assert slots.refused == 1

    other = _unary(b).future(b"y", timeout=30)  # another caller: admitted while A is at its limit
    held.wait_entered(1)
    assert slots.in_flight("ipv4:127.0.0.1") == 2 and slots.in_flight("ipv6:[::1]") == 1
    held.release.set()
    assert [f.result() for f in (*outstanding, other)] == [b"done"] * 3
    _until(lambda: slots.in_flight() == 0)
    assert _unary(a)(b"x", timeout=10) == b"done"  # the slots came back


def test_a_stream_holds_its_slot_until_it_ends_and_a_cancelled_or_failed_one_frees_it(serve):
    held, running = serve(2)
    slots = running.caller_limit.slots
    key = "ipv4:127.0.0.1"
    a = _channel(A, running)
    first, second = _stream(a)(b"x", timeout=30), _stream(a)(b"x", timeout=30)
    assert next(first) == b"first" and next(second) == b"first"
    assert slots.in_flight(key) == 2
    with pytest.raises(grpc.RpcError) as refused:
        next(_stream(a)(b"x", timeout=10))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    first.cancel()  # cancelled by the client: the slot comes back
    _until(lambda: slots.in_flight(key) == 1)
    third = _stream(a)(b"x", timeout=30)
    assert next(third) == b"first"
    assert slots.in_flight(key) == 2

    held.release.set()  # streams that end normally give theirs back
    assert list(second) == [b"last"] and list(third) == [b"last"]
    _until(lambda: slots.in_flight(key) == 0)

    failing = _stream(a, "FailStream")(b"x", timeout=30)  # a stream whose handler fails
    assert next(failing) == b"first"
    with pytest.raises(grpc.RpcError) as failed:
        list(failing)
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    with pytest.raises(grpc.RpcError):
        _unary(a, "Fail")(b"x", timeout=10)  # and a unary one
    _until(lambda: slots.in_flight(key) == 0)


def test_streams_cancelled_again_and_again_never_lose_a_slot(serve):
    held, running = serve(1)
    slots = running.caller_limit.slots
    a = _channel(A, running)
    for _ in range(5):  # cancelled again and again: never a slot lost
        call = _stream(a)(b"x", timeout=30)
        assert next(call) == b"first"
        call.cancel()
        _until(lambda: slots.in_flight() == 0)
    call = _stream(a)(b"x", timeout=30)
    assert next(call) == b"first"
    held.release.set()
    assert list(call) == [b"last"]


def test_health_and_reflection_are_exempt(serve):
    held, running = serve(1)
    a = _channel(A, running)
    pending = _unary(a).future(b"x", timeout=30)
    held.wait_entered(1)
    with pytest.raises(grpc.RpcError) as refused:
        _unary(a)(b"x", timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    health = health_pb2_grpc.HealthStub(a)
    for _ in range(3):
        assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(a)
    replies = list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                   timeout=5))
    assert SERVICE in {s.name for s in replies[0].list_services_response.service}
    held.release.set()
    assert pending.result() == b"done"


def test_with_api_keys_the_key_is_the_caller(serve, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("key-one\nkey-two\n")
    held, running = serve(1, api_key_file=str(keys), caller_by_api_key=True)
    a = _channel(A, running)
    one, two = bearer_metadata("key-one"), bearer_metadata("key-two")
    pending = _unary(a).future(b"x", timeout=30, metadata=one)
    held.wait_entered(1)
    with pytest.raises(grpc.RpcError) as refused:
        _unary(a)(b"x", timeout=10, metadata=one)  # the same key from the same address
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "this API key" in refused.value.details() and "key-one" not in refused.value.details()
    with pytest.raises(grpc.RpcError) as refused:
        _unary(_channel(B, running))(b"x", timeout=10, metadata=one)  # the same key from another address
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    other = _unary(a).future(b"x", timeout=30, metadata=two)  # another key, the same address: another caller
    held.wait_entered(1)
    with pytest.raises(grpc.RpcError) as unauthenticated:  # a wrong key is refused before it is counted
        _unary(a)(b"x", timeout=10, metadata=bearer_metadata("key-three"))
    assert unauthenticated.value.code() == grpc.StatusCode.UNAUTHENTICATED
    held.release.set()
    assert pending.result() == other.result() == b"done"


def test_without_a_key_file_a_bearer_header_does_not_make_a_new_caller(serve):
    """Unchecked, any string passes as a key: keyed by it, one client could pose as any number of callers."""
    held, running = serve(1, caller_by_api_key=True)
    a = _channel(A, running)
    pending = _unary(a).future(b"x", timeout=30, metadata=bearer_metadata("made-up-1"))
    held.wait_entered(1)
    with pytest.raises(grpc.RpcError) as refused:
        _unary(a)(b"x", timeout=10, metadata=bearer_metadata("made-up-2"))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    held.release.set()
    assert pending.result() == b"done"


def test_zero_is_no_limit(serve):
    held, running = serve(0)
    a = _channel(A, running)
    pending = [_unary(a).future(b"x", timeout=30) for _ in range(5)]
    held.wait_entered(5)
    held.release.set()
    assert [f.result() for f in pending] == [b"done"] * 5


def test_the_defaults_leave_half_the_handler_threads_to_other_callers(serve):
    assert DEFAULT_MAX_WORKERS == 256 and default_max_calls_per_caller(DEFAULT_MAX_WORKERS) == 128
    assert ModelServerSettings("m").max_workers == OrchestratorSettings("v:1").max_workers == 256
    assert ModelServerSettings("m").max_calls_per_caller is None  # half of max_workers
    assert OrchestratorSettings("v:1").max_calls_per_caller is None
    _, running = serve(None)
    assert running.caller_limit.limit == 128
    _, running = serve(None, max_workers=10)
    assert running.caller_limit.limit == 5
    with pytest.raises(ValueError, match="--max-calls-per-caller"):
        CallerSlots(-1)


@pytest.mark.parametrize("args, env, message", [
    (["--max-calls-per-caller", "-1"], {}, "--max-calls-per-caller must be >= 0"),
    ([], {"SPECDEC_MAX_CALLS_PER_CALLER": "-3"}, "--max-calls-per-caller must be >= 0 (0: no limit), got -3"),
    (["--max-workers", "0"], {}, "--max-workers must be at least 1"),
    ([], {"SPECDEC_MAX_WORKERS": "0"}, "--max-workers must be at least 1"),
])
def test_serve_refuses_bad_limits_from_flags_and_environment(args, env, message):
    from specdec_cli.main import app

    result = CliRunner().invoke(app, ["serve", "verify", "--model", "unused", *args], env=env)
    assert result.exit_code == 2
    assert message in result.output
