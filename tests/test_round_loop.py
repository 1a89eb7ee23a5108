"""The round loop on in-process fakes: draft and verify sessions over a toy model whose next-token logits
are a fixed seeded table, so the target-alone reference is a few lines and nothing but the loop is tested.

The fakes are the real session clients with the call to the service replaced: they keep the clients'
cache bookkeeping, and hold a cache as the services do, so a call that assumes a cache the service does
not hold shows up as a re-prefill (which the exact paths below never need).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
import torch

from orchestrator.draft_fallback import DRAFT_RETRY_AFTER_ROUNDS
from orchestrator.generation import Generation, GenerationSpec, RoundEvent
from orchestrator.replicas import ReplicaSet
from orchestrator.service_clients import (
    CallRecord,
    DraftOutage,
    DraftRefused,
    DraftSession,
    Proposal,
    Scored,
    VerifyFailed,
    VerifySession,
)
from orchestrator.text_stream import TextStream
from specdec_api import orchestrator_pb2
from speculation.sampling import Sampling, coupled_sample, logits_to_probs, sample, seeded_generator
from tests.test_rejection_sampler import chi_square_p

LETTERS = "abcdefgh"
VOCAB = len(LETTERS)
PERIOD = 3  # the logits depend on the last two tokens and the context length modulo this
PROMPT = [1, 4, 2]
GREEDY = Sampling()
SAMPLED = Sampling(temperature=1.0)
CALL = CallRecord(observed_ms=1.0, server_total_ms=0.8, compute_ms=0.6, queue_ms=0.1, bytes=100)


class ToyModel:
    """Next-token logits from a seeded table indexed by (context length mod PERIOD, last two tokens); `like`
    another model, its table plus `noise` times this one's."""

    def __init__(self, seed: int, like: ToyModel | None = None, noise: float = 1.0):
        table = torch.randn(PERIOD, VOCAB, VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2.0
        self.table = table if like is None else like.table + noise * table

    def _logits(self, context: list[int]) -> torch.Tensor:
        return self.table[len(context) % PERIOD, context[-2], context[-1]]

    def probs(self, context: list[int], sampling: Sampling) -> torch.Tensor:  # [VOCAB]
        return logits_to_probs(self._logits(context)[None], sampling)[0]

    def argmax(self, context: list[int]) -> int:
        return int(self._logits(context).argmax())


TARGET = ToyModel(seed=1)
AGREEING = ToyModel(seed=1)  # the target itself: every draft accepted, every guess right under greedy
DISAGREEING = ToyModel(seed=2, like=TARGET, noise=0.5)  # the target blurred: drafts often rejected


def target_alone(max_new_tokens: int, eos: int | None = None) -> list[int]:
    """The slow, obvious reference: greedy decoding with the target, one token at a time."""
    context = list(PROMPT)
    for _ in range(max_new_tokens):
        context.append(TARGET.argmax(context))
        if context[-1] == eos:
            break
    return context[len(PROMPT):]


class LetterTokenizer:
    def decode(self, token_ids, skip_special_tokens=True):
        return "".join(LETTERS[t] for t in token_ids)


def _cache_holds(cache: list[int], sequence: list[int], claimed: int) -> bool:
    return claimed <= len(cache) and cache[:claimed] == sequence[:claimed]


class FakeDraft(DraftSession):
    """Proposes as draft_service/drafters/model.py does (argmax; or, sampling, the first token by coupled_sample on
    the seed and the rest from the seed's generator), its cache ending with all but the last proposed token."""

    def __init__(self, model: ToyModel, sampling: Sampling, min_confidence: float = 0.0, failing_calls=None):
        super().__init__(ReplicaSet.of_stubs("draft", {}), "fake-session", 1.0, sampling, min_confidence)
        self.model = model
        self.failing_calls = failing_calls or {}  # call number -> the DraftFailed it raises
        self.proposals = 0
        self.cache: list[int] = []

    def propose(self, committed: list[int], gamma: int, seed: int) -> Proposal:
        self.proposals += 1
        if self.proposals in self.failing_calls:
            raise self.failing_calls[self.proposals]
        self.reprefills += not _cache_holds(self.cache, committed, self.synced_len)
        context, rows, generator = list(committed), [], seeded_generator(seed)
        for step in range(gamma):
            if self.sampling.greedy:
                probs = self.model.probs(context, Sampling(temperature=1.0))
                token = int(probs.argmax())
            else:
                probs = self.model.probs(context, self.sampling)
                token = coupled_sample(probs, seed) if step == 0 else int(sample(probs[None], generator)[0])
                rows.append(probs)
            context.append(token)
            if probs[token] < self.min_confidence:
                break
        self.cache = context[:-1]
        self.calls.append(CALL)
        return Proposal(context[len(committed):], torch.stack(rows) if rows else None, len(committed),
                        len(self.cache), CALL)


class FakeVerify(VerifySession):
    """Scores every position in one pass, as the verify service does, and caches all it was sent."""

    def __init__(self, model: ToyModel, sampling: Sampling):
        super().__init__(ReplicaSet.of_stubs("verify", {}), "fake-session", 1.0, sampling)
        self.model = model
        self.cache: list[int] = []

    def verify(self, committed: list[int], draft_token_ids: list[int]) -> Scored:
        self.reprefills += not _cache_holds(self.cache, committed, self.synced_len)
        self.cache = committed + draft_token_ids
        contexts = [self.cache[:len(committed) + i] for i in range(len(draft_token_ids) + 1)]
        target_probs = None if self.sampling.greedy else torch.stack([self.model.probs(c, self.sampling) for c in contexts])
        self.calls.append(CALL)
        return Scored([self.model.argmax(c) for c in contexts], target_probs, len(committed), len(self.cache), CALL)


@dataclass
class Run:
    token_ids: list[int]
    text: str  # the streamed pieces, joined
    events: list[RoundEvent]
    draft: FakeDraft | None
    verify: FakeVerify
    stats: orchestrator_pb2.GenerationStats

    @property
    def gammas(self) -> list[int]:
        return [e.timing.num_draft_tokens for e in self.events]

    @property
    def finish_reason(self) -> int:
        return self.events[-1].finish_reason


@pytest.fixture(scope="module")
def verify_pool():
    pool = ThreadPoolExecutor(4, thread_name_prefix="test-verify-call")
    yield pool
    pool.shutdown()


def generate(draft_model: ToyModel | None = AGREEING, *, gamma: int = 3, max_new_tokens: int = 24,
             sampling: Sampling = GREEDY, seed: int = 0, verify_pool=None, stop=(), eos=(), min_confidence=0.0,
             failing_calls=None) -> Run:
    spec = GenerationSpec(prompt_ids=list(PROMPT), max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                          gamma=gamma, stop=list(stop), eos_token_ids=set(eos), max_context=256)
    draft = FakeDraft(draft_model, sampling, min_confidence, failing_calls) if draft_model else None
    verify = FakeVerify(TARGET, sampling)
    generation = Generation(spec, draft, verify, TextStream(LetterTokenizer(), list(stop)), verify_pool=verify_pool)
    events = list(generation.rounds())
    run = Run([t for e in events for t in e.token_ids], "".join(e.text for e in events), events, draft, verify,
              generation.stats())
    assert run.verify.reprefills == 0 and (draft is None or draft.reprefills == 0)  # no call assumed a wrong cache
    return run


# -- greedy: exactly the target alone ---------------------------------------------------------------------

@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlapped"])
@pytest.mark.parametrize("gamma", [1, 2, 4, 7])
@pytest.mark.parametrize("draft", [AGREEING, DISAGREEING], ids=["agreeing", "disagreeing"])
def test_greedy_output_equals_the_target_alone(draft, gamma, overlap, verify_pool):
    run = generate(draft, gamma=gamma, verify_pool=verify_pool if overlap else None)
    assert run.token_ids == target_alone(24)
    assert run.text == "".join(LETTERS[t] for t in target_alone(24))
    assert run.finish_reason == orchestrator_pb2.FINISH_REASON_LENGTH


def test_a_draft_that_often_disagrees_is_rejected_often_and_changes_nothing():
    run = generate(DISAGREEING, gamma=4, max_new_tokens=60)
    assert run.token_ids == target_alone(60)
    assert run.stats.recovered_tokens > run.stats.rounds / 2
    assert 0 < run.stats.acceptance_rate < 0.5


def test_without_a_draft_every_round_is_the_target_alone():
    run = generate(None, max_new_tokens=10)
    assert run.token_ids == target_alone(10)
    assert run.gammas == [0] * 10


def test_a_draft_equal_to_the_target_guesses_every_bonus_so_rounds_need_no_draft_call(verify_pool):
    run = generate(AGREEING, gamma=3, max_new_tokens=40, verify_pool=verify_pool)
    assert run.token_ids == target_alone(40)
    assert run.stats.overlapped_rounds == run.stats.rounds - 1  # only the first round drafted for itself
    assert run.draft.proposals == run.stats.rounds  # the first round's drafts, then a draft-ahead in all but the last


def test_a_right_guess_with_nothing_drafted_past_it_leaves_the_draft_cache_known(verify_pool):
    """A draft that stops after one token proposes only the guess when drafting ahead: its cache then holds
    the drafts but not the guess, and the next call must not assume it does (generate checks re-prefills)."""
    run = generate(AGREEING, gamma=3, max_new_tokens=30, min_confidence=1.01, verify_pool=verify_pool)
    assert run.token_ids == target_alone(30)
    assert set(run.gammas[:-1]) == {0, 1}  # a prepared round with no drafts follows each right guess


# -- sampled: exact in distribution, reproducible by seed -------------------------------------------------

@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlapped"])
def test_a_seed_reproduces_the_whole_sampled_generation(overlap, verify_pool):
    pool = verify_pool if overlap else None
    first, again, other = (generate(DISAGREEING, sampling=Sampling(0.9, top_p=0.95), seed=seed, verify_pool=pool)
                           for seed in (7, 7, 8))
    assert first.token_ids == again.token_ids != other.token_ids


@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlapped"])
def test_the_first_two_sampled_tokens_are_distributed_as_the_target(overlap, verify_pool):
    """gamma 1: the second token is the bonus whenever the draft is accepted, which the overlap draws coupled
    with the draft's guess. Both marginals against the target's exact ones."""
    draws = 1500
    first, second = torch.zeros(VOCAB), torch.zeros(VOCAB)
    for seed in range(draws):
        run = generate(DISAGREEING, gamma=1, max_new_tokens=3, sampling=SAMPLED, seed=seed,
                       verify_pool=verify_pool if overlap else None)
        first[run.token_ids[0]] += 1
        second[run.token_ids[1]] += 1
    first_probs = TARGET.probs(PROMPT, SAMPLED)
    second_probs = sum(first_probs[a] * TARGET.probs(PROMPT + [a], SAMPLED) for a in range(VOCAB))
    assert chi_square_p(first, first_probs) > 1e-3
    assert chi_square_p(second, second_probs) > 1e-3


# -- draft failures never fail a request ------------------------------------------------------------------

def test_a_draft_outage_goes_target_only_for_some_rounds_then_drafts_again():
    run = generate(AGREEING, gamma=2, max_new_tokens=40, failing_calls={1: DraftOutage("UNAVAILABLE: down")})
    assert run.token_ids == target_alone(40)
    assert run.gammas[:DRAFT_RETRY_AFTER_ROUNDS] == [0] * DRAFT_RETRY_AFTER_ROUNDS
    assert run.gammas[DRAFT_RETRY_AFTER_ROUNDS] == 2


def test_an_outage_while_drafting_ahead_keeps_the_rounds_drafts_then_pauses_drafting(verify_pool):
    run = generate(DISAGREEING, gamma=2, max_new_tokens=40, verify_pool=verify_pool,
                   failing_calls={2: DraftOutage("DEADLINE_EXCEEDED: slow")})
    assert run.token_ids == target_alone(40)
    assert run.gammas[0] == 2
    assert run.gammas[1:DRAFT_RETRY_AFTER_ROUNDS] == [0] * (DRAFT_RETRY_AFTER_ROUNDS - 1)
    assert run.gammas[DRAFT_RETRY_AFTER_ROUNDS] == 2


def test_a_draft_refusal_goes_target_only_for_the_rest_of_the_generation():
    run = generate(AGREEING, gamma=2, max_new_tokens=30, failing_calls={1: DraftRefused("OUT_OF_RANGE: too long")})
    assert run.token_ids == target_alone(30)
    assert run.gammas == [0] * 30 and run.draft.proposals == 1


# -- where a generation ends ------------------------------------------------------------------------------

def test_eos_ends_the_generation_inside_a_round_and_is_committed():
    reference = target_alone(24)
    eos = reference[9]
    run = generate(AGREEING, gamma=4, eos=[eos])
    assert run.token_ids == reference[:reference.index(eos) + 1]
    assert run.finish_reason == orchestrator_pb2.FINISH_REASON_EOS


@pytest.mark.parametrize("max_new_tokens", [1, 5, 13])
def test_max_new_tokens_cuts_the_last_round(max_new_tokens, verify_pool):
    run = generate(AGREEING, gamma=4, max_new_tokens=max_new_tokens, verify_pool=verify_pool)
    assert run.token_ids == target_alone(max_new_tokens)
    assert run.finish_reason == orchestrator_pb2.FINISH_REASON_LENGTH


def test_a_stop_string_cuts_the_tokens_after_it_and_the_text_before_it():
    text = "".join(LETTERS[t] for t in target_alone(24))
    stop = text[10:13]
    start = text.index(stop)
    run = generate(AGREEING, gamma=4, stop=[stop])
    assert run.token_ids == target_alone(24)[:start + len(stop)]  # one letter a token
    assert run.text == text[:start]
    assert run.finish_reason == orchestrator_pb2.FINISH_REASON_STOP_STRING


# -- the clients read gRPC statuses, once -----------------------------------------------------------------

class _Status(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return "as told"

    def trailing_metadata(self):
        return ()


class _FailingStub:
    def __init__(self, code: grpc.StatusCode):
        self.error = _Status(code)

    def _fail(self, request, **_):
        raise self.error

    Propose = Verify = _fail


@pytest.mark.parametrize("code, failure", [
    (grpc.StatusCode.UNAVAILABLE, DraftOutage), (grpc.StatusCode.DEADLINE_EXCEEDED, DraftOutage),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, DraftOutage), (grpc.StatusCode.INTERNAL, DraftOutage),
    (grpc.StatusCode.OUT_OF_RANGE, DraftRefused), (grpc.StatusCode.INVALID_ARGUMENT, DraftRefused),
    (grpc.StatusCode.FAILED_PRECONDITION, DraftRefused)])
def test_a_draft_status_is_an_outage_that_may_pass_or_a_refusal(code, failure):
    draft = DraftSession(ReplicaSet.of_stubs("draft", {"a:1": _FailingStub(code)}), "s", timeout_s=1.0)
    with pytest.raises(failure, match=f"{code.name}: as told"):
        draft.propose([1, 2], 3, seed=0)


def test_a_verify_status_leaves_with_the_error_to_pass_on():
    stub = _FailingStub(grpc.StatusCode.PERMISSION_DENIED)
    with pytest.raises(VerifyFailed) as caught:
        VerifySession(ReplicaSet.of_stubs("verify", {"a:1": stub}), "s", timeout_s=1.0).verify([1, 2], [3])
    assert (caught.value.code, caught.value.details) == (grpc.StatusCode.PERMISSION_DENIED, "as told")
