"""Choosing gamma (num_draft_tokens) from measured acceptance and costs.

Leviathan et al. 2023, Theorem 3.8 / Eq. 1: with acceptance rate alpha and cost ratio c (one draft
step over one target step), the expected speedup of gamma drafts per round is
    (1 - alpha^(gamma + 1)) / ((1 - alpha) * (gamma * c + 1)).
"""

from __future__ import annotations

from dataclasses import dataclass, field


def expected_tokens_per_round(alpha: float, gamma: int) -> float:
    """Expected committed tokens per round (accepted + the recovered or bonus token)."""
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def expected_speedup(alpha: float, gamma: int, cost_ratio: float) -> float:
    return expected_tokens_per_round(alpha, gamma) / (gamma * cost_ratio + 1.0)


@dataclass
class AcceptanceEstimate:
    """Per-token acceptance alpha from rounds of drafts, each a truncated geometric trial: `accepted`
    successes, then one failure unless every drafted token was accepted.

    alpha is the ratio of exponentially weighted successes to trials, which is the maximum-likelihood
    estimate. Averaging each round's own ratio instead weighs a round rejected at its first token as
    much as one that accepted four, and read 0.64-0.78 where the pooled rate was 0.84 (reference pair).
    Starts from `prior` as if `prior_trials` trials had been seen."""

    prior: float = 0.7
    prior_trials: float = 4.0
    decay: float = 0.8  # per round: the weight of what was measured before it
    successes: float = field(init=False)
    trials: float = field(init=False)

    def __post_init__(self) -> None:
        self.successes, self.trials = self.prior * self.prior_trials, self.prior_trials

    @property
    def alpha(self) -> float:
        return self.successes / self.trials if self.trials > 0 else self.prior

    def update(self, drafted: int, accepted: int) -> float:
        if drafted > 0:
            self.successes = self.decay * self.successes + accepted
            self.trials = self.decay * self.trials + accepted + (0 if accepted >= drafted else 1)
        return self.alpha


def best_gamma(alpha: float, cost_ratio: float, max_gamma: int) -> int:
    """The gamma in [0, max_gamma] with the highest expected speedup (0 = speculation does not pay)."""
    return max(range(max_gamma + 1), key=lambda g: (expected_speedup(alpha, g, cost_ratio), -g))


@dataclass
class AdaptiveGamma:
    """Per-session gamma from a moving average of the measured acceptance, at a fixed cost ratio.

    The cost ratio c (one draft step over one verify call) is measured by the deployment, not per
    round, so a seeded generation stays reproducible: gamma depends only on the accepted counts, which
    the seed determines.
    """

    max_gamma: int
    gamma: int
    cost_ratio: float
    acceptance: AcceptanceEstimate = field(default_factory=AcceptanceEstimate)

    @property
    def alpha(self) -> float:
        return self.acceptance.alpha

    def update(self, drafted: int, accepted: int) -> int:
        if drafted <= 0:
            return self.gamma
        self.acceptance.update(drafted, accepted)
        self.gamma = max(1, best_gamma(min(self.alpha, 0.999), self.cost_ratio, self.max_gamma))
        return self.gamma


@dataclass
class VerifyCostModel:
    """verify_ms ~= fixed_ms + per_token_ms * tokens_in_batch, fitted by exponentially weighted least
    squares over observed verify calls (a forward over B sessions of gamma + 1 tokens each)."""

    decay: float = 0.98
    _n: float = 0.0
    _sx: float = 0.0
    _sy: float = 0.0
    _sxx: float = 0.0
    _sxy: float = 0.0

    def update(self, tokens: float, ms: float) -> None:
        d = self.decay
        self._n = d * self._n + 1
        self._sx = d * self._sx + tokens
        self._sy = d * self._sy + ms
        self._sxx = d * self._sxx + tokens * tokens
        self._sxy = d * self._sxy + tokens * ms

    def coefficients(self) -> tuple[float, float] | None:
        """(fixed_ms, per_token_ms), or None until the observations span more than one batch size."""
        if self._n < 2:
            return None
        var = self._sxx / self._n - (self._sx / self._n) ** 2
        if var <= 1e-9:
            return None
        slope = max(0.0, (self._sxy / self._n - self._sx * self._sy / self._n ** 2) / var)
        return max(0.0, self._sy / self._n - slope * self._sx / self._n), slope


def best_gamma_under_load(alpha: float, draft_step_ms: float, fixed_ms: float, per_token_ms: float,
                          batch: float, max_gamma: int, round_overhead_ms: float = 0.0) -> int:
    """The gamma maximising committed tokens per unit of time when `batch` sessions share each verify:
    E(alpha, gamma) / (gamma * draft_step_ms + fixed_ms + per_token_ms * batch * (gamma + 1) + overhead).
    `round_overhead_ms` is what a round costs besides compute whatever its gamma (the calls' transport,
    the orchestrator's own work): every extra round pays it again, so it favours longer drafts.
    0 means plain decoding: under heavy load the rejected drafts' compute costs more than it saves."""
    def rate(g: int) -> float:
        return expected_tokens_per_round(alpha, g) / (g * draft_step_ms + fixed_ms + per_token_ms * batch * (g + 1)
                                                      + round_overhead_ms)
    return max(range(max_gamma + 1), key=lambda g: (rate(g), -g))
