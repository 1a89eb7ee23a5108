"""The draft's side of a round: its drafts (step 1), drafting ahead while the target verifies them (step 2b,
the overlap), and what the draft's cache holds afterwards (step 4).

Drafting ahead proposes gamma + 1 tokens past this round's drafts as if every one will be accepted: a guess
for the bonus token, then the next round's drafts. The guess is coupled_sample(its draft row, seed) and the
bonus is drawn with the same seed, so a draft close to the target guesses it about as often as under greedy
decoding; a right guess leaves the next round its drafts with no draft call on its path.

It alone tells the draft client what the draft's cache holds (`advance`) where a round changes that. Knows
nothing of the target beyond the verify call it is handed and the round's outcome; the RNG is the generation's.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, replace

import torch

from orchestrator.draft_fallback import DraftFallback
from orchestrator.round_report import RoundDraft
from orchestrator.service_clients import DraftFailed, DraftSession, Scored
from speculation.rejection import RoundOutcome


def draw_seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 1 << 62, (1,), generator=generator))


@dataclass
class Drafts:
    """A round's draft tokens, and where the draft's cache stands after proposing them."""
    token_ids: list[int]
    draft_probs: torch.Tensor | None  # [gamma, draft_vocab] when sampling, else None
    base: int  # committed tokens the draft's cache held before these drafts
    cached_len: int  # tokens the draft's cache holds now
    drafter: str = ""  # the kind of drafter that proposed them (the gamma policy learns per drafter)

    @property
    def gamma(self) -> int:
        return len(self.token_ids)

    def first(self, gamma: int) -> Drafts:
        rows = self.draft_probs[:gamma] if self.draft_probs is not None else None
        return replace(self, token_ids=self.token_ids[:gamma], draft_probs=rows)


NO_DRAFTS = Drafts([], None, 0, 0)


@dataclass
class DraftedAhead:
    """What the draft proposed past a round's drafts while the target verified them."""
    guess: int  # for the bonus token
    next_drafts: Drafts  # the next round's, should the guess be right
    seed: int  # the guess is coupled_sample(its row, seed): draw the bonus with it too


class DraftAhead:
    def __init__(self, session: DraftSession, generator: torch.Generator, fallback: DraftFallback,
                 verify_pool: Executor | None = None):
        self.session = session
        self.generator = generator
        self.fallback = fallback
        self.verify_pool = verify_pool  # runs verify calls while this thread drafts ahead; None: no overlap
        self._prepared: Drafts | None = None  # drafted ahead by the last round, its guess right

    def draft(self, committed: list[int], gamma: int, round_index: int, draft_time: RoundDraft) -> Drafts:
        """Step 1: gamma tokens (with draft_probs when sampling) in one call, or those drafted ahead during the
        last round's verify; none while the fallback says so or when the call fails."""
        prepared, self._prepared = self._prepared, None
        if gamma <= 0 or not self.fallback.allows(round_index):
            return NO_DRAFTS
        if prepared is not None:
            draft_time.prepared = True
            return prepared.first(gamma)
        seed = draw_seed(self.generator)
        try:
            proposal = self.session.propose(committed, gamma, seed)
        except DraftFailed as failure:
            self.fallback.failed(failure, round_index)
            return NO_DRAFTS
        draft_time.add_critical(proposal.call, len(proposal.token_ids))
        return Drafts(proposal.token_ids, proposal.draft_probs, proposal.base, proposal.cached_len, proposal.drafter)

    def beside_verify(self, verify: Callable[[], Scored], committed: list[int], drafts: Drafts, round_index: int,
                      draft_time: RoundDraft) -> tuple[Scored, DraftedAhead | None]:
        """Steps 2 and 2b: the verify call on the pool while this thread drafts ahead. Only what the
        draft-ahead call outlasted the verify by is on the round's critical path."""
        started = time.perf_counter()
        verifying = self.verify_pool.submit(contextvars.copy_context().run, verify)
        ahead, call = self._draft_ahead(committed, drafts, round_index)
        scored = verifying.result()
        if call is not None:
            draft_time.add_overlapped(call, (time.perf_counter() - started) * 1000, scored.call.observed_ms)
        return scored, ahead

    def _draft_ahead(self, committed: list[int], drafts: Drafts, round_index: int):
        """gamma + 1 tokens after committed + drafts: the guess, then the next round's drafts."""
        # Drawn whether or not the call succeeds, so a seeded generation does not depend on timing.
        seed = draw_seed(self.generator)
        # The cache holds committed + the drafts but the last (or more, after a prepared round that used fewer
        # than were drafted): keep exactly committed + drafts[:-1], append the last draft.
        self.session.advance(drafts.base, drafts.cached_len, drafts.gamma - 1)
        try:
            proposal = self.session.propose(committed + drafts.token_ids, drafts.gamma + 1, seed)
        except DraftFailed as failure:
            self.fallback.failed(failure, round_index)
            return None, None
        if not proposal.token_ids:  # nothing to guess with (an n-gram drafter found no match): as if not drafted
            return None, proposal.call
        probs = proposal.draft_probs
        next_drafts = Drafts(proposal.token_ids[1:], probs[1:] if probs is not None else None,
                             drafts.base + drafts.gamma + 1, proposal.cached_len, proposal.drafter)
        return DraftedAhead(proposal.token_ids[0], next_drafts, seed), proposal.call

    def roll_back(self, drafts: Drafts, ahead: DraftedAhead | None, outcome: RoundOutcome) -> None:
        """Step 4: the draft's cache stays valid through the accepted drafts it was fed. A right guess was fed
        too, like an accepted draft, and the next round's drafts are already proposed: keep both."""
        if ahead is None:
            if drafts.gamma > 0:
                self.session.advance(drafts.base, drafts.cached_len, outcome.accepted)
            return
        if outcome.bonus and outcome.next_token == ahead.guess:
            self.session.advance(drafts.base, ahead.next_drafts.cached_len, drafts.gamma + 1)
            self._prepared = ahead.next_drafts
        else:
            self.session.advance(drafts.base, ahead.next_drafts.cached_len, outcome.accepted)
