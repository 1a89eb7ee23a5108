"""Bad input gets a status a person can act on, and the server keeps serving."""

from __future__ import annotations

import grpc
import pytest

from service_common.session_fingerprint import fingerprint
from specdec_api import common_pb2, draft_pb2, draft_pb2_grpc, verify_pb2, verify_pb2_grpc
from specdec_client import InvalidArgument, OutOfRange
from tests.conftest import PROMPTS
from tests.tiny_models import CONTEXT, VOCAB


@pytest.mark.parametrize("prompt,options,error,fragment", [
    ("", {}, InvalidArgument, "empty"),
    ([], {}, InvalidArgument, "zero tokens"),
    ("x", {"max_new_tokens": 0}, InvalidArgument, "max_new_tokens"),
    ("x", {"max_new_tokens": -3}, InvalidArgument, "max_new_tokens"),
    ("x", {"max_new_tokens": CONTEXT}, OutOfRange, "context"),
    ("x", {"temperature": -0.5}, InvalidArgument, "temperature"),
    ("x", {"temperature": 1.0, "top_p": 0.0}, InvalidArgument, "top_p"),
    ("x", {"temperature": 1.0, "top_p": 1.5}, InvalidArgument, "top_p"),
    ("x", {"temperature": 1.0, "top_k": -1}, InvalidArgument, "top_k"),
    ("x", {"num_draft_tokens": -1}, InvalidArgument, "num_draft_tokens"),
    ("x", {"num_draft_tokens": 1000}, InvalidArgument, "num_draft_tokens"),
    ([1, 2, VOCAB + 5], {}, InvalidArgument, "vocabulary"),
    ([-1], {}, InvalidArgument, "vocabulary"),
])
def test_orchestrator_rejects_bad_requests_clearly(stacks, prompt, options, error, fragment):
    options = {"max_new_tokens": 8, **options}
    with stacks("different").client() as client:
        with pytest.raises(error) as raised:
            client.generate(prompt, **options)
        assert fragment in raised.value.details
        # still serving
        assert len(client.generate(PROMPTS[0], max_new_tokens=4).token_ids) == 4


def _verify_stub(stack):
    return verify_pb2_grpc.VerifyServiceStub(grpc.insecure_channel(f"localhost:{stack.verify.port}"))


def _draft_stub(stack):
    return draft_pb2_grpc.DraftServiceStub(grpc.insecure_channel(f"localhost:{stack.draft.port}"))


@pytest.mark.parametrize("request_fields,code,fragment", [
    ({"session_id": "s", "prefix_len": 5, "append_tokens": [1]}, grpc.StatusCode.FAILED_PRECONDITION, "prefix_len=0"),
    ({"session_id": "", "append_tokens": [1]}, grpc.StatusCode.INVALID_ARGUMENT, "session_id"),
    ({"session_id": "s", "append_tokens": []}, grpc.StatusCode.INVALID_ARGUMENT, "append_tokens"),
    ({"session_id": "s", "append_tokens": [VOCAB]}, grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
    ({"session_id": "s", "append_tokens": [1], "draft_token_ids": [VOCAB + 1]}, grpc.StatusCode.INVALID_ARGUMENT,
     "vocabulary"),
    ({"session_id": "s", "append_tokens": [1] * (CONTEXT + 1)}, grpc.StatusCode.OUT_OF_RANGE, "context"),
    ({"session_id": "s", "append_tokens": [1], "sampling": common_pb2.SamplingParams(temperature=-1)},
     grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
])
def test_verify_service_rejects_bad_calls_clearly(stacks, request_fields, code, fragment):
    stub = _verify_stub(stacks("different"))
    with pytest.raises(grpc.RpcError) as raised:
        stub.Verify(verify_pb2.VerifyRequest(**request_fields), timeout=10)
    assert raised.value.code() == code and fragment in raised.value.details()
    ok = stub.Verify(verify_pb2.VerifyRequest(session_id="ok", append_tokens=[1, 2], draft_token_ids=[3]), timeout=10)
    assert len(ok.argmax_token_ids) == 2 and ok.cached_len == 3


@pytest.mark.parametrize("request_fields,code,fragment", [
    ({"session_id": "unknown", "prefix_len": 3, "append_tokens": [1], "num_draft_tokens": 2},
     grpc.StatusCode.FAILED_PRECONDITION, "not held"),
    ({"session_id": "s", "append_tokens": [1], "num_draft_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT,
     "num_draft_tokens"),
    ({"session_id": "s", "append_tokens": [1], "num_draft_tokens": 99}, grpc.StatusCode.INVALID_ARGUMENT,
     "num_draft_tokens"),
    ({"session_id": "s", "append_tokens": [1], "num_draft_tokens": 2, "vocab_limit": -1},
     grpc.StatusCode.INVALID_ARGUMENT, "vocab_limit must be >= 0"),
])
def test_draft_service_rejects_bad_calls_clearly(stacks, request_fields, code, fragment):
    stub = _draft_stub(stacks("different"))
    with pytest.raises(grpc.RpcError) as raised:
        stub.Propose(draft_pb2.ProposeRequest(**request_fields), timeout=10)
    assert raised.value.code() == code and fragment in raised.value.details()
    ok = stub.Propose(draft_pb2.ProposeRequest(session_id="ok", append_tokens=[1, 2], num_draft_tokens=3), timeout=10)
    assert len(ok.token_ids) == 3 and ok.cached_len == 4


def test_a_retried_call_is_harmless(stacks):
    """The same Verify twice (a client retry) answers the same: the cache is cropped to prefix_len."""
    stub = _verify_stub(stacks("different"))
    first = stub.Verify(verify_pb2.VerifyRequest(session_id="retry", append_tokens=[5, 6, 7]), timeout=10)
    request = verify_pb2.VerifyRequest(session_id="retry", prefix_len=3, append_tokens=[9], draft_token_ids=[4, 4],
                                       prefix_fingerprint=fingerprint([5, 6, 7]))
    a = stub.Verify(request, timeout=10)
    b = stub.Verify(request, timeout=10)
    assert a.argmax_token_ids == b.argmax_token_ids and a.cached_len == b.cached_len == 6
    assert first.cached_len == 3
    # the pass's size as the load policy reads it: one session, its 1 new token and 2 drafts
    assert (a.timing.batch_size, a.timing.batch_tokens, first.timing.batch_tokens) == (1, 3, 3)
    released = stub.ReleaseSession(common_pb2.ReleaseSessionRequest(session_id="retry"), timeout=10)
    assert released.released
    assert not stub.ReleaseSession(common_pb2.ReleaseSessionRequest(session_id="retry"), timeout=10).released
