"""One generation: the draft -> verify -> accept loop, yielding committed tokens round by round.

Knows the services only through DraftSession / VerifySession; the acceptance maths is in
speculation/. Steps of a round are numbered as in the comments below.
"""

from __future__ import annotations

import contextvars
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import grpc
import torch

from orchestrator.service_clients import DraftSession, VerifySession
from orchestrator.text_stream import TextStream
from service_common.session_fingerprint import session_tag
from specdec_api import common_pb2, orchestrator_pb2
from speculation.rejection import RoundOutcome, greedy_accept, rejection_sample
from speculation.sampling import Sampling, seeded_generator
from speculation.wire import decode_probs
from telemetry.metrics import record_round
from telemetry.tracing import get_tracer

log = logging.getLogger(__name__)

# Draft failures that may pass (an outage, a full queue): target-only for a few rounds, then try again.
# Any other draft failure (the draft's context is shorter than the target's, it refuses a token) turns
# speculation off for the rest of that generation. Never a failed request: the target alone is exact.
DRAFT_OUTAGE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                      grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL}
DRAFT_RETRY_AFTER_ROUNDS = 8


@dataclass
class GenerationSpec:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    seed: int
    gamma: int  # fixed gamma, or the starting gamma of an adaptive policy
    stop: list[str]
    eos_token_ids: set[int]
    max_context: int
    adaptive: bool = False
    max_gamma: int = 16
    draft_vocab_size: int = 0  # logits per token of each model; they differ only by padding rows
    target_vocab_size: int = 0  # (orchestrator/deployment.py: check_pair)


def probs_from_message(m) -> torch.Tensor:
    """ProbMatrix message -> [rows, vocab] probabilities (the inverse of the services' encode_to_message)."""
    return decode_probs(m.rows, m.cols, m.dense, m.row_offsets, m.col_indices, m.values)


def over_target_ids(draft_probs: torch.Tensor, target_vocab: int) -> torch.Tensor:
    """Draft rows [n, draft_vocab] as rows over the target's ids [n, target_vocab]. A larger draft samples
    under vocab_limit, so its rows are already the target's width; a smaller one gives zero probability
    to the target's extra (padding) ids. Wider rows are cut only if their mass there is zero."""
    width = draft_probs.shape[1]
    if width > target_vocab:
        if draft_probs[:, target_vocab:].sum() > 0:
            raise ValueError(f"draft rows put mass on ids past the target's {target_vocab}; "
                             "the draft must propose under vocab_limit")
        return draft_probs[:, :target_vocab]
    if width < target_vocab:
        return torch.nn.functional.pad(draft_probs, (0, target_vocab - width))
    return draft_probs


@dataclass
class _RoundDraft:
    """A round's draft time, split into what was on the critical path and what verify hid."""
    critical_ms: float = 0.0
    hidden_ms: float = 0.0
    compute_ms: float = 0.0
    network_ms: float = 0.0
    queue_ms: float = 0.0
    server_ms: float = 0.0
    bytes: int = 0
    overlapped: bool = False
    critical_compute_ms: float = 0.0
    step_ms: float = 0.0

    def _add_call(self, call) -> None:
        self.compute_ms += call.compute_ms
        self.network_ms += call.network_ms
        self.queue_ms += call.queue_ms
        self.server_ms += call.server_total_ms
        self.bytes += call.bytes

    def add_critical(self, call, tokens: int) -> None:
        self._add_call(call)
        self.critical_ms += call.observed_ms
        self.critical_compute_ms += call.compute_ms
        self.step_ms = call.compute_ms / max(1, tokens)

    def add_overlapped(self, call, section_ms: float, verify_ms: float) -> None:
        """A draft call that ran beside a verify call: only what outlasted the verify is critical."""
        self._add_call(call)
        self.overlapped = True
        excess = max(0.0, section_ms - verify_ms)
        self.critical_ms += excess
        self.critical_compute_ms += min(call.compute_ms, excess)
        self.hidden_ms += max(0.0, call.observed_ms - excess)


@dataclass
class _Continuation:
    token_ids: list[int]  # [guess for the bonus token, next round's drafts...]
    rows_after_guess: torch.Tensor | None  # draft_probs of token_ids[1:]
    cached_len: int
    seed: int  # the guess is coupled_sample(draft row, seed); the bonus is drawn with the same seed
    width: int  # ids the guess was drawn over (the coupling needs the target's rows to be as wide)


@dataclass
class _Prepared:
    token_ids: list[int]
    draft_probs: torch.Tensor | None
    draft_base: int  # committed tokens the draft cache holds before these drafts
    cached_len: int


# Verify calls run here while the orchestrator thread drafts ahead (step 2b).
_OVERLAP_POOL = ThreadPoolExecutor(max_workers=256, thread_name_prefix="verify-call")  # as many as handler threads (--max-workers)


@dataclass
class RoundEvent:
    """What one round committed, for the stream and for tracing."""
    token_ids: list[int]
    text: str
    gamma: int
    accepted: int
    bonus: bool
    finish_reason: int = orchestrator_pb2.FINISH_REASON_UNSPECIFIED
    timing: orchestrator_pb2.RoundTiming | None = None


@dataclass
class Counters:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    recovered: int = 0
    bonus: int = 0
    rejections: int = 0  # rounds that ended on a rejected draft token
    target_only_rounds: int = 0
    prepared_rounds: int = 0  # rounds whose drafts came from the previous round's continuation
    draft_critical_ms: float = 0.0
    draft_hidden_ms: float = 0.0
    drafted_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)

    def record(self, gamma: int, outcome: RoundOutcome) -> None:
        self.rounds += 1
        self.drafted += gamma
        self.accepted += outcome.accepted
        if gamma == 0:
            self.target_only_rounds += 1
        elif outcome.bonus:
            self.bonus += 1
        else:
            self.recovered += 1
            self.rejections += 1
        while len(self.drafted_at) < gamma:
            self.drafted_at.append(0)
            self.accepted_at.append(0)
        for i in range(gamma):
            self.drafted_at[i] += 1
            self.accepted_at[i] += i < outcome.accepted


class Generation:
    def __init__(self, spec: GenerationSpec, draft: DraftSession | None, verify: VerifySession,
                 text: TextStream, gamma_policy=None, is_active: Callable[[], bool] = lambda: True,
                 metadata=(), trace_context=None, load_model=None, overlap: bool = False):
        self.spec, self.draft, self.verify, self.text = spec, draft, verify, text
        self.gamma_policy = gamma_policy
        self.is_active = is_active
        self.metadata = metadata
        self.trace_context = trace_context  # the "generation" span's context: parent of every round
        self.load_model = load_model  # shared by the orchestrator's generations (--gamma-policy load)
        self.overlap = overlap and draft is not None
        self.generator = seeded_generator(spec.seed)
        self.session_tag = session_tag(verify.session_id)  # in spans: the id itself stays out of them
        self.counters = Counters()
        self.committed = list(spec.prompt_ids)
        self.generated: list[int] = []
        self.finish_reason = orchestrator_pb2.FINISH_REASON_UNSPECIFIED
        self.final_text = ""
        self.started = 0.0
        self.wall_s = 0.0
        self._draft_down_until: float = -1  # target-only while rounds < this; inf: for the rest
        self._check_draft_can_read(spec.prompt_ids)
        self.sampling_message = common_pb2.SamplingParams(
            temperature=spec.sampling.temperature, top_k=spec.sampling.top_k, top_p=spec.sampling.top_p)

    def _gamma(self) -> int:
        spec = self.spec
        gamma = self.gamma_policy.gamma if self.gamma_policy else spec.gamma
        remaining = spec.max_new_tokens - len(self.generated)
        room = spec.max_context - len(self.committed) - 1
        gamma = min(gamma, remaining - 1, room)
        if self.draft is None or self.counters.rounds < self._draft_down_until:
            return 0
        return max(0, gamma)

    def rounds(self) -> Iterator[RoundEvent]:
        self.started = time.perf_counter()
        try:
            while self.finish_reason == orchestrator_pb2.FINISH_REASON_UNSPECIFIED and self.is_active():
                yield self._round()
        finally:
            self.wall_s = time.perf_counter() - self.started

    def _round(self) -> RoundEvent:
        with get_tracer().start_as_current_span("round", context=self.trace_context) as span:
            round_started = time.perf_counter()
            event = self._round_steps()
            round_ms = (time.perf_counter() - round_started) * 1000
            self._report_round(span, event, round_ms)
            return event

    def _report_round(self, span, event: "RoundEvent", round_ms: float) -> None:
        """Round span attributes and metrics: the measured split of this round's wall time."""
        draft = self._round_draft
        verify = self.verify.calls[-1]
        outcome = "target_only" if event.gamma == 0 else ("bonus" if event.bonus else "recovered")
        draft_ms = draft.critical_ms
        network_ms = verify.network_ms + draft.network_ms
        orchestrator_ms = max(0.0, round_ms - draft_ms - verify.observed_ms)
        self.counters.draft_critical_ms += draft_ms
        self.counters.draft_hidden_ms += draft.hidden_ms
        event.timing = orchestrator_pb2.RoundTiming(
            num_draft_tokens=event.gamma, accepted=event.accepted, round_ms=round_ms, draft_ms=draft_ms,
            verify_ms=verify.observed_ms, draft_compute_ms=draft.compute_ms,
            verify_compute_ms=verify.compute_ms, queue_ms=verify.queue_ms + draft.queue_ms,
            network_ms=network_ms, orchestrator_ms=orchestrator_ms,
            bytes=verify.bytes + draft.bytes, verify_batch_size=verify.batch_size,
            draft_hidden_ms=draft.hidden_ms, draft_critical_compute_ms=draft.critical_compute_ms,
            draft_step_ms=draft.step_ms)
        # A verify served on its prefill lane ran beside the batched passes: its time is no pass's cost.
        if self.load_model is not None and not draft.overlapped and not verify.prefill_lane:
            # What a round costs besides compute and queueing: transport and the orchestrator. Queue waits
            # are left out: they are other sessions' compute, which grows with their gamma, and counting
            # them as a fixed cost per round pushed gamma up exactly when the verify was saturated.
            overhead_ms = round_ms - draft.compute_ms - verify.compute_ms - verify.queue_ms - draft.queue_ms
            self.load_model.observe(event.gamma, verify.batch_size, verify.compute_ms, draft.compute_ms, overhead_ms,
                                   verify.batch_tokens)
        record_round(event.gamma, event.accepted, outcome, round_ms, draft_ms, verify.observed_ms, network_ms,
                     orchestrator_ms)
        if not span.is_recording():
            return
        attributes = {
            "specdec.round": self.counters.rounds, "specdec.gamma": event.gamma,
            "specdec.accepted": event.accepted, "specdec.outcome": outcome,
            "specdec.session": self.session_tag, "specdec.round_ms": round_ms,
            "specdec.committed": len(event.token_ids),
            "specdec.verify.observed_ms": verify.observed_ms, "specdec.verify.server_ms": verify.server_total_ms,
            "specdec.verify.compute_ms": verify.compute_ms, "specdec.verify.queue_ms": verify.queue_ms,
        }
        if draft.server_ms or draft.critical_ms:
            # observed_ms is the draft time on the round's critical path; hidden_ms ran beside verify.
            attributes.update({
                "specdec.draft.observed_ms": draft.critical_ms,
                "specdec.draft.server_ms": min(draft.server_ms, draft.critical_ms) if draft.overlapped else draft.server_ms,
                "specdec.draft.compute_ms": draft.compute_ms, "specdec.draft.queue_ms": draft.queue_ms,
                "specdec.draft.hidden_ms": draft.hidden_ms, "specdec.overlapped": draft.overlapped})
        span.set_attributes(attributes)

    def _round_steps(self) -> RoundEvent:
        spec = self.spec
        gamma = self._gamma()
        prepared, self._prepared = self._prepared, None
        self._round_draft = _RoundDraft()

        # 1. Draft: gamma tokens (and draft_probs when sampling) in one call -- or none at all when the
        #    previous round's optimistic continuation already drafted them (see step 2b).
        draft_ids: list[int] = []
        draft_probs = None
        draft_base = draft_cached = 0
        if gamma > 0 and prepared is not None:
            gamma = min(gamma, len(prepared.token_ids))
            draft_ids = prepared.token_ids[:gamma]
            draft_probs = prepared.draft_probs[:gamma] if prepared.draft_probs is not None else None
            draft_base, draft_cached = prepared.draft_base, prepared.cached_len
            self.counters.prepared_rounds += 1
        elif gamma > 0:
            draft_seed = int(torch.randint(0, 1 << 62, (1,), generator=self.generator))
            try:
                proposal, draft_base = self.draft.propose(self.committed, gamma, self.sampling_message,
                                                          draft_seed, self.metadata)
                draft_ids, draft_cached = list(proposal.token_ids), proposal.cached_len
                self._round_draft.add_critical(self.draft.calls[-1], len(draft_ids))
                gamma = len(draft_ids)  # fewer than asked when the draft stopped on low confidence
                draft_probs = self._draft_probs(proposal)
            except grpc.RpcError as error:
                self._draft_failed(error)
                gamma = 0

        # 2. Verify: one target forward over the uncached committed tokens and the drafts.
        #    2b. Meanwhile (overlap on), the draft keeps going as if every draft token will be accepted.
        continuation = None
        if self.overlap and gamma > 0 and self._room_for_continuation(gamma):
            section_started = time.perf_counter()
            verifying = _OVERLAP_POOL.submit(contextvars.copy_context().run, self.verify.verify, self.committed,
                                             draft_ids, self.sampling_message, self.metadata)
            continuation = self._continue_drafting(draft_ids, draft_cached, gamma)
            scored, verify_base = verifying.result()
            if continuation is not None:
                section_ms = (time.perf_counter() - section_started) * 1000
                self._round_draft.add_overlapped(self.draft.calls[-1], section_ms, self.verify.calls[-1].observed_ms)
        else:
            scored, verify_base = self.verify.verify(self.committed, draft_ids, self.sampling_message,
                                                     self.metadata)

        # 3. Accept: greedy prefix match, or rejection sampling with the orchestrator's RNG.
        with get_tracer().start_as_current_span("accept"):
            outcome = self._accept(gamma, draft_ids, draft_probs, scored, continuation)
        self.counters.record(gamma, outcome)

        # 4. Roll back: each service's cache stays valid through the accepted drafts it was fed.
        self.verify.advance(verify_base, scored.cached_len, outcome.accepted)
        if continuation is not None:
            self.draft.advance(draft_base, continuation.cached_len, outcome.accepted)
            if outcome.bonus and outcome.next_token == continuation.token_ids[0]:
                # The guess was right: the draft cache holds the new committed tokens and the next
                # round's drafts already; keep them.
                self._prepared = _Prepared(continuation.token_ids[1:], continuation.rows_after_guess,
                                           draft_base + gamma + 1, continuation.cached_len)
                self.draft.synced_len = draft_base + gamma + 1
        elif gamma > 0:
            self.draft.advance(draft_base, draft_cached, outcome.accepted)

        # 5. Commit, cut at EOS / max_new_tokens / stop string, stream.
        new_tokens = self._commit(outcome.tokens(draft_ids))

        # 6. Adapt gamma from what this round measured.
        if self.gamma_policy is not None:
            self.gamma_policy.update(gamma, outcome.accepted)

        final = self.finish_reason != orchestrator_pb2.FINISH_REASON_UNSPECIFIED
        text = self.text.decode(self.generated)
        if final:
            text = text[: self._stop_text_end] if self._stop_text_end is not None else text
            self.final_text = text
        return RoundEvent(new_tokens, self.text.delta(text, final), gamma, outcome.accepted, outcome.bonus,
                          self.finish_reason)

    _stop_text_end: int | None = None
    _prepared: "_Prepared | None" = None
    _round_draft: _RoundDraft = _RoundDraft()

    def _draft_probs(self, proposal):
        if self.spec.sampling.greedy:
            return None
        return probs_from_message(proposal.draft_probs)

    def _draft_failed(self, error: grpc.RpcError) -> None:
        if error.code() in DRAFT_OUTAGE_CODES:
            log.warning("draft unavailable (%s: %s); target-only for %d rounds", error.code().name,
                        error.details(), DRAFT_RETRY_AFTER_ROUNDS)
            self._draft_down_until = self.counters.rounds + DRAFT_RETRY_AFTER_ROUNDS
        else:
            log.warning("draft refused (%s: %s); target-only for the rest of this generation", error.code().name,
                        error.details())
            self._draft_down_until = math.inf

    def _check_draft_can_read(self, tokens: list[int]) -> None:
        """A target with more (padding) logits than the draft can emit an id the draft has no embedding for;
        the draft cannot continue that context, so the rest of the generation runs target-only."""
        limit = self.spec.draft_vocab_size
        if self.draft is None or self._draft_down_until == math.inf or not limit or limit >= self.spec.target_vocab_size:
            return
        beyond = [t for t in tokens if t >= limit]
        if beyond:
            log.warning("token %d is past the draft's %d logits; target-only for the rest of this generation",
                        beyond[0], limit)
            self._draft_down_until = math.inf

    def _room_for_continuation(self, gamma: int) -> bool:
        spec = self.spec
        after = len(self.committed) + gamma + 1  # if every draft is accepted, plus the bonus
        return (len(self.generated) + gamma + 1 < spec.max_new_tokens
                and after + gamma + 1 <= spec.max_context)

    def _continue_drafting(self, draft_ids: list[int], draft_cached: int, gamma: int) -> "_Continuation | None":
        """Propose gamma + 1 tokens after committed + draft_ids: a guess for the bonus token, then the next
        round's drafts. Runs while the target verifies; the seed is drawn whether or not it is used, so a
        seeded generation does not depend on timing."""
        seed = int(torch.randint(0, 1 << 62, (1,), generator=self.generator))
        # The cache holds committed + the drafts but the last (or more, after a prepared round that used
        # fewer than were drafted): keep exactly committed + draft_ids[:-1], append the last draft.
        self.draft.synced_len = min(draft_cached, len(self.committed) + len(draft_ids) - 1)
        try:
            proposal, _ = self.draft.propose(self.committed + draft_ids, gamma + 1, self.sampling_message, seed,
                                             self.metadata)
        except grpc.RpcError as error:
            self._draft_failed(error)
            self.draft.synced_len = 0  # unknown state: the next call re-sends the prefix
            return None
        probs = self._draft_probs(proposal)
        return _Continuation(list(proposal.token_ids), probs[1:] if probs is not None else None,
                             proposal.cached_len, seed, probs.shape[1] if probs is not None else 0)

    def _accept(self, gamma: int, draft_ids: list[int], draft_probs, scored,
                continuation: "_Continuation | None" = None) -> RoundOutcome:
        if self.spec.sampling.greedy:
            return greedy_accept(draft_ids, list(scored.argmax_token_ids))
        target_probs = probs_from_message(scored.target_probs)
        if draft_probs is None:
            draft_probs = torch.zeros(0, target_probs.shape[1])
        draft_probs = over_target_ids(draft_probs, target_probs.shape[1])
        # The bonus shares the continuation's Gumbel noise, so the draft's guess matches it as often as the
        # two distributions allow; it is an exact draw from the target's row all the same.
        coupled = continuation is not None and continuation.width == target_probs.shape[1]
        return rejection_sample(torch.tensor(draft_ids, dtype=torch.long), draft_probs, target_probs, self.generator,
                                bonus_seed=continuation.seed if coupled else None)

    def _commit(self, tokens: list[int]) -> list[int]:
        spec = self.spec
        first_new = len(self.generated)
        kept: list[int] = []
        for token in tokens:
            kept.append(token)
            if token in spec.eos_token_ids:
                self.finish_reason = orchestrator_pb2.FINISH_REASON_EOS
                break
            if first_new + len(kept) >= spec.max_new_tokens:
                self.finish_reason = orchestrator_pb2.FINISH_REASON_LENGTH
                break
        hit = self.text.find_stop(self.generated + kept, first_new + 1)
        if hit is not None:
            kept = kept[: hit.token_count - first_new]
            self.finish_reason = orchestrator_pb2.FINISH_REASON_STOP_STRING
            self._stop_text_end = hit.text_end
        self.generated.extend(kept)
        self.committed.extend(kept)
        self._check_draft_can_read(kept)
        return kept

    def stats(self) -> orchestrator_pb2.GenerationStats:
        c = self.counters
        if self.finish_reason:
            self.wall_s = time.perf_counter() - self.started
        draft_calls = self.draft.calls if self.draft else []
        verify_calls = self.verify.calls
        wall_ms = self.wall_s * 1000
        draft_ms = c.draft_critical_ms  # on the critical path; c.draft_hidden_ms ran beside verify
        verify_ms = sum(r.observed_ms for r in verify_calls)
        return orchestrator_pb2.GenerationStats(
            prompt_tokens=len(self.spec.prompt_ids), new_tokens=len(self.generated), rounds=c.rounds,
            drafted_tokens=c.drafted, accepted_tokens=c.accepted,
            acceptance_rate=c.accepted / c.drafted if c.drafted else 0.0,
            mean_accepted_len=len(self.generated) / c.rounds if c.rounds else 0.0,
            tokens_per_s=len(self.generated) / self.wall_s if self.wall_s else 0.0,
            wall_ms=wall_ms, draft_ms=draft_ms, verify_ms=verify_ms,
            other_ms=max(0.0, wall_ms - draft_ms - verify_ms),
            draft_compute_ms=sum(r.compute_ms for r in draft_calls),
            verify_compute_ms=sum(r.compute_ms for r in verify_calls),
            network_ms=sum(r.network_ms for r in draft_calls) + sum(r.network_ms for r in verify_calls),
            bytes_per_round=(sum(r.bytes for r in draft_calls) + sum(r.bytes for r in verify_calls)) / max(1, c.rounds),
            reprefills=self.verify.reprefills + (self.draft.reprefills if self.draft else 0),
            target_only_rounds=c.target_only_rounds,
            acceptance_by_position=[a / d for a, d in zip(c.accepted_at, c.drafted_at)],
            recovered_tokens=c.recovered, bonus_tokens=c.bonus, overlapped_rounds=c.prepared_rounds,
            alpha=c.accepted / (c.accepted + c.rejections) if c.accepted + c.rejections else 0.0,
        )
