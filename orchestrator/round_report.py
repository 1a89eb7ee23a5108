"""What rounds and generations report: each round's timing split (RoundTiming, streamed to the client), its
span attributes and metrics, the load model's observations, and the generation's GenerationStats.

Reads what the round measured; decides nothing about the round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.service_clients import CallRecord
from specdec_api import orchestrator_pb2
from speculation.rejection import RoundOutcome
from telemetry.metrics import record_round


@dataclass
class RoundDraft:
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
    prepared: bool = False  # the drafts came from the previous round's draft-ahead: no call this round

    def _add_call(self, call: CallRecord) -> None:
        self.compute_ms += call.compute_ms
        self.network_ms += call.network_ms
        self.queue_ms += call.queue_ms
        self.server_ms += call.server_total_ms
        self.bytes += call.bytes

    def add_critical(self, call: CallRecord, tokens: int) -> None:
        self._add_call(call)
        self.critical_ms += call.observed_ms
        self.critical_compute_ms += call.compute_ms
        self.step_ms = call.compute_ms / max(1, tokens)

    def add_overlapped(self, call: CallRecord, section_ms: float, verify_ms: float) -> None:
        """A draft call that ran beside a verify call: only what outlasted the verify is critical."""
        self._add_call(call)
        self.overlapped = True
        excess = max(0.0, section_ms - verify_ms)
        self.critical_ms += excess
        self.critical_compute_ms += min(call.compute_ms, excess)
        self.hidden_ms += max(0.0, call.observed_ms - excess)


@dataclass
class RoundMeasures:
    """What one round measured, for its report."""
    gamma: int
    outcome: RoundOutcome
    committed: int  # tokens it committed (after any cut)
    draft: RoundDraft
    verify: CallRecord
    accept_ms: float  # step 3, the acceptance test
    round_ms: float


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


class GenerationReport:
    """One generation's counters, and the report of each of its rounds."""

    def __init__(self, session_tag: str, load_model=None):
        self.session_tag = session_tag  # in spans: the session id itself stays out of them
        self.load_model = load_model  # shared by the orchestrator's generations (--gamma-policy load)
        self.counters = Counters()

    def round(self, span, m: RoundMeasures) -> orchestrator_pb2.RoundTiming:
        """Counts the round, tells the load model and metrics, sets the round span's attributes, and returns
        the measured split of its wall time for the client."""
        draft, verify = m.draft, m.verify
        self.counters.record(m.gamma, m.outcome)
        self.counters.prepared_rounds += draft.prepared
        self.counters.draft_critical_ms += draft.critical_ms
        self.counters.draft_hidden_ms += draft.hidden_ms
        outcome = "target_only" if m.gamma == 0 else ("bonus" if m.outcome.bonus else "recovered")
        network_ms = verify.network_ms + draft.network_ms
        orchestrator_ms = max(0.0, m.round_ms - draft.critical_ms - verify.observed_ms)
        self._observe_load(m)
        record_round(m.gamma, m.outcome.accepted, outcome, m.round_ms, draft.critical_ms, verify.observed_ms,
                     network_ms, orchestrator_ms)
        if span.is_recording():
            span.set_attributes(self._attributes(m, outcome))
        return orchestrator_pb2.RoundTiming(
            num_draft_tokens=m.gamma, accepted=m.outcome.accepted, round_ms=m.round_ms, draft_ms=draft.critical_ms,
            verify_ms=verify.observed_ms, draft_compute_ms=draft.compute_ms,
            verify_compute_ms=verify.compute_ms, queue_ms=verify.queue_ms + draft.queue_ms,
            network_ms=network_ms, orchestrator_ms=orchestrator_ms,
            bytes=verify.bytes + draft.bytes, verify_batch_size=verify.batch_size,
            draft_hidden_ms=draft.hidden_ms, draft_critical_compute_ms=draft.critical_compute_ms,
            draft_step_ms=draft.step_ms)

    def _observe_load(self, m: RoundMeasures) -> None:
        # An overlapped round's draft ran beside its verify, and a verify served on its prefill lane ran beside
        # the batched passes: neither measures what a round costs.
        draft, verify = m.draft, m.verify
        if self.load_model is None or draft.overlapped or verify.prefill_lane:
            return
        # What a round costs besides compute and queueing: transport and the orchestrator. Queue waits are
        # left out: they are other sessions' compute, which grows with their gamma, and counting them as a
        # fixed cost per round pushed gamma up exactly when the verify was saturated.
        overhead_ms = m.round_ms - draft.compute_ms - verify.compute_ms - verify.queue_ms - draft.queue_ms
        self.load_model.observe(m.gamma, verify.batch_size, verify.compute_ms, draft.compute_ms, overhead_ms,
                                verify.batch_tokens)

    def _attributes(self, m: RoundMeasures, outcome: str) -> dict:
        draft, verify = m.draft, m.verify
        attributes = {
            "specdec.round": self.counters.rounds, "specdec.gamma": m.gamma,
            "specdec.accepted": m.outcome.accepted, "specdec.outcome": outcome,
            "specdec.session": self.session_tag, "specdec.round_ms": m.round_ms,
            "specdec.committed": m.committed, "specdec.accept_ms": m.accept_ms,
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
        return attributes

    def stats(self, prompt_tokens: int, new_tokens: int, wall_s: float, draft_calls: list[CallRecord],
              verify_calls: list[CallRecord], reprefills: int, rebinds: int = 0) -> orchestrator_pb2.GenerationStats:
        c = self.counters
        wall_ms = wall_s * 1000
        draft_ms = c.draft_critical_ms  # on the critical path; c.draft_hidden_ms ran beside verify
        verify_ms = sum(r.observed_ms for r in verify_calls)
        return orchestrator_pb2.GenerationStats(
            prompt_tokens=prompt_tokens, new_tokens=new_tokens, rounds=c.rounds,
            drafted_tokens=c.drafted, accepted_tokens=c.accepted,
            acceptance_rate=c.accepted / c.drafted if c.drafted else 0.0,
            mean_accepted_len=new_tokens / c.rounds if c.rounds else 0.0,
            tokens_per_s=new_tokens / wall_s if wall_s else 0.0,
            wall_ms=wall_ms, draft_ms=draft_ms, verify_ms=verify_ms,
            other_ms=max(0.0, wall_ms - draft_ms - verify_ms),
            draft_compute_ms=sum(r.compute_ms for r in draft_calls),
            verify_compute_ms=sum(r.compute_ms for r in verify_calls),
            network_ms=sum(r.network_ms for r in draft_calls) + sum(r.network_ms for r in verify_calls),
            bytes_per_round=(sum(r.bytes for r in draft_calls) + sum(r.bytes for r in verify_calls)) / max(1, c.rounds),
            reprefills=reprefills, rebinds=rebinds, target_only_rounds=c.target_only_rounds,
            acceptance_by_position=[a / d for a, d in zip(c.accepted_at, c.drafted_at)],
            recovered_tokens=c.recovered, bonus_tokens=c.bonus, overlapped_rounds=c.prepared_rounds,
            alpha=c.accepted / (c.accepted + c.rejections) if c.accepted + c.rejections else 0.0,
        )
