"""Scoring draft tokens with the target: ONE forward pass over the uncached committed tokens and the
gamma drafts, keeping the logits of the last gamma + 1 positions.

Knows nothing about gRPC or about acceptance (that is the orchestrator's decision).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speculation.sampling import Sampling, logits_to_probs


@dataclass
class Scores:
    argmax_token_ids: list[int]  # greedy
    target_probs: torch.Tensor | None  # [gamma + 1, vocab] when sampling


@dataclass
class ScoreJob:
    cache: object
    tokens: list[int]  # uncached committed tokens, then the drafts
    positions: int  # gamma + 1


def forward_batch(runner, jobs: list[ScoreJob]) -> list[torch.Tensor]:
    """ONE forward for all sessions in the batch; each gets its [gamma + 1, vocab] logits."""
    return runner.extend_batch([j.cache for j in jobs], [j.tokens for j in jobs], [j.positions for j in jobs])


def score(logits: torch.Tensor, sampling: Sampling) -> Scores:
    """[gamma + 1, vocab] logits -> what the acceptance test needs."""
    if sampling.greedy:
        return Scores(logits.argmax(dim=-1).tolist(), None)
    return Scores([], logits_to_probs(logits, sampling))
