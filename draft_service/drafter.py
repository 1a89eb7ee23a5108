"""Proposing gamma tokens with a causal LM: the ordinary decode loop, one token at a time.

Knows nothing about gRPC; takes a runner, a cache, sampling settings and a generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speculation.sampling import Sampling, logits_to_probs, sample


@dataclass
class ProposeJob:
    cache: object
    append: list[int]
    gamma: int
    sampling: Sampling
    generator: torch.Generator | None


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


def propose_batch(runner, jobs: list[ProposeJob]) -> list[Proposal]:
    """Several sessions' proposals in lockstep: one (ragged) forward per draft position for all of them.
    Each session's tokens and probabilities are the same as `propose` would give it alone, up to the
    float rounding of a batched matrix product."""
    logits = runner.extend_batch([j.cache for j in jobs], [j.append for j in jobs], [1] * len(jobs))
    tokens: list[list[int]] = [[] for _ in jobs]
    rows: list[list[torch.Tensor]] = [[] for _ in jobs]
    active = list(range(len(jobs)))
    for step in range(max(j.gamma for j in jobs)):
        for index, row_logits in zip(active, logits):
            job = jobs[index]
            if job.sampling.greedy:
                tokens[index].append(int(row_logits[0].argmax()))
            else:
                probs = logits_to_probs(row_logits, job.sampling)  # [1, vocab]
                tokens[index].append(int(sample(probs, job.generator)[0]))
                rows[index].append(probs[0])
        active = [i for i in active if len(tokens[i]) < jobs[i].gamma]
        if not active:
            break
        logits = runner.extend_batch([jobs[i].cache for i in active], [[tokens[i][-1]] for i in active],
                                     [1] * len(active))
    return [Proposal(tokens[i], torch.stack(rows[i]) if rows[i] else None) for i in range(len(jobs))]
