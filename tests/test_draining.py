"""A draining model service (SIGTERM, or RunningServer.drain in-process) goes NOT_SERVING on every health
port at once, keeps serving the sessions it holds exactly as before, refuses new ones (UNAVAILABLE, error
kind "draining") before any model work, and ends its drain when the last session is released, or at its
timeout when one never is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import draft_service.server as draft_server
import verify_service.server as verify_server
from local_stack.processes import wait_healthy
from service_common.session_fingerprint import fingerprint
from serving.model_server import ModelServerSettings
from specdec_api import common_pb2, draft_pb2, draft_pb2_grpc, verify_pb2, verify_pb2_grpc
from transport import free_port

HOST = "127.0.0.1"
SERVICE = "specdec.v1.VerifyService"
FIRST = verify_pb2.VerifyRequest(append_tokens=[5, 6, 7], draft_token_ids=[8, 9])  # + a session id
NEXT = verify_pb2.VerifyRequest(prefix_len=4, prefix_fingerprint=fingerprint([5, 6, 7, 8]), append_tokens=[10],
                                draft_token_ids=[11, 12])


def _call(stub, template: verify_pb2.VerifyRequest, session_id: str) -> verify_pb2.VerifyResponse:
    request = verify_pb2.VerifyRequest()
    request.CopyFrom(template)
    request.session_id = session_id
    return stub.Verify(request, timeout=30)


def _without_timing(reply):
    reply.ClearField("timing")
    return reply


def _release(stub, session_id: str) -> bool:
    return stub.ReleaseSession(common_pb2.ReleaseSessionRequest(session_id=session_id), timeout=30).released


def _health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def _wait_for(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _assert_refused_as_draining(call) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
    assert ("specdec-error", "draining") in tuple(caught.value.trailing_metadata())
    assert "takes no new sessions" in caught.value.details()


class _Drain:
    """running.drain(timeout_s) on a thread: how it ended (True: the work ended) and when."""

    def __init__(self, running, timeout_s: float):
        self.began = time.monotonic()
        self.result: list[tuple[bool, float]] = []
        self.thread = threading.Thread(target=lambda: self.result.append(
            (running.drain(timeout_s), time.monotonic() - self.began)), daemon=True)
        self.thread.start()

    def wait(self, timeout_s: float = 60.0) -> tuple[bool, float]:
        self.thread.join(timeout_s)
        assert self.result, "drain never returned"
        return self.result[0]


@pytest.fixture
def verify(tiny):
    running = verify_server.start(ModelServerSettings(str(tiny.target), host=HOST, health_port=0))
    yield running
    running.stop(grace=None)


def test_a_draining_verify_service_serves_the_sessions_it_holds_and_refuses_new_ones(verify):
    with grpc.insecure_channel(f"{HOST}:{verify.port}") as channel:
        stub = verify_pb2_grpc.VerifyServiceStub(channel)
        for session_id in ("held", "twin", "other"):
            _call(stub, FIRST, session_id)
        expected = _without_timing(_call(stub, NEXT, "twin"))  # what "held" gets for the same call, undrained

        drain = _Drain(verify, timeout_s=60)
        _wait_for(lambda: verify.servicer.draining)
        for port in (verify.port, verify.health_port):
            for service in ("", SERVICE):
                assert _health(f"{HOST}:{port}", service) == health_pb2.HealthCheckResponse.NOT_SERVING

        reply = _call(stub, NEXT, "held")
        assert reply.timing.load.draining and reply.timing.load.live_sessions == 3
        assert _without_timing(reply) == expected  # a generation in flight goes on, token for token
        assert _call(stub, FIRST, "twin").cached_len == 5  # restarting a session it holds is serving it

        worked = verify.servicer.worker.stats.jobs
        _assert_refused_as_draining(lambda: _call(stub, FIRST, "new"))  # a new session
        _assert_refused_as_draining(lambda: _call(stub, NEXT, "lost"))  # one held elsewhere, or lost here
        assert verify.servicer.worker.stats.jobs == worked  # refused before any model work
        assert stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=30).load.draining

        assert _release(stub, "held") and _release(stub, "twin")
        time.sleep(0.5)
        assert drain.thread.is_alive()  # "other" is still held
        released_at = time.monotonic()
        assert _release(stub, "other")
        ended, _ = drain.wait()
        assert ended and time.monotonic() - released_at < 5  # the last release ends it, long before its 60 s


def test_a_drain_with_a_session_never_released_ends_at_its_timeout(verify):
    with grpc.insecure_channel(f"{HOST}:{verify.port}") as channel:
        _call(verify_pb2_grpc.VerifyServiceStub(channel), FIRST, "forgotten")
        ended, took = _Drain(verify, timeout_s=1.5).wait()
    assert not ended and 1.5 <= took < 6


def test_a_drain_with_no_session_ends_at_once(verify):
    ended, took = _Drain(verify, timeout_s=60).wait()
    assert ended and took < 5


def test_a_draining_draft_service_refuses_new_sessions_too(tiny):
    running = draft_server.start(ModelServerSettings(str(tiny.draft), host=HOST))
    try:
        with grpc.insecure_channel(f"{HOST}:{running.port}") as channel:
            draft = draft_pb2_grpc.DraftServiceStub(channel)
            first = draft.Propose(draft_pb2.ProposeRequest(session_id="held", append_tokens=[5, 6, 7], num_draft_tokens=3),
                                  timeout=30)
            drain = _Drain(running, timeout_s=60)
            _wait_for(lambda: running.servicer.draining)
            held = [5, 6, 7, *first.token_ids][: first.cached_len]
            more = draft.Propose(draft_pb2.ProposeRequest(session_id="held", prefix_len=len(held), append_tokens=[1],
                                                          prefix_fingerprint=fingerprint(held), num_draft_tokens=2),
                                 timeout=30)
            assert more.timing.load.draining and more.cached_len == len(held) + 2
            _assert_refused_as_draining(lambda: draft.Propose(
                draft_pb2.ProposeRequest(session_id="new", append_tokens=[5], num_draft_tokens=2), timeout=30))
            assert _release(draft, "held")
            assert drain.wait()[0]
    finally:
        running.stop(grace=None)


def _serve_cli(tiny, log_path, drain_timeout_s: float) -> tuple[subprocess.Popen, int, int]:
    port, health_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "specdec_cli", "serve", "verify", "--model", str(tiny.target), "--port", str(port),
         "--host", HOST, "--health-port", str(health_port), "--drain-timeout-s", str(drain_timeout_s)],
        env={**os.environ, "GRPC_VERBOSITY": "ERROR"}, stdout=subprocess.DEVNULL, stderr=open(log_path, "w"))
    wait_healthy(f"{HOST}:{health_port}", 60, process)
    return process, port, health_port


def test_sigterm_drains_the_cli_service_until_its_last_session_is_released(tiny, tmp_path):
    process, port, health_port = _serve_cli(tiny, tmp_path / "verify.log", drain_timeout_s=120)
    try:
        with grpc.insecure_channel(f"{HOST}:{port}") as channel:
            stub = verify_pb2_grpc.VerifyServiceStub(channel)
            _call(stub, FIRST, "held")
            process.send_signal(signal.SIGTERM)
            _wait_for(lambda: _health(f"{HOST}:{health_port}") == health_pb2.HealthCheckResponse.NOT_SERVING)
            assert _call(stub, NEXT, "held").timing.load.draining
            _assert_refused_as_draining(lambda: _call(stub, FIRST, "new"))
            assert process.poll() is None
            released_at = time.monotonic()
            assert _release(stub, "held")
        code = process.wait(timeout=60)
        assert code == 0 and time.monotonic() - released_at < 30, (tmp_path / "verify.log").read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_second_sigterm_cuts_the_drain_short(tiny, tmp_path):
    process, port, health_port = _serve_cli(tiny, tmp_path / "verify.log", drain_timeout_s=120)
    try:
        with grpc.insecure_channel(f"{HOST}:{port}") as channel:
            _call(verify_pb2_grpc.VerifyServiceStub(channel), FIRST, "never released")
        process.send_signal(signal.SIGTERM)
        _wait_for(lambda: _health(f"{HOST}:{health_port}") == health_pb2.HealthCheckResponse.NOT_SERVING)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, (tmp_path / "verify.log").read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


class _SlowVerify(grpc.ServerInterceptor):
    """Every Verify takes 30 ms more: a generation stays in flight long enough to watch a drain wait for it."""

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not details.method.endswith("/Verify"):
            return handler

        def slow(request, context):
            time.sleep(0.03)
            return handler.unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(slow, handler.request_deserializer, handler.response_serializer)


def test_a_draining_orchestrator_finishes_the_generations_streaming_and_refuses_new_ones(tiny):
    """The orchestrator's drain: health NOT_SERVING, a new Generate refused with UNAVAILABLE, the generation
    already streaming completes in full, and the drain waits for it and ends when it does."""
    import orchestrator.server as orchestrator_server
    from specdec_client import Client
    from specdec_client.errors import SpecDecError

    verify = verify_server.start(ModelServerSettings(str(tiny.target), host=HOST), interceptors=[_SlowVerify()])
    orchestrator = orchestrator_server.start(orchestrator_server.OrchestratorSettings(
        verify=f"{HOST}:{verify.port}", host=HOST))
    address = f"{HOST}:{orchestrator.port}"
    try:
        with Client(address, timeout=120) as client:
            alone = client.generate("def main():\n", max_new_tokens=40)
            chunks = client.stream("def main():\n", max_new_tokens=40)
            first = next(chunks)  # the generation is under way: ~40 rounds of 30 ms or more to go
            drain = _Drain(orchestrator, 60.0)
            _wait_for(lambda: orchestrator.servicer.draining)
            assert _health(address) == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(SpecDecError) as refused:
                client.generate("import os\n", max_new_tokens=4)
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE and "shutting down" in refused.value.details
            assert not drain.result, "the drain ended while a generation was still streaming"
            rest = list(chunks)
            assert first.token_ids + [t for c in rest for t in c.token_ids] == alone.token_ids
            assert rest[-1].finish_reason == "length"
            ended, _after_s = drain.wait()
            assert ended
    finally:
        orchestrator.stop(grace=None)
        verify.stop(grace=None)
