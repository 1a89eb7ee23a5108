"""Scoring draft tokens with the target: ONE forward pass over the uncached committed tokens and the
gamma drafts, keeping the logits of the last gamma + 1 positions, and turning them into what the acceptance
test needs inside the same pass.

Knows nothing about gRPC or about acceptance (that is the orchestrator's decision).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from speculation.sampling import Sampling, logits_to_probs

GREEDY = Sampling(0.0)


@dataclass
class Scores:
    argmax_token_ids: list[int]  # greedy
    target_probs: torch.Tensor | None  # [gamma + 1, vocab] on the host, when sampling


@dataclass
class ScoreJob:
    cache: object
    tokens: list[int]  # uncached committed tokens, then the drafts
    positions: int  # gamma + 1
    sampling: Sampling = GREEDY  # how the reply wants the positions scored
    scored: bool = True  # False: a chunk whose result is thrown away (no scores are made for it)


def split_job(job: ScoreJob, n: int) -> tuple[ScoreJob, ScoreJob] | None:
    """Chunked prefill: a job feeding its first n tokens (at most; its logits are not wanted) and one
    feeding the rest and scoring the last gamma + 1 positions, which must all be in the rest; None when
    no token is left to split off. The head keeps one position, not zero: the HF forward reads
    logits_to_keep=0 as "all of them", and the lean one wants at least one row in a pass."""
    head = min(n, len(job.tokens) - job.positions)
    if head < 1:
        return None
    return (ScoreJob(job.cache, job.tokens[:head], 1, scored=False),
            replace(job, tokens=job.tokens[head:]))


def forward_batch(runner, jobs: list[ScoreJob]) -> list[torch.Tensor]:
    """ONE forward for all sessions in the batch; each gets its [gamma + 1, vocab] logits (on the runner's device)."""
    return runner.extend_batch([j.cache for j in jobs], [j.tokens for j in jobs], [j.positions for j in jobs])


def score_batch(runner, jobs: list[ScoreJob]) -> list[Scores | None]:
    """The verify's pass: ONE forward for all sessions, then each job's scores, already on the host (None for a
    chunk's head). Inside the pass, so the device clock that times it covers the logits -> probabilities work and
    the copy out."""
    logits = forward_batch(runner, jobs)
    wanted = [p for p, job in enumerate(jobs) if job.scored]
    scores: list[Scores | None] = [None] * len(jobs)
    for p, result in zip(wanted, score_all([logits[p] for p in wanted], [jobs[p].sampling for p in wanted])):
        scores[p] = result
    return scores


def score_all(logits: list[torch.Tensor], samplings: list[Sampling]) -> list[Scores]:
    """Several jobs' [gamma + 1, vocab] logits -> their Scores, with ONE host sync for all of them: the greedy
    jobs' argmax ids are read in one .tolist(); the sampled jobs' target_probs (one logits_to_probs per distinct
    setting) are copied out in one tensor, without waiting when a .tolist() follows, which waits for it."""
    if not logits:
        return []
    greedy = [p for p, s in enumerate(samplings) if s.greedy]
    sampled = [p for p, s in enumerate(samplings) if not s.greedy]
    probs_on_host = None
    if sampled:
        blocks, order = [], []
        for setting in dict.fromkeys(samplings[p] for p in sampled):  # each distinct setting, in first-seen order
            members = [p for p in sampled if samplings[p] == setting]
            rows = logits[members[0]] if len(members) == 1 else torch.cat([logits[p] for p in members])
            blocks.append(logits_to_probs(rows, setting))
            order += members
        probs = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
        probs_on_host = probs.to("cpu", non_blocking=bool(greedy)).split([logits[p].shape[0] for p in order])
        probs_of = dict(zip(order, probs_on_host))
    argmax_of = {}
    if greedy:
        rows = logits[greedy[0]] if len(greedy) == 1 else torch.cat([logits[p] for p in greedy])
        ids = rows.argmax(dim=-1).tolist()
        start = 0
        for p in greedy:
            argmax_of[p] = ids[start:start + logits[p].shape[0]]
            start += logits[p].shape[0]
    return [Scores(argmax_of[p], None) if samplings[p].greedy else Scores([], probs_of[p]) for p in range(len(logits))]
