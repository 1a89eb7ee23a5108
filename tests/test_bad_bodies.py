"""A request body that does not parse is the caller's error: INVALID_ARGUMENT naming the message it should
have been, on every RPC of every service, with at most one short log line a second and no traceback
(gRPC's own handling answered INTERNAL "Exception deserializing request!" and logged a traceback per
body, from grpc._common). Other unexpected errors stay INTERNAL, logged once with their traceback."""

from __future__ import annotations

import logging
import time

import grpc
import pytest

from service_common.server import start_server
from tests.conftest import PROMPTS

GARBAGE = b"\xff\xff\xff"  # a truncated varint where a field's tag should be: no message parses it

RPCS = [  # (server, method path, request message, response streams)
    ("verify", "/specdec.v1.VerifyService/Verify", "specdec.v1.VerifyRequest", False),
    ("verify", "/specdec.v1.VerifyService/ReleaseSession", "specdec.v1.ReleaseSessionRequest", False),
    ("verify", "/specdec.v1.VerifyService/GetModelInfo", "specdec.v1.GetModelInfoRequest", False),
    ("draft", "/specdec.v1.DraftService/Propose", "specdec.v1.ProposeRequest", False),
    ("draft", "/specdec.v1.DraftService/ReleaseSession", "specdec.v1.ReleaseSessionRequest", False),
    ("draft", "/specdec.v1.DraftService/GetModelInfo", "specdec.v1.GetModelInfoRequest", False),
    ("orchestrator", "/specdec.v1.Orchestrator/Generate", "specdec.v1.GenerateRequest", True),
    ("orchestrator", "/specdec.v1.Orchestrator/GetInfo", "specdec.v1.GetInfoRequest", False),
    ("verify", "/grpc.health.v1.Health/Check", "grpc.health.v1.HealthCheckRequest", False),
]


def _raw_call(port: int, path: str, streams: bool, body: bytes = GARBAGE):
    """Call `path` with `body` as it is (no serializer), returning the raised RpcError."""
    with grpc.insecure_channel(f"localhost:{port}") as channel:
        if streams:
            call = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as raised:
                list(call(body, timeout=10))
        else:
            call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as raised:
                call(body, timeout=10)
    return raised.value


def _tracebacks(records) -> list[logging.LogRecord]:
    return [r for r in records if r.exc_info or "Traceback" in r.getMessage() or "deserializ" in r.getMessage()]


@pytest.mark.parametrize("server,path,message,streams", RPCS, ids=[rpc[1] for rpc in RPCS])
def test_an_undecodable_body_is_invalid_argument_without_a_traceback(stacks, caplog, server, path, message, streams):
    stack = stacks("different")
    port = getattr(stack, server).port
    caplog.set_level(logging.WARNING)
    error = _raw_call(port, path, streams)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert error.details().startswith(f"the request body is not a valid {message}: ")
    assert _tracebacks(caplog.records) == []
    with stack.client() as client:  # still serving
        assert len(client.generate(PROMPTS[0], max_new_tokens=3).token_ids) == 3


def test_a_flood_of_undecodable_bodies_logs_one_short_line_a_second(stacks, caplog):
    port = stacks("different").verify.port
    caplog.set_level(logging.INFO)
    started = time.monotonic()
    time.sleep(1.1)  # past the report of an earlier test on this server
    for _ in range(40):
        assert _raw_call(port, "/specdec.v1.VerifyService/Verify", False).code() == grpc.StatusCode.INVALID_ARGUMENT
    elapsed = time.monotonic() - started
    reports = [r for r in caplog.records if r.name == "service_common.errors"]
    assert 1 <= len(reports) <= elapsed + 1
    assert all("\n" not in r.getMessage() and len(r.getMessage()) < 400 for r in reports)
    assert "/specdec.v1.VerifyService/Verify" in reports[0].getMessage()
    assert _tracebacks(caplog.records) == []


def test_a_client_streaming_rpc_refuses_an_undecodable_message_too(stacks, caplog):
    port = stacks("different").verify.port
    caplog.set_level(logging.WARNING)
    with grpc.insecure_channel(f"localhost:{port}") as channel:
        call = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                     request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as raised:
            list(call(iter([GARBAGE]), timeout=10))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a valid grpc.reflection.v1alpha.ServerReflectionRequest" in raised.value.details()
    assert _tracebacks(caplog.records) == []


class _Broken:
    """A service whose one method fails the way a bug would."""

    @staticmethod
    def add(servicer, server):
        def fail(request, context):
            raise KeyError("a bug")

        handler = grpc.unary_unary_rpc_method_handler(fail)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Broken", {"Fail": handler}),))


def test_an_unexpected_error_is_internal_and_logged_once_with_its_traceback(caplog):
    running = start_server([(_Broken.add, _Broken())], ["test.Broken"], host="localhost")
    try:
        caplog.set_level(logging.WARNING)
        error = _raw_call(running.port, "/test.Broken/Fail", False, b"")
        assert error.code() == grpc.StatusCode.INTERNAL and error.details() == "KeyError: 'a bug'"
        assert len(_tracebacks(caplog.records)) == 1 and caplog.records[-1].exc_info[0] is KeyError
    finally:
        running.stop(grace=None)
