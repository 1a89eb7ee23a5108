"""gamma chosen from the measured load (`--gamma-policy load`).

One LoadModel per orchestrator learns, from every verify reply, how verify time grows with the sessions
and the tokens in a pass and how large batches are; each session keeps its own acceptance estimate. Since it reads
timings, a seeded sampled generation is reproducible only under the fixed policy (the default).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from speculation.gamma_policy import (AcceptanceEstimate, VerifyCostModel, best_gamma_under_load,
                                     grown_at_most_doubled)


@dataclass
class LoadModel:
    verify_cost: VerifyCostModel = field(default_factory=VerifyCostModel)
    draft_step_ms: float = 0.0
    batch: float = 1.0
    round_overhead_ms: float = 0.0  # round wall time minus its compute and queue waits: transport, orchestrator
    # Acceptance across all sessions, slower to move: where a new session's own estimate starts.
    acceptance: AcceptanceEstimate = field(default_factory=lambda: AcceptanceEstimate(decay=0.95))
    lock: threading.Lock = field(default_factory=threading.Lock)
    active: int = 0  # generations in flight on this orchestrator: the sessions sharing the verify

    def enter(self) -> None:
        with self.lock:
            self.active += 1

    def leave(self) -> None:
        with self.lock:
            self.active = max(0, self.active - 1)

    def observe(self, gamma: int, batch_size: int, verify_compute_ms: float, draft_compute_ms: float,
                overhead_ms: float = 0.0, batch_tokens: int = 0) -> None:
        with self.lock:
            self.round_overhead_ms = 0.9 * self.round_overhead_ms + 0.1 * max(0.0, overhead_ms)
            # The pass's token count as the verify service reports it; a service that does not report it
            # is taken to batch sessions drafting alike, B (gamma + 1).
            tokens = batch_tokens if batch_tokens > 0 else max(1, batch_size) * (gamma + 1)
            self.verify_cost.update(tokens, verify_compute_ms, sessions=max(1, batch_size))
            self.batch = 0.9 * self.batch + 0.1 * max(1, batch_size)
            if gamma > 0 and draft_compute_ms > 0:
                step = draft_compute_ms / gamma
                self.draft_step_ms = step if self.draft_step_ms == 0 else 0.9 * self.draft_step_ms + 0.1 * step


@dataclass
class LoadAwareGamma:
    """Per-session policy object with the same interface as AdaptiveGamma (gamma, update).

    A gamma = 0 round drafts nothing, so it teaches nothing about acceptance: a session whose estimate
    once fell low enough for plain decoding would stay there to its end, however well the draft would
    now do (at one stream, 249 of 1601 rounds of the concurrency bench were such rounds). So after
    `probe_after` plain rounds in a row the session drafts one token. Each rejected probe doubles the
    wait, up to `max_probe_after`, so a session the draft really does not suit pays for a one-token
    draft at most once every `max_probe_after` rounds; an accepted probe brings the next one back to
    `probe_after` rounds, so a draft that has become good wins the session back within a few probes."""

    load: LoadModel
    max_gamma: int
    gamma: int
    acceptance: AcceptanceEstimate = field(init=False)
    probe_after: int = 4
    max_probe_after: int = 32
    _plain_rounds: int = field(default=0, init=False)
    _wait: int = field(init=False)  # plain rounds before the next probe

    def __post_init__(self) -> None:
        self._wait = self.probe_after
        # A short generation would otherwise spend its rounds unlearning a fixed prior.
        with self.load.lock:
            self.acceptance = AcceptanceEstimate(prior=self.load.acceptance.alpha)

    @property
    def alpha(self) -> float:
        return self.acceptance.alpha

    def update(self, drafted: int, accepted: int) -> int:
        if drafted <= 0:
            self._plain_rounds += 1
            if self._plain_rounds >= self._wait:
                self._plain_rounds = 0
                self.gamma = 1  # a probe: one drafted token measures acceptance again
            return self.gamma
        self.acceptance.update(drafted, accepted)
        with self.load.lock:
            self.load.acceptance.update(drafted, accepted)
            coefficients = self.load.verify_cost.coefficients()
            draft_step, batch, overhead = self.load.draft_step_ms, self.load.batch, self.load.round_overhead_ms
            sessions = self.load.active
        if coefficients is not None and draft_step > 0:
            fixed, per_session, per_token = coefficients
            chosen = best_gamma_under_load(min(self.alpha, 0.999), draft_step, fixed, per_token, batch,
                                           self.max_gamma, overhead, per_session, sessions)
            self.gamma = grown_at_most_doubled(self.gamma, chosen)
        if self.gamma > 0 or accepted >= drafted:
            self._wait = self.probe_after  # drafting pays again, or the probe's token was accepted: look soon
        else:
            self._wait = min(self.max_probe_after, 2 * self._wait)  # rejected: back off
        return self.gamma
