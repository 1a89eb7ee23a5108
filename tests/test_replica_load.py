"""Every Propose / Verify reply (timing.load) and every ModelInfo (load) reports the replica's load at reply
time: requests waiting for its model worker, sessions held, session memory used, whether it is draining."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

import draft_service.server as draft_server
import verify_service.server as verify_server
from service_common.session_fingerprint import fingerprint
from serving.model_server import ModelServerSettings
from serving.model_worker import ModelWorker
from specdec_api import common_pb2, draft_pb2, draft_pb2_grpc, verify_pb2, verify_pb2_grpc

HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def verify(tiny):
    running = verify_server.start(ModelServerSettings(str(tiny.target), host=HOST, session_memory_mb=16))
    with grpc.insecure_channel(f"{HOST}:{running.port}") as channel:
        yield verify_pb2_grpc.VerifyServiceStub(channel)
    running.stop(grace=None)


def _info(stub) -> common_pb2.ModelInfo:
    return stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=30)


def _release(stub, session_id: str) -> bool:
    return stub.ReleaseSession(common_pb2.ReleaseSessionRequest(session_id=session_id), timeout=30).released


def test_verify_replies_count_the_sessions_held_and_the_memory_they_use(verify):
    idle = _info(verify)
    assert idle.HasField("load")
    assert idle.load.live_sessions == 0 and idle.load.memory_used == 0 and not idle.load.draining
    loads = [verify.Verify(verify_pb2.VerifyRequest(session_id=f"s{i}", append_tokens=[5, 6, 7], draft_token_ids=[8, 9]),
                           timeout=30).timing.load for i in range(3)]
    assert [load.live_sessions for load in loads] == [1, 2, 3]  # each reply counts its own session
    assert 0 < loads[0].memory_used < loads[1].memory_used < loads[2].memory_used <= 1
    assert all(load.queued >= 0 and not load.draining for load in loads)
    assert _info(verify).load.live_sessions == 3

    assert _release(verify, "s0") and _release(verify, "s1")
    more = verify.Verify(verify_pb2.VerifyRequest(session_id="s2", prefix_len=4, prefix_fingerprint=fingerprint([5, 6, 7, 8]),
                                                  append_tokens=[10], draft_token_ids=[11]), timeout=30)
    assert more.timing.load.live_sessions == 1 and 0 < more.timing.load.memory_used < loads[2].memory_used
    assert _release(verify, "s2")
    after = _info(verify).load
    assert after.live_sessions == 0 and after.memory_used == 0


def test_a_refused_call_leaves_the_load_as_it_was(verify):
    with pytest.raises(grpc.RpcError) as caught:
        verify.Verify(verify_pb2.VerifyRequest(session_id="gone", prefix_len=3, append_tokens=[1]), timeout=30)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _info(verify).load.live_sessions == 0


def test_propose_replies_and_draft_model_info_carry_the_load(tiny):
    running = draft_server.start(ModelServerSettings(str(tiny.draft), host=HOST))
    try:
        with grpc.insecure_channel(f"{HOST}:{running.port}") as channel:
            draft = draft_pb2_grpc.DraftServiceStub(channel)
            assert _info(draft).load.live_sessions == 0
            reply = draft.Propose(draft_pb2.ProposeRequest(session_id="d", append_tokens=[5, 6, 7], num_draft_tokens=3),
                                  timeout=30)
            load = reply.timing.load
            assert load.live_sessions == 1 and 0 < load.memory_used <= 1 and load.queued >= 0 and not load.draining
            assert _info(draft).load.live_sessions == 1
            assert _release(draft, "d")
            assert _info(draft).load.live_sessions == 0
    finally:
        running.stop(grace=None)


def test_the_worker_counts_the_requests_waiting_for_it():
    """queued() is what the worker has been handed and not yet started, whoever sent it."""
    release = threading.Event()
    started = threading.Event()

    def run_batch(payloads):
        started.set()
        release.wait(30)
        return payloads

    worker = ModelWorker(run_batch, max_batch=1)
    assert worker.queued() == 0
    threads = [threading.Thread(target=worker.submit, args=(i,), kwargs={"caller": f"c{i}"}) for i in range(4)]
    threads[0].start()
    assert started.wait(30)  # the first runs (inline, on its own thread) and holds the model
    for thread in threads[1:]:
        thread.start()
    deadline = time.monotonic() + 30
    while worker.queued() < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.queued() == 3
    release.set()
    for thread in threads:
        thread.join(30)
    assert worker.queued() == 0
