"""Drafters behind the draft service (draft_service/drafters/): the n-gram lookup alone, the chain's lagging model
cache, and over real gRPC every drafter's greedy output equal to the target alone, its sampled first token
distributed as the target's, and the n-gram service pairing with the target and refusing nothing the model
drafter accepts."""

from __future__ import annotations

import random

import grpc
import pytest
import torch

from draft_service.drafters import build_drafter, drafter_names
from draft_service.drafters.base import ProposeJob, encode_rows, one_hot_rows
from draft_service.drafters.chain import ChainDrafter
from draft_service.drafters.model import ModelDrafter
from draft_service.drafters.ngram import NgramCache, NgramDrafter
from service_common.session_fingerprint import fingerprint
from serving.runtimes import make_runtime
from serving.model_loading import load_model, read_identity
from serving.model_server import ModelServerSettings
from serving.sessions import SessionStore
from specdec_api import common_pb2, draft_pb2, draft_pb2_grpc
from speculation.sampling import Sampling, logits_to_probs
from speculation.wire import decode_probs
from tests.conftest import PROMPTS, start_stack
from tests.test_greedy_exactness import reference  # noqa: F401 - the fixture: the target's own greedy `generate`
from tests.test_rejection_sampler import chi_square_p
from tests.tiny_models import CONTEXT, VOCAB

GREEDY = Sampling(0.0)
MAX_NEW = 24
# Prompts that repeat themselves, so the lookup finds matches in the prompt as well as in what the target writes.
REPEATING = [
    "x = 1\nx = 1\nx = 1\nx =", "def add(a, b):\n    return a + b\n\ndef add(a, b):\n",
    "for i in range(10):\n    print(i)\nfor i in range(10):\n", "import os\nimport sys\nimport os\nimport",
    "self.assertEqual(a, b)\nself.assertEqual(a, b)\nself.assertEqual(", "abc abc abc abc abc",
    "if x:\n    pass\nif x:\n    pass\nif x:\n", "return self.value\nreturn self.value\nreturn self.",
]
EXACTNESS_PROMPTS = PROMPTS[:12] + REPEATING
NO_REPEATS = list(range(100, 130))  # token ids, none twice: nothing to look up
CHUNK = 16  # the n-gram and chain services' prefill chunks


def lookup_by_scan(tokens: list[int], gamma: int, n_min: int, n_max: int) -> list[int]:
    """The lookup's definition, slowly: the longest suffix (n_max down to n_min) that occurred earlier with a
    token after it, its most recent such occurrence, and what followed, copied on into itself past the end."""
    length = len(tokens)
    for n in range(min(n_max, length), n_min - 1, -1):
        suffix = tokens[length - n:]
        for p in range(length - 1, n - 1, -1):  # p: the position after an occurrence, < length
            if tokens[p - n:p] == suffix:
                out = list(tokens)
                for i in range(gamma):
                    out.append(out[p + i])
                return out[length:]
    return []


def cache_of(tokens: list[int], n_min: int = 1, n_max: int = 3) -> NgramCache:
    cache = NgramCache(n_min, n_max)
    cache.extend(tokens)
    return cache


# -- the n-gram lookup alone ---------------------------------------------------------------------------------
def test_the_longest_matching_suffix_wins_over_a_more_recent_shorter_one():
    #         a  b  c  X  ...  c  Y  ...  a  b  c
    tokens = [1, 2, 3, 10, 11, 3, 20, 21, 1, 2, 3]
    assert cache_of(tokens).lookup(2) == [10, 11]  # "1 2 3" -> 10, although "3" was followed by 20 more recently
    assert cache_of(tokens, n_max=1).lookup(2) == [20, 21]


def test_the_most_recent_occurrence_wins():
    tokens = [5, 6, 7, 8, 5, 6, 9, 9, 5, 6]
    assert cache_of(tokens).lookup(3) == [9, 9, 5]


def test_no_match_proposes_nothing():
    assert cache_of(NO_REPEATS).lookup(4) == []
    assert cache_of([]).lookup(4) == [] and cache_of([7]).lookup(4) == []
    # a repeated token is a match for n = 1 but not when the shortest n-gram looked up is 2
    assert cache_of([1, 2, 3, 1]).lookup(2) == [2, 3]
    assert cache_of([1, 2, 3, 1], n_min=2).lookup(2) == []


def test_gamma_caps_the_proposal_and_a_near_match_repeats_its_period():
    tokens = [1, 2, 3, 4, 5, 6, 1, 2]
    for gamma in (1, 2, 3, 8):
        proposal = cache_of(tokens).lookup(gamma)
        assert len(proposal) == gamma and proposal == lookup_by_scan(tokens, gamma, 1, 3)
    assert cache_of(tokens).lookup(8) == [3, 4, 5, 6, 1, 2, 3, 4]  # past the end: the period of 6 goes on
    assert cache_of([9, 4, 4, 4]).lookup(5) == [4, 4, 4, 4, 4]


def test_crop_then_append_keeps_the_index_exact():
    """Random appends and crops (rejected drafts fed while drafting ahead) against the scan and against an
    index built afresh from the same tokens."""
    rng = random.Random(0)
    for n_min, n_max in ((1, 3), (2, 4), (1, 1)):
        cache = NgramCache(n_min, n_max)
        for _ in range(400):
            if cache.length and rng.random() < 0.35:
                cache.crop(rng.randrange(cache.length + 1))
            else:
                cache.extend([rng.randrange(6) for _ in range(rng.randrange(1, 6))])
            gamma = rng.randrange(1, 9)
            assert cache.lookup(gamma) == lookup_by_scan(cache.tokens, gamma, n_min, n_max)
            fresh = cache_of(cache.tokens, n_min, n_max)
            assert cache.index == fresh.index and cache.undo == fresh.undo and cache.marks == fresh.marks


def test_lookup_cost_does_not_grow_with_the_context():
    """At 4k tokens a proposal is a few dict reads, not a scan (the report's number comes from a longer run)."""
    import time

    rng = random.Random(1)
    tokens = [rng.randrange(32000) for _ in range(4096)]
    cache = cache_of(tokens + tokens[1000:1003])
    started = time.perf_counter()
    for _ in range(2000):
        proposal = cache.lookup(8)
    per_call_us = (time.perf_counter() - started) / 2000 * 1e6
    assert proposal == tokens[1003:1011]
    assert per_call_us < 200  # ~1 us here; a scan of 4k tokens per n is ~1000x that


def test_under_sampling_proposals_are_one_hot_rows_sent_sparse(tiny):
    drafter = NgramDrafter(read_identity(str(tiny.target)))
    cache = drafter.new_cache()
    job = ProposeJob(cache, [5, 6, 7, 5, 6], 3, Sampling(1.0), vocab_limit=0, seed=9)
    (proposal,) = drafter.propose_batch([job])
    assert proposal.token_ids == [7, 5, 6] and proposal.drafter == "ngram" and cache.length == 5
    encoded = encode_rows(proposal.draft_probs)
    assert not encoded.dense and len(encoded.values) == 3 * 4  # one float32 per row
    rows = decode_probs(encoded.rows, encoded.cols, encoded.dense, encoded.row_offsets, encoded.col_indices,
                        encoded.values)
    assert rows.shape == (3, VOCAB) and torch.equal(rows, torch.nn.functional.one_hot(torch.tensor([7, 5, 6]), VOCAB).float())
    assert torch.equal(one_hot_rows([1, 1], 4).to_dense(), torch.tensor([[0.0, 1, 0, 0], [0, 1, 0, 0]]))
    # greedy: no rows; ids past vocab_limit are not proposed (the proposal stops before the first)
    (greedy,) = drafter.propose_batch([ProposeJob(cache, [7], 4, GREEDY, vocab_limit=6)])
    assert greedy.token_ids == [5] and greedy.draft_probs is None


def test_the_drafter_flag_names_one_drafter_or_a_chain_that_can_reach_every_member(tiny):
    assert drafter_names("ngram") == ["ngram"] and drafter_names(" ngram , model") == ["ngram", "model"]
    for bad in ("", "llm", "ngram,ngram", "ngram,"):
        with pytest.raises(ValueError, match="--drafter"):
            drafter_names(bad)
    with pytest.raises(ValueError, match="would never be asked"):
        build_drafter(ModelServerSettings(str(tiny.draft), drafter="model,ngram"))
    with pytest.raises(ValueError, match="--ngram-min and --ngram-max"):
        build_drafter(ModelServerSettings(str(tiny.target), drafter="ngram", ngram_min=3, ngram_max=2))


# -- the chain: the model member's cache when n-gram rounds skip it -----------------------------------------
def test_a_chain_feeds_its_model_the_tokens_ngram_rounds_skipped(tiny):
    """Rounds as the orchestrator makes them (prefix_len, fingerprint, append; some drafts accepted, one token
    more committed): whenever the chain's model proposes, it proposes what a model fed the whole committed prefix
    at once proposes; whenever the lookup proposes, what the lookup over the committed tokens gives."""
    loaded = load_model(str(tiny.draft))
    model = ModelDrafter(loaded, make_runtime(loaded.model, loaded.device))
    chain = ChainDrafter([NgramDrafter(loaded, 2, 3), model])
    store = SessionStore(chain.new_cache)
    rng = random.Random(3)
    committed = [5, 6, 7, 8, 5, 6, 40, 41]
    synced = 0
    used = {"ngram": 0, "model": 0}
    while len(committed) < 150:
        gamma = rng.choice([1, 3, 5])
        with store.use("s", synced, fingerprint(committed[:synced]) if synced else b"") as session:
            job = ProposeJob(session.cache, committed[synced:], gamma, GREEDY)
            (proposal,) = chain.propose_batch([job])
            session.record(job.append + proposal.token_ids)
            cached_len = session.length
            members = session.cache.members
            assert all(m.length <= session.length for m in members)
        used[proposal.drafter] += 1
        if proposal.drafter == "model":
            fresh = model.new_cache()
            (expected,) = model.propose_batch([ProposeJob(fresh, list(committed), gamma, GREEDY)])
            assert proposal.token_ids == expected.token_ids, len(committed)
        else:
            assert proposal.token_ids == lookup_by_scan(committed, gamma, 2, 3)
        # the round: some drafts accepted, then a token of the target's: mostly the one 5 back (text that repeats
        # itself, so lookups match after two of them), sometimes a new one
        accepted = rng.randrange(len(proposal.token_ids) + 1)
        base = len(committed)
        committed += proposal.token_ids[:accepted]
        committed.append(committed[-5] if rng.random() < 0.7 else rng.randrange(1, VOCAB))
        synced = base + max(0, min(accepted, cached_len - base))
    assert used["ngram"] >= 5 and used["model"] >= 5, used


# -- over gRPC -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def drafter_stacks(tiny, stacks):
    """A stack per drafter: the model drafter is conftest's noisy-draft stack; ngram reads the target's vocabulary;
    the chain looks up first and falls back to the noisy draft. Their prompts are fed in chunks of 16 tokens, so
    that a chain's prefill chunks (fed to every member) are exercised too."""
    started = {}

    def get(kind: str):
        if kind == "model":
            return stacks("noisy")
        if kind not in started:
            draft, drafter = {"ngram": (tiny.target, "ngram"), "chain": (tiny.noisy_draft, "ngram,model")}[kind]
            started[kind] = start_stack(tiny.target, draft, draft_settings={"drafter": drafter,
                                                                            "prefill_chunk_tokens": CHUNK})
        return started[kind]

    yield get
    for stack in started.values():
        stack.stop()


def _draft_stub(stack):
    return draft_pb2_grpc.DraftServiceStub(grpc.insecure_channel(f"localhost:{stack.draft.port}"))


@pytest.mark.parametrize("gamma", [1, 4, 8])
@pytest.mark.parametrize("drafter", ["model", "ngram", "chain"])
def test_greedy_output_equals_the_target_alone(drafter_stacks, reference, drafter, gamma):  # noqa: F811
    drafted = accepted = 0
    with drafter_stacks(drafter).client() as client:
        for prompt in EXACTNESS_PROMPTS:
            result = client.generate(prompt, max_new_tokens=MAX_NEW, num_draft_tokens=gamma)
            assert result.token_ids == reference(prompt), f"prompt {prompt!r}, drafter {drafter}, gamma {gamma}"
            drafted += result.stats["drafted_tokens"]
            accepted += result.stats["accepted_tokens"]
    assert drafted > 0 and accepted > 0  # the lookup found matches and the target took some of them
    if drafter != "model":
        assert drafter_stacks(drafter).draft.servicer.worker.stats.chunks > 0


def test_ngram_proposes_on_repeats_and_nothing_without(drafter_stacks):
    stack = drafter_stacks("ngram")
    stub = _draft_stub(stack)
    matched = stub.Propose(draft_pb2.ProposeRequest(session_id="repeats", append_tokens=[5, 6, 7, 5, 6],
                                                    num_draft_tokens=4), timeout=10)
    assert list(matched.token_ids) == [7, 5, 6, 7] and matched.drafter == "ngram" and matched.cached_len == 5
    nothing = stub.Propose(draft_pb2.ProposeRequest(session_id="no-repeats", append_tokens=NO_REPEATS,
                                                    num_draft_tokens=4,
                                                    sampling=common_pb2.SamplingParams(temperature=1.0)), timeout=10)
    assert list(nothing.token_ids) == [] and nothing.cached_len == len(NO_REPEATS) and nothing.drafter == "ngram"
    asked = stack.draft.servicer.store.created  # sessions the draft service started: one per Propose here
    with stack.client() as client:
        for temperature in (0.0, 1.0):  # the first round asks and gets nothing; the second has no room to draft
            result = client.generate(NO_REPEATS, max_new_tokens=2, num_draft_tokens=4, temperature=temperature, seed=1)
            assert result.stats["drafted_tokens"] == 0 and len(result.token_ids) == 2
    assert stack.draft.servicer.store.created == asked + 2


def test_the_ngram_service_pairs_with_the_target_and_says_what_it_is(tiny, drafter_stacks):
    stack = drafter_stacks("ngram")
    request = common_pb2.GetModelInfoRequest()
    with grpc.insecure_channel(f"localhost:{stack.verify.port}") as channel:
        from specdec_api import verify_pb2_grpc

        target = verify_pb2_grpc.VerifyServiceStub(channel).GetModelInfo(request, timeout=10)
    info = _draft_stub(stack).GetModelInfo(request, timeout=10)
    assert info.drafter == "ngram(n=1..3)" and info.num_parameters == 0 and info.dtype == ""
    assert (info.vocab_size, info.max_context, list(info.eos_token_ids), info.tokenizer_fingerprint) == \
        (target.vocab_size, target.max_context, list(target.eos_token_ids), target.tokenizer_fingerprint)
    assert info.tokenizer_fingerprint and target.drafter == ""
    chain = _draft_stub(drafter_stacks("chain")).GetModelInfo(request, timeout=10)
    assert chain.drafter == "chain(ngram(n=1..3),model)" and chain.num_parameters > 0
    model = _draft_stub(drafter_stacks("model")).GetModelInfo(request, timeout=10)
    assert model.drafter == "model"
    # a tokenizer directory alone describes the same vocabulary
    alone = read_identity(str(tiny.tokenizer_dir))
    assert (alone.vocab_size, alone.tokenizer_fingerprint) == (VOCAB, target.tokenizer_fingerprint)


def _propose_cases():
    sampled = common_pb2.SamplingParams(temperature=1.0, top_k=5)
    nucleus = common_pb2.SamplingParams(temperature=0.7, top_p=0.5)
    return [
        {"append_tokens": [1, 2], "num_draft_tokens": 3},
        {"append_tokens": [5, 6, 7, 5, 6], "num_draft_tokens": 32},
        {"append_tokens": [5, 6, 7, 5, 6], "num_draft_tokens": 4, "sampling": sampled, "seed": 3},
        {"append_tokens": [5, 6, 7, 5, 6], "num_draft_tokens": 4, "sampling": nucleus, "seed": 1 << 40},
        {"append_tokens": [1, 2], "num_draft_tokens": 4, "min_confidence": 0.99},
        {"append_tokens": [5, 6, 5], "num_draft_tokens": 4, "vocab_limit": VOCAB},
        {"append_tokens": [5, 6, 5], "num_draft_tokens": 4, "vocab_limit": 6},
        {"append_tokens": [1] * (CONTEXT - 3), "num_draft_tokens": 4},  # reaches the context exactly
        {"append_tokens": [1] * (CONTEXT - 2), "num_draft_tokens": 4},  # past it
        {"append_tokens": [1], "num_draft_tokens": 0},
        {"append_tokens": [VOCAB], "num_draft_tokens": 2},
        {"append_tokens": [], "num_draft_tokens": 2},
        {"append_tokens": [1], "num_draft_tokens": 2, "min_confidence": 1.5},
        {"append_tokens": [1], "num_draft_tokens": 2, "sampling": common_pb2.SamplingParams(temperature=-1)},
        {"session_id": "", "append_tokens": [1], "num_draft_tokens": 2},
        {"prefix_len": 4, "append_tokens": [1], "num_draft_tokens": 2},  # not held
    ]


def _outcome(stub, fields: dict, session: str):
    try:
        stub.Propose(draft_pb2.ProposeRequest(**{"session_id": session, **fields}), timeout=10)
        return "ok"
    except grpc.RpcError as error:
        return error.code()


def test_the_ngram_service_refuses_nothing_the_model_drafter_accepts(drafter_stacks):
    model, ngram = _draft_stub(drafter_stacks("model")), _draft_stub(drafter_stacks("ngram"))
    for i, fields in enumerate(_propose_cases()):
        assert _outcome(ngram, fields, f"case-{i}") == _outcome(model, fields, f"case-{i}"), fields
    # a session goes on from the prefix it names, with its fingerprint, on both
    for stub in (model, ngram):
        stub.Propose(draft_pb2.ProposeRequest(session_id="on", append_tokens=[5, 6, 7], num_draft_tokens=2), timeout=10)
        on = stub.Propose(draft_pb2.ProposeRequest(session_id="on", prefix_len=3, prefix_fingerprint=fingerprint([5, 6, 7]),
                                                   append_tokens=[5, 6], num_draft_tokens=2), timeout=10)
        assert on.cached_len >= 5
    assert list(on.token_ids) == [7, 5]


def _lookup_prompt(target_model) -> tuple[list[int], int]:
    """[a, b, c, a, b]: the lookup proposes c. Of a few (a, b), with c the token the target likes best there, the
    one where it likes it most, so that the first token is accepted in some draws (the tiny target's rows are
    flat: a few percent at most) and drawn from the residual in the others."""
    best = (0.0, [], 0)
    for a, b in ((40, 41), (70, 90), (120, 7), (200, 201)):
        batch = torch.tensor([[a, b, c, a, b] for c in range(1, VOCAB)])
        with torch.inference_mode():
            probs = target_model(batch).logits[:, -1].softmax(-1)
        picked = probs[torch.arange(VOCAB - 1), torch.arange(1, VOCAB)]
        c = int(picked.argmax()) + 1
        best = max(best, (float(picked[c - 1]), [a, b, c, a, b], c))
    assert best[0] > 0.02, best
    return best[1], best[2]


def _first_token_counts(stack, prompt: list[int], draws: int) -> tuple[torch.Tensor, int]:
    counts = torch.zeros(VOCAB)
    accepted = 0
    with stack.client() as client:
        for seed in range(draws):
            result = client.generate(prompt, max_new_tokens=2, num_draft_tokens=1, seed=seed, temperature=1.0)
            counts[result.token_ids[0]] += 1
            accepted += result.stats["accepted_tokens"]
    return counts, accepted


@pytest.mark.parametrize("drafter", ["ngram", "chain"])
def test_sampled_first_token_is_distributed_as_the_target_alone(drafter_stacks, target_model, drafter):
    """The lookup's proposal is a point mass; the chain's model fallback a distribution: both keep the emitted
    token distributed as the target's (a chi-square test over seeds). For the chain, a prompt the lookup matches
    and one it does not (so its model proposes)."""
    matched, looked_up = _lookup_prompt(target_model)
    prompts = [matched] + ([NO_REPEATS[:6]] if drafter == "chain" else [])
    draws = 400 if drafter == "ngram" else 300
    for prompt in prompts:
        with torch.inference_mode():
            target_probs = logits_to_probs(target_model(torch.tensor([prompt])).logits[:, -1], Sampling(1.0))[0]
        counts, accepted = _first_token_counts(drafter_stacks(drafter), prompt, draws)
        assert 0 < accepted < draws, (prompt, accepted)  # acceptance and the residual both happened
        if prompt is matched:
            assert counts[looked_up] >= accepted  # every accepted first token is the looked-up one
        assert counts[target_probs == 0].sum() == 0
        assert chi_square_p(counts, target_probs) > 1e-3, prompt


def test_drafting_ahead_that_proposes_nothing_is_no_guess():
    """A drafter may answer a draft-ahead call with no tokens (the n-gram lookup finds no match after the drafts):
    the round goes on without a guess and the draft's cache is rolled back as for a round not drafted ahead."""
    from concurrent.futures import ThreadPoolExecutor

    from orchestrator.draft_ahead import DraftAhead, Drafts
    from orchestrator.draft_fallback import DraftFallback
    from orchestrator.round_report import RoundDraft
    from orchestrator.service_clients import CallRecord, Proposal, Scored
    from speculation.rejection import greedy_accept

    class Session:
        advanced = []

        def advance(self, base, cached_len, accepted):
            self.advanced.append((base, cached_len, accepted))

        def propose(self, committed, gamma, seed):
            return Proposal([], None, len(committed), len(committed), CallRecord(1.0, 0.5, 0.1, 0.0, 10))

    call = CallRecord(2.0, 1.0, 0.5, 0.0, 20)
    with ThreadPoolExecutor(1) as pool:
        ahead = DraftAhead(Session(), torch.Generator().manual_seed(0), DraftFallback(), verify_pool=pool)
        drafts = Drafts([7, 8], None, base=5, cached_len=5)
        draft_time = RoundDraft()
        scored, guessed = ahead.beside_verify(lambda: Scored([7, 8, 9], None, 5, 8, call), [1, 2, 3, 4, 5], drafts, 0,
                                              draft_time)
    assert guessed is None and scored.argmax_token_ids == [7, 8, 9] and draft_time.overlapped
    ahead.roll_back(drafts, guessed, greedy_accept(drafts.token_ids, scored.argmax_token_ids))
    assert Session.advanced[-1] == (5, 5, 2)  # the drafts' own cache report: 5 tokens held, nothing past them


def test_serve_draft_refuses_an_unknown_drafter_and_other_roles_refuse_the_flag(tiny):
    from tests.test_cli import specdec

    unknown = specdec("serve", "draft", "--model", str(tiny.target), "--drafter", "llm", "--port", "0")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert "draft service refused to start: --drafter must be one of model, ngram" in unknown.stderr
    verify = specdec("serve", "verify", "--model", str(tiny.target), "--ngram-max", "4", "--port", "0")
    assert verify.returncode == 2 and "--drafter, --ngram-min and --ngram-max are the draft service's" in verify.stderr
