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


def split_job(job: ScoreJob, n: int) -> tuple[ScoreJob, ScoreJob] | None:
    """Chunked prefill: a job feeding its first n tokens (at most; its logits are not wanted) and one
    feeding the rest and scoring the last gamma + 1 positions, which must all be in the rest; None when
    no token is left to split off. The head keeps one position, not zero: the HF forward reads
    logits_to_keep=0 as "all of them", and the lean one wants at least one row in a pass."""
    head = min(n, len(job.tokens) - job.positions)
    if head < 1:
        return None
    return ScoreJob(job.cache, job.tokens[:head], 1), ScoreJob(job.cache, job.tokens[head:], job.positions)


def forward_batch(runner, jobs: list[ScoreJob]) -> list[torch.Tensor]:
    """ONE forward for all sessions in the batch; each gets its [gamma + 1, vocab] logits."""
    return runner.extend_batch([j.cache for j in jobs], [j.tokens for j in jobs], [j.positions for j in jobs])


def score(logits: torch.Tensor, sampling: Sampling) -> Scores:
    """[gamma + 1, vocab] logits -> what the acceptance test needs."""
    if sampling.greedy:
        return Scores(logits.argmax(dim=-1).tolist(), None)
    return Scores([], logits_to_probs(logits, sampling))
