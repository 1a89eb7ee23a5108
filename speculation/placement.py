"""Which placement of draft and target pays, and at which gamma: pure arithmetic over step costs.

Expected tokens per round (Leviathan et al. 2023, eq. 1): E(alpha, gamma) = (1 - alpha^(gamma+1)) / (1 - alpha):
the accepted drafts plus the recovered or bonus token. A round's time depends on where the two models run:

  split               draft on its own device, target on another, the orchestrator dialling both:
                      gamma * draft_step + verify(gamma + 1) + overhead + 2 * rtt (a Propose and a Verify call)
  split+overlap       the same with --overlap (orchestrator/draft_ahead.py): while the target verifies, the draft
                      proposes gamma + 1 more tokens as if every draft will be accepted (a guess of the bonus, then
                      the next round's drafts). The next round needs no draft call when all gamma drafts are
                      accepted and the guess equals the bonus: probability p = alpha^(gamma + 1) (the guess is one
                      more draft token judged like the others). So
                      (1 - p) * (gamma * draft_step + rtt) + max(verify(gamma + 1), (gamma + 1) * draft_step)
                      + rtt + overhead: round ~= max(draft, verify) + overhead when the guess holds.
  colocated           both on the target's GPU, two processes: the draft step is the draft's cost on the target's
                      device; the device runs one process's kernels at a time (time-slicing; with MPS, still one
                      memory bus at the weight-read floor), so draft and verify add up:
                      gamma * draft_step_colocated + verify(gamma + 1) + overhead. No network (loopback RPCs are
                      in the measured overhead).
  colocated+overlap   drafting ahead on the same device contends with the verify it was meant to hide behind:
                      (1 - p) * gamma * d + verify(gamma + 1) + (gamma + 1) * d + overhead. It never beats
                      colocated without overlap (it spends (gamma + 1) * d to save p * gamma * d): listed so the
                      plan says so.
  target alone        the baseline: target_step (+ target_overhead) per token.

speedup = E * baseline_ms_per_token / round_ms; tokens/s = 1000 * E / round_ms. verify(k) = a + b * k for a pass
feeding k new tokens (a round feeds the uncached bonus token and gamma drafts: k = gamma + 1).

Step costs come from measurements or from a device description: at batch 1 a decoder step reads every weight
once, so its floor is weight bytes / memory bandwidth (params * bytes per dtype); verify(k) is flat in k there
(b = 0) until compute catches up with the weight reads, far beyond the k of a round at batch 1.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from speculation.gamma_policy import expected_tokens_per_round

SPLIT, SPLIT_OVERLAP, COLOCATED, COLOCATED_OVERLAP, TARGET_ALONE = (
    "split", "split+overlap", "colocated", "colocated+overlap", "target alone")
PLACEMENTS = (SPLIT, SPLIT_OVERLAP, COLOCATED, COLOCATED_OVERLAP)
MAX_GAMMA = 16


@dataclass(frozen=True)
class Device:
    name: str
    bandwidth_gbs: float  # memory bandwidth, GB/s (10^9 bytes)
    memory_gb: float


# Memory bandwidth and capacity from each vendor spec sheet (NVIDIA product pages / datasheets; the RTX 4090's
# from NVIDIA's Ada specifications). Bandwidths are peak: sustained weight reads reach ~80-90 % of them.
DEVICES: dict[str, Device] = {d.name.lower(): d for d in (
    Device("H200", 4800.0, 141.0),        # HBM3e
    Device("H100-SXM", 3350.0, 80.0),     # HBM3
    Device("H100-PCIe", 2000.0, 80.0),    # HBM2e
    Device("A100-80GB", 2039.0, 80.0),    # HBM2e, SXM (PCIe: 1935)
    Device("L40S", 864.0, 48.0),          # GDDR6
    Device("L4", 300.0, 24.0),            # GDDR6
    Device("A10G", 600.0, 24.0),          # GDDR6
    Device("T4", 320.0, 16.0),            # GDDR6
    Device("RTX-4090", 1008.0, 24.0),     # GDDR6X
)}

DTYPE_BYTES = {"float32": 4.0, "fp32": 4.0, "bfloat16": 2.0, "bf16": 2.0, "float16": 2.0, "fp16": 2.0,
               "int8": 1.0, "fp8": 1.0, "int4": 0.5}


def device(name: str) -> Device:
    """A device of the table by name, case and punctuation aside ("h100", "H100 SXM", "a100")."""
    key = re.sub(r"[\s_]+", "-", name.strip().lower())
    if key in DEVICES:
        return DEVICES[key]
    matches = [d for k, d in DEVICES.items() if k.startswith(key)]
    if len(matches) == 1 or (matches and key in ("h100", "a100")):
        return matches[0]  # h100 -> H100-SXM, a100 -> A100-80GB: the table lists the SXM part first
    known = ", ".join(d.name for d in DEVICES.values())
    raise ValueError(f"unknown device {name!r}: one of {known}, or give --*-bandwidth-gbs")


def parse_params(text: str | float) -> float:
    """'1B', '8.03B', '350M', '70b', '1.2e9' or a number: parameters."""
    if isinstance(text, (int, float)):
        return float(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmbt]?)\s*", text.lower())
    if not match:
        raise ValueError(f"parameters {text!r}: a number with an optional K, M, B or T suffix (e.g. 1B, 8.03B)")
    scale = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[match[2]]
    return float(match[1]) * scale


def weight_read_ms(params: float, dtype_bytes: float, bandwidth_gbs: float) -> float:
    """One decoder step at batch 1 reads every weight once: its floor in ms."""
    return params * dtype_bytes / (bandwidth_gbs * 1e9) * 1e3


@dataclass(frozen=True)
class Costs:
    """What a placement's round costs, in ms. draft_step_ms: one draft token on the draft's own device (split);
    colocated_draft_step_ms: on the target's device (None: no co-located placement evaluated). verify(k) =
    verify_base_ms + verify_per_token_ms * k. overhead_ms: per round, what is not model compute (the orchestrator,
    serialization, the loopback or same-rack RPCs of the measurement). rtt_ms: network added per call when draft
    and target are on different hosts. target_step_ms: the target alone per token (None: verify(1));
    target_overhead_ms: per token of the target alone beside its step (0: the bare forward)."""
    alpha: float
    draft_step_ms: float
    verify_base_ms: float
    verify_per_token_ms: float = 0.0
    colocated_draft_step_ms: float | None = None
    overhead_ms: float = 0.0
    rtt_ms: float = 0.0
    target_step_ms: float | None = None
    target_overhead_ms: float = 0.0
    colocated_fits: bool = True
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        for name in ("draft_step_ms", "verify_per_token_ms", "overhead_ms", "rtt_ms",
                     "target_overhead_ms"):
            value = getattr(self, name)
            if not (value >= 0.0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.verify(1) <= 0.0:
            raise ValueError("the verify pass must cost something: verify(1) = 0")

    def verify(self, k: int) -> float:
        return self.verify_base_ms + self.verify_per_token_ms * k

    @property
    def target_ms_per_token(self) -> float:
        step = self.verify(1) if self.target_step_ms is None else self.target_step_ms
        return step + self.target_overhead_ms


def expected_tokens(alpha: float, gamma: int) -> float:
    """E(alpha, gamma) = (1 - alpha^(gamma+1)) / (1 - alpha): alpha 0 -> 1, alpha -> 1 -> gamma + 1."""
    return expected_tokens_per_round(alpha, gamma)


def guess_holds(alpha: float, gamma: int) -> float:
    """With overlap: the probability the next round's drafts are ready (every draft accepted, bonus guessed)."""
    return alpha ** (gamma + 1)


@dataclass(frozen=True)
class Prediction:
    placement: str
    gamma: int
    tokens_per_round: float
    round_ms: float
    parts: dict[str, float]  # the round's expected time by part, ms
    speedup: float  # over the target alone
    tokens_per_s: float
    reason: str = ""

    def as_dict(self) -> dict:
        return {"placement": self.placement, "gamma": self.gamma, "tokens_per_round": round(self.tokens_per_round, 4),
                "round_ms": round(self.round_ms, 4), "tokens_per_s": round(self.tokens_per_s, 2),
                "speedup": round(self.speedup, 4), "parts_ms": {k: round(v, 4) for k, v in self.parts.items()},
                "reason": self.reason}


def round_parts(placement: str, gamma: int, costs: Costs) -> dict[str, float]:
    """The expected round time of `placement` at `gamma`, by part (ms); their sum is the round."""
    if gamma < 1:
        raise ValueError("gamma must be at least 1 (gamma 0 is the target alone)")
    verify = costs.verify(gamma + 1)
    p = guess_holds(costs.alpha, gamma)
    if placement in (SPLIT, SPLIT_OVERLAP):
        d = costs.draft_step_ms
        if placement == SPLIT:
            return {"draft": gamma * d, "verify": verify, "overhead": costs.overhead_ms, "network": 2 * costs.rtt_ms}
        ahead = (gamma + 1) * d
        return {"draft": (1 - p) * gamma * d, "verify": verify, "draft_ahead_excess": max(0.0, ahead - verify),
                "overhead": costs.overhead_ms, "network": (2 - p) * costs.rtt_ms}
    if placement in (COLOCATED, COLOCATED_OVERLAP):
        d = costs.colocated_draft_step_ms
        if d is None:
            raise ValueError("no co-located draft step cost: give the target's device or a measured step")
        if placement == COLOCATED:
            return {"draft": gamma * d, "verify": verify, "overhead": costs.overhead_ms}
        return {"draft": (1 - p) * gamma * d, "verify": verify, "draft_ahead_contention": (gamma + 1) * d,
                "overhead": costs.overhead_ms}
    raise ValueError(f"unknown placement {placement!r}: one of {', '.join(PLACEMENTS)}")


def predict(placement: str, gamma: int, costs: Costs) -> Prediction:
    parts = round_parts(placement, gamma, costs)
    round_ms = sum(parts.values())
    tokens = expected_tokens(costs.alpha, gamma)
    return Prediction(placement, gamma, tokens, round_ms, parts, speedup=tokens * costs.target_ms_per_token / round_ms,
                      tokens_per_s=1000.0 * tokens / round_ms)


def target_alone(costs: Costs) -> Prediction:
    ms = costs.target_ms_per_token
    extra = f" + {costs.target_overhead_ms:.2f} ms overhead" if costs.target_overhead_ms else ""
    return Prediction(TARGET_ALONE, 0, 1.0, ms, {"verify": ms}, 1.0, 1000.0 / ms,
                      reason=f"the baseline: one target step per token ({ms - costs.target_overhead_ms:.2f} ms{extra})")


def best(placement: str, costs: Costs, max_gamma: int = MAX_GAMMA) -> Prediction:
    """The gamma in 1..max_gamma with the highest speedup (the smaller on a tie)."""
    return max((predict(placement, g, costs) for g in range(1, max_gamma + 1)), key=lambda p: (p.speedup, -p.gamma))


def _reason(p: Prediction, costs: Costs) -> str:
    parts = p.parts
    what = ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in parts.items() if v > 0.0005)
    head = f"{p.tokens_per_round:.2f} tokens per {p.round_ms:.2f} ms round ({what})"
    largest = max(parts, key=parts.get)
    if p.placement == COLOCATED_OVERLAP:
        return head + "; drafting ahead shares the one device with verify, so it adds its cost instead of hiding it"
    if p.placement == SPLIT_OVERLAP and parts.get("draft_ahead_excess", 0) > 0:
        return head + "; the draft's gamma+1 steps outlast the verify they should hide behind"
    if p.placement in (SPLIT, SPLIT_OVERLAP) and costs.draft_step_ms >= costs.verify(1):
        step = costs.draft_step_ms
        return head + (f"; a draft step ({step:.2f} ms) costs {step / costs.verify(1):.2f}x a target step: the draft's "
                       "device is too slow for this target")
    if largest == "network":
        return head + "; the network between the hosts is the largest part of the round"
    if largest == "overhead":
        return head + "; the per-round overhead is the largest part of the round: a longer gamma spreads it"
    if p.speedup < 1.0:
        return head + "; the round costs more than the tokens it commits are worth to the target alone"
    return head


def plan(costs: Costs, max_gamma: int = MAX_GAMMA, placements: tuple[str, ...] | None = None) -> list[Prediction]:
    """Every placement at its best gamma, and the target alone, best first, each with its reason."""
    chosen = placements or tuple(p for p in PLACEMENTS
                                 if costs.colocated_draft_step_ms is not None or not p.startswith("colocated"))
    found = []
    for placement in chosen:
        prediction = best(placement, costs, max_gamma)
        reason = _reason(prediction, costs)
        if placement.startswith("colocated") and not costs.colocated_fits:
            reason = "both models' weights do not fit in the target's GPU memory; " + reason
        found.append(Prediction(**{**prediction.__dict__, "reason": reason}))
    found.append(target_alone(costs))
    # What does not fit ranks last whatever its speed.
    return sorted(found, key=lambda p: (p.placement.startswith("colocated") and not costs.colocated_fits, -p.speedup))


def recommendation(ranked: list[Prediction], costs: Costs) -> str:
    top = next(p for p in ranked if not (p.placement.startswith("colocated") and not costs.colocated_fits))
    if top.placement == TARGET_ALONE:
        runner = next((p for p in ranked if p.placement != TARGET_ALONE), None)
        extra = f" (the best, {runner.placement} at gamma {runner.gamma}, is x{runner.speedup:.2f})" if runner else ""
        return f"run the target alone: no placement pays{extra}"
    flag = "--overlap" if top.placement.endswith("+overlap") else "--no-overlap"
    where = "draft and verify on one GPU" if top.placement.startswith("colocated") else "draft and verify on their own devices"
    return (f"{top.placement}: {where}, gamma {top.gamma} (--num-draft-tokens {top.gamma}, orchestrator {flag}), "
            f"x{top.speedup:.2f} over the target alone, {top.tokens_per_s:.1f} tokens/s")


def costs_from_devices(alpha: float, draft_params: float, target_params: float, *, draft_bandwidth_gbs: float,
                       target_bandwidth_gbs: float, draft_dtype_bytes: float = 2.0, target_dtype_bytes: float = 2.0,
                       target_memory_gb: float | None = None, overhead_ms: float = 0.0, rtt_ms: float = 0.0,
                       memory_headroom: float = 0.9) -> Costs:
    """Weight-read floors: draft step on its own device and on the target's, verify flat in k. The co-located
    weights must fit in `memory_headroom` of the target GPU's memory (the rest for KV caches)."""
    draft_bytes, target_bytes = draft_params * draft_dtype_bytes, target_params * target_dtype_bytes
    fits = True
    notes = []
    if target_memory_gb is not None:
        fits = draft_bytes + target_bytes <= memory_headroom * target_memory_gb * 1e9
        notes.append(f"co-located weights {(draft_bytes + target_bytes) / 1e9:.1f} GB of {target_memory_gb:.0f} GB")
    return Costs(alpha=alpha, draft_step_ms=weight_read_ms(draft_params, draft_dtype_bytes, draft_bandwidth_gbs),
                 colocated_draft_step_ms=weight_read_ms(draft_params, draft_dtype_bytes, target_bandwidth_gbs),
                 verify_base_ms=weight_read_ms(target_params, target_dtype_bytes, target_bandwidth_gbs),
                 verify_per_token_ms=0.0,
                 overhead_ms=overhead_ms, rtt_ms=rtt_ms, colocated_fits=fits, notes=tuple(notes))


def fit_verify(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (a, b) of verify(k) = a + b * k through (k, ms) points; one k only: (mean, 0)."""
    if not points:
        raise ValueError("no verify measurements")
    n = len(points)
    mk = sum(k for k, _ in points) / n
    mv = sum(v for _, v in points) / n
    skk = sum((k - mk) ** 2 for k, _ in points)
    if skk == 0:
        return mv, 0.0
    b = max(0.0, sum((k - mk) * (v - mv) for k, v in points) / skk)
    return mv - b * mk, b
