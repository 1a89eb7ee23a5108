"""gamma chosen from the measured load (`--gamma-policy load`).

One LoadModel per orchestrator learns, from every verify reply, how verify time grows with the tokens
in a batch and how large batches are; each session keeps its own acceptance estimate. Since it reads
timings, a seeded sampled generation is reproducible only under the fixed policy (the default).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from speculation.gamma_policy import VerifyCostModel, best_gamma_under_load, smoothed_alpha


@dataclass
class LoadModel:
    verify_cost: VerifyCostModel = field(default_factory=VerifyCostModel)
    draft_step_ms: float = 0.0
    batch: float = 1.0
    round_overhead_ms: float = 0.0  # round wall time minus its compute: transport, orchestrator, queueing
    alpha: float = 0.7  # acceptance across all sessions: where a new session's own estimate starts
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
    alpha: float = field(init=False, default=0.7)
    smoothing: float = 0.2

    def __post_init__(self) -> None:
        with self.load.lock:
            self.alpha = self.load.alpha  # a short generation would otherwise spend its rounds unlearning a prior

    def update(self, drafted: int, accepted: int) -> int:
        self.alpha = smoothed_alpha(self.alpha, drafted, accepted, self.smoothing)
        with self.load.lock:
            self.load.alpha = smoothed_alpha(self.load.alpha, drafted, accepted, self.smoothing / 4)
            coefficients = self.load.verify_cost.coefficients()
            draft_step, batch, overhead = self.load.draft_step_ms, self.load.batch, self.load.round_overhead_ms
        if coefficients is not None and draft_step > 0:
            fixed, per_token = coefficients
            self.gamma = best_gamma_under_load(min(self.alpha, 0.999), draft_step, fixed, per_token, batch,
                                               self.max_gamma, overhead)
        return self.gamma
