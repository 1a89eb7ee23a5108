"""gamma chosen from the measured load (`--gamma-policy load`).

One LoadModel per orchestrator learns, from every verify reply, how verify time grows with the tokens
in a batch and how large batches are; each session keeps its own acceptance estimate. Since it reads
timings, a seeded sampled generation is reproducible only under the fixed policy (the default).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from speculation.gamma_policy import AcceptanceEstimate, VerifyCostModel, best_gamma_under_load


@dataclass
class LoadModel:
    verify_cost: VerifyCostModel = field(default_factory=VerifyCostModel)
    draft_step_ms: float = 0.0
    batch: float = 1.0
    round_overhead_ms: float = 0.0  # round wall time minus its compute and queue waits: transport, orchestrator
    # Acceptance across all sessions, slower to move: where a new session's own estimate starts.
    acceptance: AcceptanceEstimate = field(default_factory=lambda: AcceptanceEstimate(decay=0.95))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def observe(self, gamma: int, batch_size: int, verify_compute_ms: float, draft_compute_ms: float,
                overhead_ms: float = 0.0) -> None:
        with self.lock:
            self.round_overhead_ms = 0.9 * self.round_overhead_ms + 0.1 * max(0.0, overhead_ms)
            # The batch's token count is unknown here; sessions in one batch draft alike, so B(gamma+1).
            self.verify_cost.update(max(1, batch_size) * (gamma + 1), verify_compute_ms)
            self.batch = 0.9 * self.batch + 0.1 * max(1, batch_size)
            if gamma > 0 and draft_compute_ms > 0:
                step = draft_compute_ms / gamma
                self.draft_step_ms = step if self.draft_step_ms == 0 else 0.9 * self.draft_step_ms + 0.1 * step


@dataclass
class LoadAwareGamma:
    """Per-session policy object with the same interface as AdaptiveGamma (gamma, update)."""

    load: LoadModel
    max_gamma: int
    gamma: int
    acceptance: AcceptanceEstimate = field(init=False)

    def __post_init__(self) -> None:
        # A short generation would otherwise spend its rounds unlearning a fixed prior.
        with self.load.lock:
            self.acceptance = AcceptanceEstimate(prior=self.load.acceptance.alpha)

    @property
    def alpha(self) -> float:
        return self.acceptance.alpha

    def update(self, drafted: int, accepted: int) -> int:
        self.acceptance.update(drafted, accepted)
        with self.load.lock:
            self.load.acceptance.update(drafted, accepted)
            coefficients = self.load.verify_cost.coefficients()
            draft_step, batch, overhead = self.load.draft_step_ms, self.load.batch, self.load.round_overhead_ms
        if coefficients is not None and draft_step > 0:
            fixed, per_token = coefficients
            self.gamma = best_gamma_under_load(min(self.alpha, 0.999), draft_step, fixed, per_token, batch,
                                               self.max_gamma, overhead)
        return self.gamma
