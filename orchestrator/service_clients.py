"""Calls to the draft and verify services for one session, with the bookkeeping the loop needs.

Each client remembers how many committed tokens its service's cache is known to hold (`synced_len`),
sends only the tokens after that with the fingerprint of the prefix it assumes (so a cache that anyone
else changed is a miss, not a wrong token), and when the service answers session-lost (evicted, restarted,
another replica) re-sends the whole committed prefix once. Every call records client-observed time,
server-reported time and bytes on the wire.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc

from service_common.errors import ERROR_KIND_KEY, SESSION_LOST
from service_common.session_fingerprint import PrefixChain
from specdec_api import common_pb2, draft_pb2, draft_pb2_grpc, verify_pb2, verify_pb2_grpc
from telemetry.grpc_client import end_client_call, start_client_call


_DRAFT = f"/{draft_pb2.DESCRIPTOR.services_by_name['DraftService'].full_name}/"
_VERIFY = f"/{verify_pb2.DESCRIPTOR.services_by_name['VerifyService'].full_name}/"
PROPOSE, VERIFY = _DRAFT + "Propose", _VERIFY + "Verify"


def is_session_lost(error: grpc.RpcError) -> bool:
    if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
        return False
    return any(k == ERROR_KIND_KEY and v == SESSION_LOST for k, v in (error.trailing_metadata() or ()))


@dataclass
class CallRecord:
    observed_ms: float
    server_total_ms: float
    compute_ms: float
    queue_ms: float
    bytes: int
    batch_size: int = 1
    batch_tokens: int = 0  # tokens in the server's shared pass (0: not reported)
    prefill_lane: bool = False  # served beside the batched passes (its compute is no pass's cost)

    @property
    def network_ms(self) -> float:
        return max(0.0, self.observed_ms - self.server_total_ms)


@dataclass
class SessionClient:
    session_id: str
    timeout_s: float
    synced_len: int = 0
    reprefills: int = 0
    calls: list[CallRecord] = field(default_factory=list)
    chain: PrefixChain = field(default_factory=PrefixChain)  # fingerprints of the prefixes it sends

    retry_unavailable = False
    retry_exhausted_s = 0.0  # retry RESOURCE_EXHAUSTED (a full queue, no free slot) for this long
    wait_for_ready = True

    def _call(self, method, path: str, build, committed: list[int], metadata):
        """build(prefix_len, append_tokens, prefix_fingerprint) -> request. Returns (response, prefix_len, len(append)).

        `path` names the method for its CLIENT span (the channel is a plain one; see start_client_call)."""
        deadline = time.monotonic() + self.timeout_s
        exhausted_until = time.monotonic() + self.retry_exhausted_s
        reprefilled = False
        backoff = 0.05
        while True:
            prefix = self.synced_len
            request = build(prefix, committed[prefix:], self.chain.at(committed, prefix) if prefix else b"")
            span, trace_metadata = start_client_call(path)
            started = time.perf_counter()
            try:
                response = method(request, timeout=max(0.01, deadline - time.monotonic()), wait_for_ready=self.wait_for_ready,
                                  metadata=(*metadata, *trace_metadata))
            except grpc.RpcError as error:
                end_client_call(span, error)
                if not reprefilled and prefix > 0 and is_session_lost(error):
                    reprefilled = True
                    self.reprefills += 1
                    self.synced_len = 0
                    self.chain.reset()  # in case its own hashes were the stale part (PrefixChain's window)
                    continue
                retryable = ((self.retry_unavailable and error.code() == grpc.StatusCode.UNAVAILABLE)
                             or (error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                                 and time.monotonic() + backoff < exhausted_until))
                if retryable and time.monotonic() + backoff < deadline:
                    # A restarting service (a fresh one will answer session-lost), or one at its limits: wait, retry.
                    time.sleep(backoff)
                    backoff = min(1.0, backoff * 2)
                    continue
                raise
            observed = (time.perf_counter() - started) * 1000
            end_client_call(span)
            t = response.timing
            self.calls.append(CallRecord(observed, t.total_us / 1000, t.compute_us / 1000, t.queue_us / 1000,
                                         request.ByteSize() + response.ByteSize(), max(1, t.batch_size),
                                         t.batch_tokens, t.prefill_lane))
            return response, prefix, len(committed) - prefix

    def advance(self, base: int, cached_len: int, accepted: int) -> None:
        """After a round: the cache is valid through `base` committed tokens plus the accepted drafts it fed."""
        self.synced_len = base + max(0, min(accepted, cached_len - base))


class DraftSession(SessionClient):
    # A draft that is down must not stall the round: fail fast and let the loop go target-only.
    wait_for_ready = False

    def __init__(self, stub: draft_pb2_grpc.DraftServiceStub, session_id: str, timeout_s: float):
        super().__init__(session_id, timeout_s)
        self.stub = stub

    min_confidence = 0.0
    vocab_limit = 0  # the target's logits count when the draft has more (ProposeRequest.vocab_limit)

    def propose(self, committed, gamma, sampling: common_pb2.SamplingParams, seed: int, metadata=()):
        def build(prefix, append, fingerprint):
            return draft_pb2.ProposeRequest(session_id=self.session_id, prefix_len=prefix, append_tokens=append,
                                            num_draft_tokens=gamma, sampling=sampling, seed=seed,
                                            min_confidence=self.min_confidence, vocab_limit=self.vocab_limit,
                                            prefix_fingerprint=fingerprint)
        response, prefix, appended = self._call(self.stub.Propose, PROPOSE, build, committed, metadata)
        return response, prefix + appended


class VerifySession(SessionClient):
    retry_unavailable = True  # without the target there is no generation; the draft falls back instead
    # A verify service refuses a caller's calls beyond its per-caller limits (--max-calls-per-caller,
    # --max-queue-per-caller), and one orchestrator is one caller: its generations past those limits wait
    # for a free slot (calls end every few ms) instead of failing; a lasting refusal still reaches the client.
    retry_exhausted_s = 5.0

    def __init__(self, stub: verify_pb2_grpc.VerifyServiceStub, session_id: str, timeout_s: float):
        super().__init__(session_id, timeout_s)
        self.stub = stub

    def verify(self, committed, draft_token_ids, sampling: common_pb2.SamplingParams, metadata=()):
        def build(prefix, append, fingerprint):
            return verify_pb2.VerifyRequest(session_id=self.session_id, prefix_len=prefix, append_tokens=append,
                                            draft_token_ids=draft_token_ids, sampling=sampling,
                                            prefix_fingerprint=fingerprint)
        response, prefix, appended = self._call(self.stub.Verify, VERIFY, build, committed, metadata)
        return response, prefix + appended


def release(stub, session_id: str, timeout_s: float = 2.0) -> None:
    """Best effort: a service that is down has already lost the session."""
    service = _DRAFT if isinstance(stub, draft_pb2_grpc.DraftServiceStub) else _VERIFY
    span, trace_metadata = start_client_call(service + "ReleaseSession")
    try:
        stub.ReleaseSession(common_pb2.ReleaseSessionRequest(session_id=session_id), timeout=timeout_s,
                            metadata=trace_metadata)
    except grpc.RpcError as error:
        end_client_call(span, error)
    else:
        end_client_call(span)
