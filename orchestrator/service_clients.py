"""Calls to the draft and verify services for one session, with the bookkeeping the loop needs.

Each client remembers how many committed tokens its service's cache is known to hold (`synced_len`),
sends only the tokens after that with the fingerprint of the prefix it assumes (so a cache that anyone
else changed is a miss, not a wrong token), and when the service answers session-lost (evicted, restarted,
another replica) re-sends the whole committed prefix once. Every call records client-observed time,
server-reported time and bytes on the wire.

gRPC statuses are read here and nowhere else in the orchestrator: a failed call leaves as one of the
exception types below, which say what the loop may do about it. Replies leave as tensors (Proposal,
Scored), so the loop never touches a message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
import torch

from service_common.errors import ERROR_KIND_KEY, SESSION_LOST
from service_common.session_fingerprint import PrefixChain
from specdec_api import common_pb2, draft_pb2, draft_pb2_grpc, verify_pb2
from specdec_api.method_paths import PROPOSE, VERIFY, method_path
from speculation.sampling import Sampling
from speculation.wire import decode_probs
from telemetry.client_spans import end_client_call, start_client_call


class DraftFailed(Exception):
    """The draft service did not propose. Never a failed request: the target alone is exact."""


class DraftOutage(DraftFailed):
    """A failure that may pass (the draft is down, overloaded, timed out, or crashed mid-call)."""


class DraftRefused(DraftFailed):
    """The draft will not continue this generation (its context is shorter than the target's, it cannot
    read a token): asking again would be refused again."""


class VerifyFailed(Exception):
    """The verify service failed this generation, after the retries below: without the target there is no
    generation, so the client gets the verify's status (`error`, passed on as it is)."""

    def __init__(self, error: grpc.RpcError):
        super().__init__(f"{error.code().name}: {error.details()}")
        self.error = error


_DRAFT_OUTAGE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL}


def is_session_lost(error: grpc.RpcError) -> bool:
    if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
        return False
    return any(k == ERROR_KIND_KEY and v == SESSION_LOST for k, v in (error.trailing_metadata() or ()))


def probs_from_message(m: common_pb2.ProbMatrix) -> torch.Tensor:
    """ProbMatrix message -> [rows, vocab] probabilities (the inverse of the services' encode_to_message)."""
    return decode_probs(m.rows, m.cols, m.dense, m.row_offsets, m.col_indices, m.values)


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
class Proposal:
    """What the draft proposed after `base` tokens (fewer than asked when it stopped on low confidence)."""
    token_ids: list[int]
    draft_probs: torch.Tensor | None  # [len(token_ids), draft_vocab] when sampling, else None
    base: int  # tokens it was sent: the cache held these before the proposal
    cached_len: int  # tokens its cache holds now: base and all proposed tokens but the last
    call: CallRecord


@dataclass
class Scored:
    """The target's verdict on gamma draft tokens after `base` committed tokens."""
    argmax_token_ids: list[int]  # [gamma + 1]
    target_probs: torch.Tensor | None  # [gamma + 1, target_vocab] when sampling, else None
    base: int  # committed tokens it was sent
    cached_len: int  # tokens its cache holds now
    call: CallRecord


class SessionClient:
    retry_unavailable = False
    retry_exhausted_s = 0.0  # retry RESOURCE_EXHAUSTED (a full queue, no free slot) for this long
    wait_for_ready = True
    release_path = ""

    def __init__(self, stub, session_id: str, timeout_s: float, sampling: Sampling = Sampling()):
        self.stub = stub
        self.session_id = session_id
        self.timeout_s = timeout_s
        self.sampling = sampling
        self.sampling_message = common_pb2.SamplingParams(
            temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        self.synced_len = 0
        self.reprefills = 0
        self.calls: list[CallRecord] = []
        self.chain = PrefixChain()  # fingerprints of the prefixes it sends

    def _failure(self, error: grpc.RpcError) -> Exception:
        """The exception a call that failed for good leaves as: what the loop may do about it."""
        raise NotImplementedError

    def _call(self, method, path: str, build, committed: list[int]):
        """build(prefix_len, append_tokens, prefix_fingerprint) -> request. Returns (response, CallRecord).

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
                                  metadata=trace_metadata)
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
                raise self._failure(error) from error
            observed = (time.perf_counter() - started) * 1000
            end_client_call(span)
            t = response.timing
            call = CallRecord(observed, t.total_us / 1000, t.compute_us / 1000, t.queue_us / 1000,
                              request.ByteSize() + response.ByteSize(), max(1, t.batch_size), t.batch_tokens,
                              t.prefill_lane)
            self.calls.append(call)
            return response, call

    def _probs(self, message: common_pb2.ProbMatrix) -> torch.Tensor | None:
        """Greedy rounds compare token ids only; the rows are sent, and read, only when sampling."""
        return None if self.sampling.greedy else probs_from_message(message)

    def advance(self, base: int, cached_len: int, accepted: int) -> None:
        """After a call: the cache is valid through `base` tokens plus the first `accepted` tokens it was fed
        past them, as far as it holds any (`cached_len`)."""
        self.synced_len = base + max(0, min(accepted, cached_len - base))

    def release(self, timeout_s: float = 2.0) -> None:
        """Best effort: a service that is down has already lost the session."""
        span, trace_metadata = start_client_call(self.release_path)
        try:
            self.stub.ReleaseSession(common_pb2.ReleaseSessionRequest(session_id=self.session_id), timeout=timeout_s,
                                     metadata=trace_metadata)
        except grpc.RpcError as error:
            end_client_call(span, error)
        else:
            end_client_call(span)


class DraftSession(SessionClient):
    # A draft that is down must not stall the round: fail fast and let the loop go target-only.
    wait_for_ready = False
    release_path = method_path(draft_pb2.DESCRIPTOR, "DraftService", "ReleaseSession")

    def __init__(self, stub: draft_pb2_grpc.DraftServiceStub, session_id: str, timeout_s: float,
                 sampling: Sampling = Sampling(), min_confidence: float = 0.0, vocab_limit: int = 0):
        super().__init__(stub, session_id, timeout_s, sampling)
        self.min_confidence = min_confidence
        self.vocab_limit = vocab_limit  # the target's logits count when the draft has more (ProposeRequest.vocab_limit)

    def _failure(self, error: grpc.RpcError) -> DraftFailed:
        failure = DraftOutage if error.code() in _DRAFT_OUTAGE_CODES else DraftRefused
        return failure(f"{error.code().name}: {error.details()}")

    def propose(self, committed: list[int], gamma: int, seed: int) -> Proposal:
        """Up to gamma tokens after `committed`; raises DraftOutage or DraftRefused."""
        def build(prefix, append, fingerprint):
            return draft_pb2.ProposeRequest(session_id=self.session_id, prefix_len=prefix, append_tokens=append,
                                            num_draft_tokens=gamma, sampling=self.sampling_message, seed=seed,
                                            min_confidence=self.min_confidence, vocab_limit=self.vocab_limit,
                                            prefix_fingerprint=fingerprint)
        response, call = self._call(self.stub.Propose, PROPOSE, build, committed)
        return Proposal(list(response.token_ids), self._probs(response.draft_probs), len(committed),
                        response.cached_len, call)


class VerifySession(SessionClient):
    retry_unavailable = True  # without the target there is no generation; the draft falls back instead
    # A verify service refuses a caller's calls beyond its per-caller limits (--max-calls-per-caller,
    # --max-queue-per-caller), and one orchestrator is one caller: its generations past those limits wait
    # for a free slot (calls end every few ms) instead of failing; a lasting refusal still reaches the client.
    retry_exhausted_s = 5.0
    release_path = method_path(verify_pb2.DESCRIPTOR, "VerifyService", "ReleaseSession")

    def _failure(self, error: grpc.RpcError) -> VerifyFailed:
        return VerifyFailed(error)

    def verify(self, committed: list[int], draft_token_ids: list[int]) -> Scored:
        """The target's verdict on the drafts after `committed`; raises VerifyFailed."""
        def build(prefix, append, fingerprint):
            return verify_pb2.VerifyRequest(session_id=self.session_id, prefix_len=prefix, append_tokens=append,
                                            draft_token_ids=draft_token_ids, sampling=self.sampling_message,
                                            prefix_fingerprint=fingerprint)
        response, call = self._call(self.stub.Verify, VERIFY, build, committed)
        return Scored(list(response.argmax_token_ids), self._probs(response.target_probs), len(committed),
                      response.cached_len, call)
