"""Choosing gamma (num_draft_tokens) from measured acceptance and costs.

Leviathan et al. 2023, Theorem 3.8 / Eq. 1: with acceptance rate alpha and cost ratio c (one draft
step over one target step), the expected speedup of gamma drafts per round is
    (1 - alpha^(gamma + 1)) / ((1 - alpha) * (gamma * c + 1)).
"""

from __future__ import annotations

from collections.abc import Callable
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


def grown_at_most_doubled(previous: int, chosen: int) -> int:
    """`chosen`, but at most 2 * previous + 1: gamma grows over rounds, not in one bet.

    A few fully accepted rounds leave the acceptance estimate (a short exponential window) near 1,
    where the formula's best gamma is the largest allowed: on the reference pair a session went from
    gamma 4 to 32 after such a streak and had 1 of the 32 accepted. Growing by doubling still reaches
    32 from 4 in three rounds for a session that keeps earning it; shrinking is not limited."""
    return min(chosen, 2 * previous + 1)


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
        chosen = max(1, best_gamma(min(self.alpha, 0.999), self.cost_ratio, self.max_gamma))
        self.gamma = grown_at_most_doubled(self.gamma, chosen)
        return self.gamma


@dataclass
class VerifyCostModel:
    """verify_ms ~= fixed_ms + per_session_ms * sessions + per_token_ms * tokens for one forward pass over
    `sessions` sessions feeding `tokens` tokens in all, fitted by exponentially weighted least squares.

    The per-session part is what a session costs a pass whatever its gamma: its own attention call, KV
    writes and bookkeeping (~1.3 ms per session per pass for the reference target on this CPU against
    ~0.73 ms per token; `python -m benchmarking.microbench batch`). Folded into a per-token slope it
    would make each extra draft token look about twice as dear as it is, and gamma shrink under load
    where longer drafts were the cheaper use of the pass. When sessions and tokens do not vary apart
    (every session drafting alike) the two cannot be told apart: then the fit is fixed + per-token."""

    decay: float = 0.98
    _sums: list[float] = field(default_factory=lambda: [0.0] * 9)  # n, s, t, y, ss, st, tt, sy, ty

    def update(self, tokens: float, ms: float, sessions: float = 1.0) -> None:
        d = self.decay
        terms = (1.0, sessions, tokens, ms, sessions * sessions, sessions * tokens, tokens * tokens,
                 sessions * ms, tokens * ms)
        self._sums = [d * old + new for old, new in zip(self._sums, terms)]

    def coefficients(self) -> tuple[float, float, float] | None:
        """(fixed_ms, per_session_ms, per_token_ms), or None until the observations span more than one
        batch size."""
        n, s, t, y, ss, st, tt, sy, ty = self._sums
        if n < 2:
            return None
        # Centred second moments: the fit of y on (sessions, tokens) with an intercept.
        css, cst, ctt = ss / n - (s / n) ** 2, st / n - s * t / n ** 2, tt / n - (t / n) ** 2
        csy, cty = sy / n - s * y / n ** 2, ty / n - t * y / n ** 2
        if ctt <= 1e-9:
            return None
        det = css * ctt - cst * cst
        if css > 1e-9 and det > 1e-6 * css * ctt:  # sessions and tokens vary apart: both slopes
            per_session = (csy * ctt - cty * cst) / det
            per_token = (cty * css - csy * cst) / det
            if per_session >= 0 and per_token >= 0:
                return max(0.0, (y - per_session * s - per_token * t) / n), per_session, per_token
        per_token = max(0.0, cty / ctt)
        return max(0.0, (y - per_token * t) / n), 0.0, per_token


def best_gamma_under_load(alpha: float, draft_step_ms: float, fixed_ms: float, per_token_ms: float,
                          batch: float, max_gamma: int, round_overhead_ms: float = 0.0,
                          per_session_ms: float = 0.0, sessions: float = 0.0) -> int:
    """The gamma maximising committed tokens per unit of time when `batch` sessions share each verify
    pass and `sessions` generations share the verify service: E(alpha, gamma) / max(serial, cycle), where

        serial = gamma * draft_step_ms + fixed_ms + per_session_ms * batch
                 + per_token_ms * batch * (gamma + 1) + round_overhead_ms

    is one round on its own (draft, then its verify pass, then transport and the orchestrator), and

        cycle = (sessions / batch) * fixed_ms + sessions * (per_session_ms + per_token_ms * (gamma + 1))

    is how long the verify takes to serve every session one round. A round cannot come around faster
    than either. While the verify has time to spare the serial path decides and a draft step costs
    the session its full time; once every session's round queues behind the others', the cycle
    decides and the draft and the transport are hidden behind other sessions' passes (the draft runs
    on its own device), so only the verify compute that gamma adds is dear. `round_overhead_ms`
    (transport, the orchestrator) is paid again by every extra round, which favours longer drafts.
    0 means plain decoding: under heavy load the rejected drafts' compute costs more than it saves."""
    def rate(g: int) -> float:
        serial = (g * draft_step_ms + fixed_ms + per_session_ms * batch + per_token_ms * batch * (g + 1)
                  + round_overhead_ms)
        cycle = (sessions / max(batch, 1.0)) * fixed_ms + sessions * (per_session_ms + per_token_ms * (g + 1))
        return expected_tokens_per_round(alpha, g) / max(serial, cycle)
    return max(range(max_gamma + 1), key=lambda g: (rate(g), -g))


class PerDrafterGamma:
    """One gamma policy per kind of drafter (ProposeResponse.drafter), behind the same interface.

    A draft service may host several drafters (a chain: an n-gram lookup, else a small model): the n-gram
    drafter's proposals are accepted in long runs when the text is being copied, the model's at its own
    steady rate, and one acceptance estimate over both would suit neither. Each kind learns from its own
    rounds; the next round asks for the gamma of the drafter that proposed last (n-gram matches come in
    runs). A drafter that answered with no tokens (no n-gram match) teaches nothing about gamma: such a
    round is not passed on, so it neither lowers gamma nor counts as a plain round."""

    def __init__(self, make: Callable[[], object]):
        self._make = make
        self._policies: dict[str, object] = {}
        self.current = self._policy("")

    def _policy(self, drafter: str):
        if drafter not in self._policies:
            self._policies[drafter] = self._make()
        return self._policies[drafter]

    @property
    def gamma(self) -> int:
        return self.current.gamma

    @property
    def alpha(self) -> float:
        return self.current.alpha

    @property
    def drafters(self) -> dict[str, object]:
        return dict(self._policies)

    def update(self, drafted: int, accepted: int, drafter: str = "") -> int:
        """drafter "": no proposal named one (a plain round the policy chose, or a draft that failed):
        the current policy learns from it, as a policy alone would."""
        if drafted <= 0 and drafter:
            return self.current.gamma
        if drafter:
            self.current = self._policy(drafter)
        return self.current.update(drafted, accepted)
