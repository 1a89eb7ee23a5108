"""Proposing gamma tokens with a causal LM: the ordinary decode loop, one token at a time.

Knows nothing about gRPC; takes a runner, a cache, sampling settings and a generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speculation.sampling import Sampling, logits_to_probs, sample


@dataclass
class Proposal:
    token_ids: list[int]
    draft_probs: torch.Tensor | None  # [gamma, vocab] when sampling, else None


def propose(runner, cache, append: list[int], gamma: int, sampling: Sampling,
            generator: torch.Generator | None) -> Proposal:
    """Append the committed tokens, then draw gamma tokens. The cache ends holding all but the last
    proposed token (it was never fed back), which the caller learns from the cache length."""
    logits = runner.extend(cache, append, keep=1)  # [1, vocab]
    tokens: list[int] = []
    rows: list[torch.Tensor] = []
    for i in range(gamma):
        if sampling.greedy:
            token = int(logits[0].argmax())
        else:
            probs = logits_to_probs(logits, sampling)  # [1, vocab]
            token = int(sample(probs, generator)[0])
            rows.append(probs[0])
        tokens.append(token)
        if i + 1 < gamma:
            logits = runner.extend(cache, [token], keep=1)
    return Proposal(tokens, torch.stack(rows) if rows else None)
