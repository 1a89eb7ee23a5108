"""Step 3 of a round: the acceptance test on what the two services returned, over the target's ids.

The maths is speculation/rejection.py; this picks greedy or rejection sampling, puts the draft's rows over
the target's ids (their vocabularies may differ by padding) and couples the bonus with the draft's guess.
"""

from __future__ import annotations

import torch

from orchestrator.draft_ahead import DraftedAhead, Drafts
from orchestrator.service_clients import Scored
from speculation.rejection import RoundOutcome, greedy_accept, rejection_sample


def over_target_ids(draft_probs: torch.Tensor, target_vocab: int) -> torch.Tensor:
    """Draft rows [n, draft_vocab] as rows over the target's ids [n, target_vocab]. A larger draft samples
    under vocab_limit, so its rows are already the target's width; a smaller one gives zero probability
    to the target's extra (padding) ids. Wider rows are cut only if their mass there is zero."""
    width = draft_probs.shape[1]
    if width > target_vocab:
        if draft_probs[:, target_vocab:].sum() > 0:
            raise ValueError(f"draft rows put mass on ids past the target's {target_vocab}; "
                             "the draft must propose under vocab_limit")
        return draft_probs[:, :target_vocab]
    if width < target_vocab:
        return torch.nn.functional.pad(draft_probs, (0, target_vocab - width))
    return draft_probs


def accept(drafts: Drafts, scored: Scored, generator: torch.Generator, ahead: DraftedAhead | None) -> RoundOutcome:
    """Greedy prefix match when the verify sent no target_probs (temperature 0), else rejection sampling with
    the generation's RNG.

    With a guess drafted ahead, the bonus shares its noise (the guess's seed: speculation/sampling.py's race keys
    each id's noise by the id alone, so a draft row narrower or wider than the target's draws the same noise for
    the ids both have), so the draft's guess matches it as often as the two distributions allow; it is an exact
    draw from the target's row all the same."""
    if scored.target_probs is None:
        return greedy_accept(drafts.token_ids, scored.argmax_token_ids)
    target_vocab = scored.target_probs.shape[1]
    draft_probs = drafts.draft_probs if drafts.draft_probs is not None else torch.zeros(0, target_vocab)
    return rejection_sample(torch.tensor(drafts.token_ids, dtype=torch.long), over_target_ids(draft_probs, target_vocab),
                            scored.target_probs, generator, bonus_seed=ahead.seed if ahead is not None else None)
