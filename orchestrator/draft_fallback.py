"""When a round drafts nothing and the target decodes alone: after the draft failed, or when it cannot read
the committed tokens. Never a failed request: the target alone is exact, only slower.

Knows rounds and the client's exception types, not gRPC statuses (service_clients.py reads those).
"""

from __future__ import annotations

import logging
import math

from orchestrator.service_clients import DraftFailed, DraftOutage

log = logging.getLogger(__name__)

# After an outage (down, overloaded, timed out), drafting resumes this many rounds after the failed one.
DRAFT_RETRY_AFTER_ROUNDS = 8


class DraftFallback:
    def __init__(self, draft_vocab_size: int = 0, target_vocab_size: int = 0):
        self.draft_vocab_size = draft_vocab_size  # logits per token of each model; they differ only by padding
        self.target_vocab_size = target_vocab_size
        self._resume_at: float = 0  # the first round that may draft; inf: none for the rest of the generation

    def allows(self, round_index: int) -> bool:
        return round_index >= self._resume_at

    def failed(self, failure: DraftFailed, round_index: int) -> None:
        """An outage may pass: target-only for a few rounds, then try again. A refusal would be refused again:
        target-only for the rest of the generation."""
        if isinstance(failure, DraftOutage):
            log.warning("draft unavailable (%s); target-only for %d rounds", failure, DRAFT_RETRY_AFTER_ROUNDS)
            self._resume_at = round_index + DRAFT_RETRY_AFTER_ROUNDS
        else:
            log.warning("draft refused (%s); target-only for the rest of this generation", failure)
            self._resume_at = math.inf

    def check_readable(self, tokens: list[int]) -> None:
        """A target with more (padding) logits than the draft can emit an id the draft has no embedding for;
        the draft cannot continue that context, so the rest of the generation runs target-only."""
        limit = self.draft_vocab_size
        if self._resume_at == math.inf or not limit or limit >= self.target_vocab_size:
            return
        beyond = [t for t in tokens if t >= limit]
        if beyond:
            log.warning("token %d is past the draft's %d logits; target-only for the rest of this generation",
                        beyond[0], limit)
            self._resume_at = math.inf
