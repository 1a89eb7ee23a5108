"""The one logits -> probabilities transform, used by the draft, the target and the tests.

Order follows HF transformers' warpers: temperature, then top-k, then top-p. Temperature 0 is the
greedy limit and returns the one-hot distribution of the argmax, so greedy is a special case of the
same maths rather than a separate code path with its own rules.

Temperatures below MIN_SAMPLED_TEMPERATURE are that limit too (vLLM draws the same line at 1e-5): at
1e-40, logits / temperature overflow float32 to inf and the softmax is NaN; at 1e-5 a logit gap of 1e-3
is already a factor e**100, so what is left to sample is the argmax up to exact ties. Every side (the
orchestrator, the draft, the verify) decides greedy here, so they always agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


MIN_SAMPLED_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_SAMPLED_TEMPERATURE

    @property
    def bounds_support(self) -> bool:
        """Whether the distribution is sparse enough to send as (token, prob) pairs."""
        return self.greedy or self.top_k > 0 or self.top_p < 1.0

    def problems(self) -> list[str]:
        """Human-readable reasons these settings are invalid; empty when they are fine."""
        found = []
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):  # also catches NaN
            found.append(f"temperature must be finite and >= 0 (0 = greedy; below {MIN_SAMPLED_TEMPERATURE} is "
                         f"greedy too), got {self.temperature}")
        if self.top_k < 0:
            found.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:  # also catches NaN
            found.append(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        return found


def logits_to_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """[rows, vocab] logits -> [rows, vocab] float32 probabilities under `sampling`."""
    logits = logits.float()
    if sampling.greedy:
        one_hot = torch.zeros_like(logits)
        return one_hot.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    logits = logits / sampling.temperature
    vocab = logits.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]  # [rows, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [rows, vocab]
        # A token stays while the mass of the more likely tokens has not reached top_p; the most
        # likely token always stays.
        drop_sorted = mass_before >= sampling.top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """[rows, vocab] -> [rows] token ids; one draw per row, by inverse CDF: the first id whose float64
    running sum exceeds u * total, u ~ U[0, 1) from `generator`. A zero-probability id never is (its
    running sum equals its predecessor's). torch.multinomial took ~200 us a row at a 4096-id vocabulary
    on this project's CPU, this ~50 us, and it runs at every sampled draft step."""
    rows = probs.detach().to(device="cpu", dtype=torch.float64).reshape(-1, probs.shape[-1]).numpy()
    cdf = np.cumsum(rows, axis=1)
    totals = cdf[:, -1]
    if not (totals > 0).all() or not np.isfinite(totals).all():
        raise ValueError(f"cannot sample from rows whose probabilities sum to {totals.tolist()}")
    uniform = torch.rand(rows.shape[0], generator=generator, dtype=torch.float64).numpy()
    ids = [int(np.searchsorted(cdf[i], uniform[i] * totals[i], side="right")) for i in range(rows.shape[0])]
    return torch.tensor(ids, dtype=torch.long)


def seeded_generator(seed: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for a 64-bit seed. torch's keeps only the low 32 bits of what it is given, so seeds
    that differ only above bit 31 would replay the same draws: fold the high half in first. `stream` picks
    another, independent stream for the same seed (a seed below 2**32 on stream 0 is used as it is)."""
    folded = (seed ^ (seed >> 32)) & 0xFFFFFFFF
    return torch.Generator().manual_seed((folded + stream * 0x9E3779B9) & 0xFFFFFFFF)


def coupled_sample(probs: torch.Tensor, seed: int) -> int:
    """One draw from a [vocab] distribution by the Gumbel-max trick, argmax(log p + G), with the Gumbel
    noise G fixed by `seed`. Alone it is an exact sample of `probs`; two distributions drawn with the same
    seed pick the same token far more often than independent draws do (always, when they are equal).

    The draft guesses the target's bonus token this way while the target verifies (the overlap's
    continuation), and the orchestrator draws the bonus with the same seed, so a draft close to the
    target guesses it right about as often as it would under greedy decoding."""
    generator = seeded_generator(seed, stream=1)  # not the stream a draft seeded alike samples from
    uniform = torch.rand(probs.shape[-1], generator=generator, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(uniform))
    return int((torch.log(probs.double()) + gumbel).argmax())
