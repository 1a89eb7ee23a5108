"""Rejection sampling for speculative decoding (Leviathan et al. 2023, Algorithm 1; Chen et al. 2023).

A round's output is `accepted` draft tokens followed by exactly one more token, which is either
  recovered: drawn from norm(max(0, target_probs - draft_probs)) at the first rejected position, or
  bonus:     drawn from target_probs after the last draft token, when every draft token is accepted.
The committed tokens therefore have exactly the target's distribution, whatever the draft proposes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speculation.sampling import coupled_sample, sample


@dataclass(frozen=True)
class RoundOutcome:
    accepted: int  # how many leading draft tokens were kept
    next_token: int  # the recovered or bonus token
    bonus: bool  # True when next_token was drawn after all draft tokens were accepted

    def tokens(self, draft_token_ids: list[int]) -> list[int]:
        return list(draft_token_ids[: self.accepted]) + [self.next_token]


def rejection_sample(
    draft_token_ids: torch.Tensor,  # [gamma] int
    draft_probs: torch.Tensor,  # [gamma, vocab]
    target_probs: torch.Tensor,  # [gamma + 1, vocab]
    generator: torch.Generator | None,
    bonus_seed: int | None = None,  # draw the bonus by coupled_sample with this seed (the draft's guess's)
) -> RoundOutcome:
    gamma = draft_token_ids.shape[0]
    if target_probs.shape[0] != gamma + 1 or draft_probs.shape[0] != gamma:
        raise ValueError(f"shapes: {gamma} drafts, draft_probs {tuple(draft_probs.shape)}, "
                         f"target_probs {tuple(target_probs.shape)}")
    if gamma:
        positions = torch.arange(gamma)
        p = target_probs[positions, draft_token_ids]  # [gamma] target_probs of the draft tokens
        q = draft_probs[positions, draft_token_ids]  # [gamma] draft_probs of the draft tokens
        # Algorithm 1, line 4: accept x_i when r_i <= p(x_i) / q(x_i), r_i ~ U(0, 1).
        r = torch.rand(gamma, generator=generator, dtype=torch.float64)
        accept = r * q.double() <= p.double()
        # A token the draft gave zero probability cannot have been sampled; reject it outright.
        accept &= q > 0
        rejected = (~accept).nonzero()
        if rejected.numel():
            n = int(rejected[0, 0])
            # Line 6: resample from norm(max(0, p - q)).
            residual = (target_probs[n] - draft_probs[n]).clamp_min(0.0)
            if residual.sum() <= 0:  # only reachable through rounding when p == q
                residual = target_probs[n]
            token = int(sample(residual[None], generator)[0])
            return RoundOutcome(accepted=n, next_token=token, bonus=False)
    # Every draft token accepted: one bonus token from the target's next distribution.
    if bonus_seed is not None:
        return RoundOutcome(accepted=gamma, next_token=coupled_sample(target_probs[gamma], bonus_seed), bonus=True)
    token = int(sample(target_probs[gamma][None], generator)[0])
    return RoundOutcome(accepted=gamma, next_token=token, bonus=True)


def greedy_accept(draft_token_ids: list[int], target_argmax_ids: list[int]) -> RoundOutcome:
    """The temperature-0 limit: keep draft tokens while they equal the target's argmax."""
    if len(target_argmax_ids) != len(draft_token_ids) + 1:
        raise ValueError(f"{len(draft_token_ids)} drafts need {len(draft_token_ids) + 1} target tokens, "
                         f"got {len(target_argmax_ids)}")
    n = 0
    while n < len(draft_token_ids) and draft_token_ids[n] == target_argmax_ids[n]:
        n += 1
    return RoundOutcome(accepted=n, next_token=target_argmax_ids[n], bonus=n == len(draft_token_ids))
