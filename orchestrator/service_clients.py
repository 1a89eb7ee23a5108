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

from orchestrator.replicas import PREFILL_TOKENS, Replica, ReplicaSet
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


# What a replica's status says of it: gone (down, draining, stopping), broken (its model failed), and every status
# on which a session moves to another replica; a draft call failing with one of those, or timing out, is an outage.
_GONE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
_BROKEN_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
_REPLICA_FAULT_CODES = _GONE_CODES | _BROKEN_CODES | {grpc.StatusCode.RESOURCE_EXHAUSTED}
_DRAFT_OUTAGE_CODES = _REPLICA_FAULT_CODES | {grpc.StatusCode.DEADLINE_EXCEEDED}
# With another replica to move to, one attempt of a call gets this share of the time left.
ATTEMPT_SHARE = 0.5


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
    one_model = False  # every call of a generation must reach the same model (the target: its tokens are final)
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
        self.epoch: int | None = None  # the role's reference at the first answer (one_model)
        self.calls: list[CallRecord] = []
        self.chain = PrefixChain()  # fingerprints of the prefixes it sends

    def _failure(self, code: grpc.StatusCode, details: str) -> Exception:
        """The exception a call that failed for good leaves as: what the loop may do about it."""
        raise NotImplementedError

    def _bound(self, exclude: set[str]) -> Replica | None:
        if self.one_model and self.epoch is not None and self.epoch != self.replicas.epoch:
            # The role followed a rolling update to new weights since this generation began: going on
            # would mix two models' tokens in one generation.
            raise self._failure(grpc.StatusCode.UNAVAILABLE, f"the {self.replicas.role} replicas moved to new "
                                "weights during this generation; retry it (it will run on the new model)")
        if self.replica is not None and self.replica.refused:
            # Found hosting something else since (a restart with other weights): nothing more from it.
            exclude.add(self.replica.address)
            self._move()
        if self.replica is None:
            self.replica = self.replicas.bind(self.session_id, exclude)
        return self.replica

    def _unbind(self) -> None:
        if self.replica is not None:
            self.replicas.unbind(self.replica)
            self.replica = None

    def _move(self) -> None:
        """The session leaves its replica: the next call binds one (another, if any can take it) and
        sends the whole prefix. The replica it leaves is asked to release the session's cache (it may
        still be up: a refusal, a timeout), in the background, best effort."""
        if self.replica is not None and self.synced_len > 0:
            self.replicas.release_elsewhere(self.replica, self.session_id)
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

        `path` names the method for its CLIENT span (the channel is a plain one; see start_client_call).

        What a failure makes the session do, while another replica of the role takes sessions: UNAVAILABLE
        (gone, unreachable, draining) and CANCELLED (a stopping server cuts calls so) move it; so do
        INTERNAL / UNKNOWN (a failed device) and RESOURCE_EXHAUSTED (that replica is full, another may not
        be), and an attempt that used up its share of the deadline (a hung replica: with somewhere to move
        to, one attempt gets half of what is left). A move re-sends the whole prefix. A reply from a
        replica process the set has not checked (it restarted) is used only once the set has seen what the
        new process hosts. Without another replica, the verify call retries the same one until its
        deadline (it may be restarting) and the draft call fails (the round goes target-only)."""
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
            remaining = deadline - time.monotonic()
            elsewhere = self.replicas.others_take_sessions(replica, given_up)
            # With somewhere to move to, an attempt gets half of what is left (a hung replica is left in
            # time). Only a lone replica is waited for when down (it may be restarting); one of several
            # fails at once, and so does a lone one named by a resolved name (it may come back at a new
            # address, which the refresher finds).
            attempt = remaining * ATTEMPT_SHARE if elsewhere else remaining
            wait = self.wait_for_ready and not self.replicas.targets.resolved and self.replicas.lone()
            span, trace_metadata = start_client_call(path)
            started = time.perf_counter()
            try:
                response = getattr(replica.stub, method_name)(
                    request, timeout=max(0.01, attempt), wait_for_ready=wait, metadata=trace_metadata)
            except grpc.RpcError as error:
                end_client_call(span, error)
                code = error.code()
                if not reprefilled and prefix > 0 and is_session_lost(error):
                    reprefilled = True
                    self.reprefills += 1
                    self.synced_len = 0
                    self.chain.reset()  # in case its own hashes were the stale part (PrefixChain's window)
                    continue
                timed_out = code == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() < deadline - 0.01
                gone = code in _GONE_CODES
                broken = timed_out or code in _BROKEN_CODES
                if gone or broken:
                    # No new session goes there until a probe finds it back (a hung or failing one: for a
                    # while even then, since its probe may answer while its model does not).
                    self.replicas.failed(replica, draining=is_draining(error), hold=broken)
                if (timed_out or code in _REPLICA_FAULT_CODES) and \
                        self.replicas.others_take_sessions(replica, given_up):
                    given_up.add(replica.address)
                    self._move()
                    continue
                # Every other replica was tried in this call (or none takes sessions): those left earlier
                # may be back by now, so the next try may bind any of them again.
                given_up.clear()
                if gone and (self.replicas.targets.resolved or not self.replicas.lone()):
                    self._move()  # the next try binds afresh: whichever replica answers by then
                retryable = ((self.retry_unavailable and (gone or timed_out))
                             or (code == grpc.StatusCode.RESOURCE_EXHAUSTED
                                 and time.monotonic() + backoff < exhausted_until))
                if retryable and time.monotonic() + backoff < deadline:
                    # A restarting service (a fresh one will answer session-lost), or one at its limits: wait, retry.
                    time.sleep(backoff)
                    backoff = min(1.0, backoff * 2)
                    continue
                raise self._failure(code, error.details()) from error
            observed = (time.perf_counter() - started) * 1000
            end_client_call(span)
            t = response.timing
            if not self.replicas.trusts(replica, t.load.instance):
                # A process the set has not checked answered (the replica restarted, maybe with other
                # weights): its reply is not used; the set checks it, and the session starts afresh.
                if replica.refused:
                    given_up.add(replica.address)
                self._move()
                continue
            self.replicas.observe(replica, t.load, t.compute_us / 1000, steps, max(1, t.batch_size),
                                  decode=prefix > 0 and len(committed) - prefix <= PREFILL_TOKENS)
            if self.epoch is None:
                self.epoch = self.replicas.epoch
            call = CallRecord(observed, t.total_us / 1000, t.compute_us / 1000, t.queue_us / 1000,
                              request.ByteSize() + response.ByteSize(), max(1, t.batch_size), t.batch_tokens,
                              t.prefill_lane)
            self.calls.append(call)
            return response, call

    def _replica_states(self) -> str:
        states = self.replicas.describe()
        return "; ".join(states) if states else "none is known"

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
    one_model = True
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
