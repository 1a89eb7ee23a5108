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


def score(runner, cache, append: list[int], draft_token_ids: list[int],
          sampling: Sampling) -> Scores:
    positions = len(draft_token_ids) + 1
    logits = runner.extend(cache, append + draft_token_ids, keep=positions)  # [gamma + 1, vocab]
    if sampling.greedy:
        return Scores(logits.argmax(dim=-1).tolist(), None)
    return Scores([], logits_to_probs(logits, sampling))
