"""Calls to the draft and verify services for one session, with the bookkeeping the loop needs.

Each client is bound to one replica of its role for the generation's life (orchestrator/replicas.py
chooses it at the first call), remembers how many committed tokens that replica's cache is known to hold
(`synced_len`), sends only the tokens after that with the fingerprint of the prefix it assumes (so a cache
that anyone else changed is a miss, not a wrong token), and when the service answers session-lost
(evicted, restarted) re-sends the whole committed prefix once. When its replica goes away or drains
(UNAVAILABLE) and another can take the session, it rebinds there and re-sends the prefix: `_call` is the
one place sessions move. Every call records client-observed time, server-reported time and bytes on the
wire, and passes the load the replica reported on to the set.

gRPC statuses are read here and nowhere else in the orchestrator: a failed call leaves as one of the
exception types below, which say what the loop may do about it. Replies leave as tensors (Proposal,
Scored), so the loop never touches a message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc
import torch

from orchestrator.replicas import Replica, ReplicaSet
from service_common.errors import DRAINING, ERROR_KIND_KEY, SESSION_LOST
from service_common.session_fingerprint import PrefixChain
from specdec_api import common_pb2, draft_pb2, verify_pb2
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
    generation, so the client gets the verify's status (`code`, `details`, passed on as they are)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


_DRAFT_OUTAGE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL}


def _error_kind(error: grpc.RpcError) -> str:
    return next((v for k, v in (error.trailing_metadata() or ()) if k == ERROR_KIND_KEY), "")


def is_session_lost(error: grpc.RpcError) -> bool:
    return error.code() == grpc.StatusCode.FAILED_PRECONDITION and _error_kind(error) == SESSION_LOST


def is_draining(error: grpc.RpcError) -> bool:
    return error.code() == grpc.StatusCode.UNAVAILABLE and _error_kind(error) == DRAINING


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
    drafter: str = ""  # the kind of drafter that made it ("model", "ngram", ...: ProposeResponse.drafter)


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

    def __init__(self, replicas: ReplicaSet, session_id: str, timeout_s: float, sampling: Sampling = Sampling()):
        self.replicas = replicas
        self.replica: Replica | None = None  # bound at the first call
        self.session_id = session_id
        self.timeout_s = timeout_s
        self.sampling = sampling
        self.sampling_message = common_pb2.SamplingParams(
            temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
        self.synced_len = 0
        self.reprefills = 0
        self.rebinds = 0  # times the session moved to another replica (counted in reprefills too)
        self.calls: list[CallRecord] = []
        self.chain = PrefixChain()  # fingerprints of the prefixes it sends

    def _failure(self, code: grpc.StatusCode, details: str) -> Exception:
        """The exception a call that failed for good leaves as: what the loop may do about it."""
        raise NotImplementedError

    def _bound(self, exclude: set[str]) -> Replica | None:
        if self.replica is None:
            self.replica = self.replicas.bind(self.session_id, exclude)
        return self.replica

    def _unbind(self) -> None:
        if self.replica is not None:
            self.replicas.unbind(self.replica)
            self.replica = None

    def _move(self) -> None:
        """The session leaves its replica: the next call binds one (another, if any can take it) and
        sends the whole prefix."""
        self._unbind()
        if self.synced_len > 0:  # it held some of the session: the next replica is sent all of it
            self.reprefills += 1
            self.rebinds += 1
        self.synced_len = 0
        self.chain.reset()

    def _call(self, method_name: str, path: str, build, committed: list[int], steps: int = 1):
        """build(prefix_len, append_tokens, prefix_fingerprint) -> request. Returns (response, CallRecord).
        `steps`: model steps the call takes after feeding what it appends (the replica's speed is measured
        per step).

        `path` names the method for its CLIENT span (the channel is a plain one; see start_client_call)."""
        deadline = time.monotonic() + self.timeout_s
        exhausted_until = time.monotonic() + self.retry_exhausted_s
        reprefilled = False
        backoff = 0.05
        given_up: set[str] = set()  # replicas this call left: it does not come back to them
        while True:
            replica = self._bound(given_up)
            if replica is None:  # no replica can take the session: wait for one, or give up
                if self.retry_unavailable and time.monotonic() + backoff < deadline:
                    time.sleep(backoff)
                    backoff = min(1.0, backoff * 2)
                    given_up.clear()
                    continue
                raise self._failure(grpc.StatusCode.UNAVAILABLE, f"no {self.replicas.role} replica can take the "
                                    f"session ({self._replica_states()})")
            prefix = self.synced_len
            request = build(prefix, committed[prefix:], self.chain.at(committed, prefix) if prefix else b"")
            span, trace_metadata = start_client_call(path)
            started = time.perf_counter()
            try:
                # With other replicas to move to, a call to one that is down fails at once instead of
                # waiting for it to come back.
                wait = self.wait_for_ready and self.replicas.lone()
                response = getattr(replica.stub, method_name)(
                    request, timeout=max(0.01, deadline - time.monotonic()), wait_for_ready=wait,
                    metadata=trace_metadata)
            except grpc.RpcError as error:
                end_client_call(span, error)
                if not reprefilled and prefix > 0 and is_session_lost(error):
                    reprefilled = True
                    self.reprefills += 1
                    self.synced_len = 0
                    self.chain.reset()  # in case its own hashes were the stale part (PrefixChain's window)
                    continue
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    # Gone (down, restarting, unreachable) or draining: no new session goes there, and
                    # this one moves if another replica can take it. With several replicas but none
                    # answering just now, the next try binds afresh (whichever answers first by then).
                    self.replicas.failed(replica, draining=is_draining(error))
                    if self.replicas.others_take_sessions(replica):
                        given_up.add(replica.address)
                        self._move()
                        continue
                    if not self.replicas.lone():
                        self._move()
                retryable = ((self.retry_unavailable and error.code() == grpc.StatusCode.UNAVAILABLE)
                             or (error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                                 and time.monotonic() + backoff < exhausted_until))
                if retryable and time.monotonic() + backoff < deadline:
                    # A restarting service (a fresh one will answer session-lost), or one at its limits: wait, retry.
                    time.sleep(backoff)
                    backoff = min(1.0, backoff * 2)
                    continue
                raise self._failure(error.code(), error.details()) from error
            observed = (time.perf_counter() - started) * 1000
            end_client_call(span)
            t = response.timing
            self.replicas.observe(replica, t.load, t.compute_us / 1000, len(committed) - prefix, steps,
                                  max(1, t.batch_size))
            call = CallRecord(observed, t.total_us / 1000, t.compute_us / 1000, t.queue_us / 1000,
                              request.ByteSize() + response.ByteSize(), max(1, t.batch_size), t.batch_tokens,
                              t.prefill_lane)
            self.calls.append(call)
            return response, call

    def _replica_states(self) -> str:
        states = self.replicas.snapshot()
        if not states:
            return "none is known"
        return ", ".join(f"{address}: {'up' if up else 'down or draining'}" for address, _bound, up in states)

    def _probs(self, message: common_pb2.ProbMatrix) -> torch.Tensor | None:
        """Greedy rounds compare token ids only; the rows are sent, and read, only when sampling."""
        return None if self.sampling.greedy else probs_from_message(message)

    def advance(self, base: int, cached_len: int, accepted: int) -> None:
        """After a call: the cache is valid through `base` tokens plus the first `accepted` tokens it was fed
        past them, as far as it holds any (`cached_len`)."""
        self.synced_len = base + max(0, min(accepted, cached_len - base))

    def release(self, timeout_s: float = 2.0) -> None:
        """Best effort: a service that is down has already lost the session. Unbinds it from its replica."""
        replica = self.replica
        if replica is None:
            return
        span, trace_metadata = start_client_call(self.release_path)
        try:
            replica.stub.ReleaseSession(common_pb2.ReleaseSessionRequest(session_id=self.session_id),
                                        timeout=timeout_s, metadata=trace_metadata)
        except grpc.RpcError as error:
            end_client_call(span, error)
        else:
            end_client_call(span)
        finally:
            self._unbind()

    @property
    def replica_address(self) -> str:
        return self.replica.address if self.replica is not None else ""


class DraftSession(SessionClient):
    # A draft that is down must not stall the round: fail fast and let the loop go target-only.
    wait_for_ready = False
    release_path = method_path(draft_pb2.DESCRIPTOR, "DraftService", "ReleaseSession")

    def __init__(self, replicas: ReplicaSet, session_id: str, timeout_s: float,
                 sampling: Sampling = Sampling(), min_confidence: float = 0.0, vocab_limit: int = 0):
        super().__init__(replicas, session_id, timeout_s, sampling)
        self.min_confidence = min_confidence
        self.vocab_limit = vocab_limit  # the target's logits count when the draft has more (ProposeRequest.vocab_limit)

    def _failure(self, code: grpc.StatusCode, details: str) -> DraftFailed:
        failure = DraftOutage if code in _DRAFT_OUTAGE_CODES else DraftRefused
        return failure(f"{code.name}: {details}")

    def propose(self, committed: list[int], gamma: int, seed: int) -> Proposal:
        """Up to gamma tokens after `committed`; raises DraftOutage or DraftRefused."""
        def build(prefix, append, fingerprint):
            return draft_pb2.ProposeRequest(session_id=self.session_id, prefix_len=prefix, append_tokens=append,
                                            num_draft_tokens=gamma, sampling=self.sampling_message, seed=seed,
                                            min_confidence=self.min_confidence, vocab_limit=self.vocab_limit,
                                            prefix_fingerprint=fingerprint)
        response, call = self._call("Propose", PROPOSE, build, committed, steps=gamma)
        return Proposal(list(response.token_ids), self._probs(response.draft_probs), len(committed),
                        response.cached_len, call, response.drafter)


class VerifySession(SessionClient):
    retry_unavailable = True  # without the target there is no generation; the draft falls back instead
    # A verify service refuses a caller's calls beyond its per-caller limits (--max-calls-per-caller,
    # --max-queue-per-caller), and one orchestrator is one caller: its generations past those limits wait
    # for a free slot (calls end every few ms) instead of failing; a lasting refusal still reaches the client.
    retry_exhausted_s = 5.0
    release_path = method_path(verify_pb2.DESCRIPTOR, "VerifyService", "ReleaseSession")

    def _failure(self, code: grpc.StatusCode, details: str) -> VerifyFailed:
        return VerifyFailed(code, details)

    def verify(self, committed: list[int], draft_token_ids: list[int]) -> Scored:
        """The target's verdict on the drafts after `committed`; raises VerifyFailed."""
        def build(prefix, append, fingerprint):
            return verify_pb2.VerifyRequest(session_id=self.session_id, prefix_len=prefix, append_tokens=append,
                                            draft_token_ids=draft_token_ids, sampling=self.sampling_message,
                                            prefix_fingerprint=fingerprint)
        response, call = self._call("Verify", VERIFY, build, committed)
        return Scored(list(response.argmax_token_ids), self._probs(response.target_probs), len(committed),
                      response.cached_len, call)
