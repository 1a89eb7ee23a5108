"""One generation: the draft -> verify -> accept loop, yielding committed tokens round by round.

A round is the six numbered steps of `_round`, each a call to a collaborator: the draft's side and the
overlap (draft_ahead.py), the calls to the services (service_clients.py), the acceptance test
(acceptance.py), streamed text and stop strings (text_stream.py), reporting (round_report.py).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass

from orchestrator.acceptance import accept
from orchestrator.draft_ahead import NO_DRAFTS, DraftAhead, Drafts
from orchestrator.draft_fallback import DraftFallback
from orchestrator.round_report import GenerationReport, RoundDraft, RoundMeasures
from orchestrator.service_clients import DraftSession, VerifySession
from orchestrator.text_stream import TextStream
from service_common.session_fingerprint import session_tag
from specdec_api import orchestrator_pb2
from speculation.sampling import Sampling, seeded_generator
from telemetry.tracing import get_tracer

UNFINISHED = orchestrator_pb2.FINISH_REASON_UNSPECIFIED


@dataclass
class GenerationSpec:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    seed: int
    gamma: int  # fixed gamma, or the starting gamma of an adaptive policy
    stop: list[str]
    eos_token_ids: set[int]
    max_context: int
    adaptive: bool = False
    max_gamma: int = 16
    draft_vocab_size: int = 0  # logits per token of each model; they differ only by padding rows
    target_vocab_size: int = 0  # (orchestrator/deployment.py: check_pair)


@dataclass
class RoundEvent:
    """What one round committed, for the stream."""
    token_ids: list[int]
    text: str
    finish_reason: int
    timing: orchestrator_pb2.RoundTiming


class Generation:
    def __init__(self, spec: GenerationSpec, draft: DraftSession | None, verify: VerifySession,
                 text: TextStream, gamma_policy=None, is_active: Callable[[], bool] = lambda: True,
                 trace_context=None, load_model=None, verify_pool: Executor | None = None):
        """verify_pool: where verify calls run while the draft drafts ahead (the overlap); None: no overlap."""
        self.spec, self.draft, self.verify, self.text = spec, draft, verify, text
        self.gamma_policy = gamma_policy
        self.is_active = is_active
        self.trace_context = trace_context  # the "generation" span's context: parent of every round
        self.generator = seeded_generator(spec.seed)
        self.drafter = None
        if draft is not None:
            fallback = DraftFallback(spec.draft_vocab_size, spec.target_vocab_size)
            fallback.check_readable(spec.prompt_ids)
            self.drafter = DraftAhead(draft, self.generator, fallback, verify_pool)
        self.report = GenerationReport(session_tag(verify.session_id), load_model)
        self.committed = list(spec.prompt_ids)
        self.generated: list[int] = []
        self.finish_reason = UNFINISHED
        self.started = 0.0
        self.wall_s = 0.0

    def rounds(self) -> Iterator[RoundEvent]:
        self.started = time.perf_counter()
        try:
            while self.finish_reason == UNFINISHED and self.is_active():
                yield self._round()
        finally:
            self.wall_s = time.perf_counter() - self.started

    def _round(self) -> RoundEvent:
        with get_tracer().start_as_current_span("round", context=self.trace_context) as span:
            started, draft_time = time.perf_counter(), RoundDraft()
            # 1. Draft: gamma tokens (and draft_probs when sampling) in one call, or those drafted ahead
            #    during the last round's verify.
            drafts = self._draft(self._gamma(), draft_time)
            # 2. Verify: one target forward over the uncached committed tokens and the drafts.
            #    2b. Overlap: meanwhile the draft drafts ahead, as if every draft will be accepted.
            scored, ahead = self._verify(drafts, draft_time)
            # 3. Accept: greedy prefix match, or rejection sampling with the generation's RNG.
            accept_started = time.perf_counter()
            outcome = accept(drafts, scored, self.generator, ahead)
            accept_ms = (time.perf_counter() - accept_started) * 1000
            # 4. Roll back: each service's cache stays valid through the accepted drafts it was fed.
            self.verify.advance(scored.base, scored.cached_len, outcome.accepted)
            if self.drafter is not None:
                self.drafter.roll_back(drafts, ahead, outcome)
            # 5. Commit, cut at EOS / max_new_tokens / stop string, and stream the text that is safe to.
            new_tokens = self._commit(outcome.tokens(drafts.token_ids))
            text = self.text.take(final=self.finish_reason != UNFINISHED)
            # 6. Adapt gamma from what this round measured.
            if self.gamma_policy is not None:
                self.gamma_policy.update(drafts.gamma, outcome.accepted, drafts.drafter)
            round_ms = (time.perf_counter() - started) * 1000
            measured = RoundMeasures(drafts.gamma, outcome, len(new_tokens), draft_time, scored.call, accept_ms, round_ms)
            return RoundEvent(new_tokens, text, self.finish_reason, self.report.round(span, measured))

    def _gamma(self) -> int:
        """The policy's gamma, within what max_new_tokens and the context leave."""
        spec = self.spec
        gamma = self.gamma_policy.gamma if self.gamma_policy else spec.gamma
        remaining = spec.max_new_tokens - len(self.generated)
        room = spec.max_context - len(self.committed) - 1
        return max(0, min(gamma, remaining - 1, room))

    def _draft(self, gamma: int, draft_time: RoundDraft) -> Drafts:
        if self.drafter is None:
            return NO_DRAFTS
        return self.drafter.draft(self.committed, gamma, self.report.counters.rounds, draft_time)

    def _verify(self, drafts: Drafts, draft_time: RoundDraft):
        verify = functools.partial(self.verify.verify, self.committed, drafts.token_ids)
        if self.drafter is None or self.drafter.verify_pool is None or not self._room_to_draft_ahead(drafts.gamma):
            return verify(), None
        return self.drafter.beside_verify(verify, self.committed, drafts, self.report.counters.rounds, draft_time)

    def _room_to_draft_ahead(self, gamma: int) -> bool:
        """Drafting ahead pays only if every draft and the bonus may be committed and the next round may draft."""
        after = len(self.committed) + gamma + 1
        return (gamma > 0 and len(self.generated) + gamma + 1 < self.spec.max_new_tokens
                and after + gamma + 1 <= self.spec.max_context)

    def _commit(self, tokens: list[int]) -> list[int]:
        """The round's tokens up to EOS or max_new_tokens, then up to the one completing a stop string."""
        kept = []
        for token in tokens:
            kept.append(token)
            if token in self.spec.eos_token_ids:
                self.finish_reason = orchestrator_pb2.FINISH_REASON_EOS
                break
            if len(self.generated) + len(kept) >= self.spec.max_new_tokens:
                self.finish_reason = orchestrator_pb2.FINISH_REASON_LENGTH
                break
        stop = self.text.append(kept)
        if stop is not None:
            kept = kept[:stop.kept]
            self.finish_reason = orchestrator_pb2.FINISH_REASON_STOP_STRING
        self.generated.extend(kept)
        self.committed.extend(kept)
        if self.drafter is not None:
            self.drafter.fallback.check_readable(kept)
        return kept

    def stats(self) -> orchestrator_pb2.GenerationStats:
        if self.finish_reason != UNFINISHED:
            self.wall_s = time.perf_counter() - self.started
        draft_calls = self.draft.calls if self.draft else []
        reprefills = self.verify.reprefills + (self.draft.reprefills if self.draft else 0)
        rebinds = self.verify.rebinds + (self.draft.rebinds if self.draft else 0)
        return self.report.stats(len(self.spec.prompt_ids), len(self.generated), self.wall_s, draft_calls,
                                 self.verify.calls, reprefills, rebinds)
