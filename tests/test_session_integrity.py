"""No caller can change another's output: a cached prefix is served only to a caller that names its
fingerprint, so overwriting, re-filling or releasing someone else's session costs a re-prefill, never a
token (DESIGN.md, principle 9)."""

from __future__ import annotations

import functools
import random
import threading

import grpc
import pytest
import torch

import draft_service.server as draft_server
import orchestrator.server as orchestrator_server
import verify_service.server as verify_server
from service_common.errors import ResourceExhausted, SessionLost
from serving.model_server import ModelServerSettings
from service_common.session_fingerprint import EMPTY, PrefixChain, extend, fingerprint, session_tag
from serving.sessions import SessionStore
from specdec_api import common_pb2, draft_pb2, draft_pb2_grpc, verify_pb2, verify_pb2_grpc
from tests.conftest import PROMPTS, Stack
from tests.tiny_models import VOCAB

MAX_NEW = 24
ATTACK = (("x-attack", "1"),)


# -- the fingerprint itself ------------------------------------------------------------------------

def test_a_prefix_chain_gives_the_fingerprint_of_every_prefix_even_when_the_sequence_departs():
    rng = random.Random(0)
    chain = PrefixChain(window=10**9)
    tokens: list[int] = []
    for _ in range(200):
        if tokens and rng.random() < 0.3:  # a continuation of unverified drafts that is then dropped
            tokens = tokens[: rng.randrange(len(tokens))]
        tokens = tokens + [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 6))]
        length = rng.randrange(len(tokens) + 1)
        assert chain.at(tokens, length) == fingerprint(tokens[:length])
    assert fingerprint([]) == EMPTY
    assert fingerprint([1, 2]) != fingerprint([2, 1]) != fingerprint([1, 2, 0])
    assert fingerprint([1 << 20]) != fingerprint([0])  # ids are hashed at full width, not a byte of them


def test_a_chain_compares_only_its_window_and_a_reset_repairs_a_departure_further_back():
    """The orchestrator's sequences depart only within the last gamma + 1 tokens; one that departs further
    back than the window gets a stale fingerprint (the service answers session-lost: time, not a token),
    and the client resets its chain before re-sending."""
    chain = PrefixChain(window=4)
    tokens = list(range(1, 21))
    assert chain.at(tokens, 20) == fingerprint(tokens)
    near = tokens[:17] + [99, 98, 97]
    assert chain.at(near, 20) == fingerprint(near)  # within the window: cut back and re-hashed
    far = [42] + near[1:]
    assert chain.at(far, 20) != fingerprint(far)  # beyond it: stale
    chain.reset()
    assert chain.at(far, 20) == fingerprint(far)


def test_the_session_tag_names_a_session_without_revealing_its_id():
    tag = session_tag("0123456789abcdef0123456789abcdef")
    assert len(tag) == 12 and tag not in "0123456789abcdef0123456789abcdef"
    assert tag == session_tag("0123456789abcdef0123456789abcdef") != session_tag("another")


# -- the session store -----------------------------------------------------------------------------

class _Cache:
    """Stands in for a KV cache: the token ids it holds."""

    def __init__(self):
        self.tokens: list[int] = []

    @property
    def length(self):
        return len(self.tokens)

    def crop(self, length):
        del self.tokens[length:]

    def nbytes(self):
        return 4 * len(self.tokens)


def _fill(store, session_id, prefix_len, tokens, fp=b""):
    with store.use(session_id, prefix_len, fp) as session:
        session.cache.tokens += tokens
        session.record(tokens)
        return list(session.cache.tokens)


def test_a_call_naming_another_prefix_is_a_miss_and_leaves_the_session_as_it_was():
    store = SessionStore(_Cache)
    _fill(store, "s", 0, [5, 6, 7, 8])
    for wrong in (b"", fingerprint([5, 6, 9]), b"\x00" * 3):
        with pytest.raises(SessionLost, match="prefix_len=0"):
            _fill(store, "s", 3, [1], wrong)
    # untouched: the owner continues from any prefix it holds
    assert _fill(store, "s", 3, [1], fingerprint([5, 6, 7])) == [5, 6, 7, 1]
    assert _fill(store, "s", 4, [2], fingerprint([5, 6, 7, 1])) == [5, 6, 7, 1, 2]


def test_a_call_that_fails_after_the_check_rolls_the_session_back_to_its_prefix():
    store = SessionStore(_Cache)
    _fill(store, "s", 0, [5, 6, 7])
    with pytest.raises(RuntimeError):
        with store.use("s", 2, fingerprint([5, 6])) as session:
            session.cache.tokens += [9, 9]
            raise RuntimeError("the forward failed")
    assert "s" in store
    assert _fill(store, "s", 2, [4], fingerprint([5, 6])) == [5, 6, 4]


def test_a_call_that_does_not_record_what_it_fed_loses_the_session():
    store = SessionStore(_Cache)
    with store.use("s", 0) as session:
        session.cache.tokens += [1, 2]  # no record(): the store cannot vouch for the cache's content
    assert "s" not in store


# -- attacks on a running deployment -----------------------------------------------------------------

class Attacker(grpc.ServerInterceptor):
    """Sits in the verify service and attacks the session of every generation between its rounds, with
    the session id (which a real attacker would have to learn) and everything the victim's calls carried.

    kinds: overwrite-verify / overwrite-draft (prefix_len 0 and random tokens), release (both services),
    knows-the-prefix (a call naming the victim's true prefix fingerprint, then other tokens after it)."""

    def __init__(self, kind: str, every: int = 2):
        self.kind, self.every = kind, every
        self.verify_stub = self.draft_stub = None
        self.tokens: dict[str, list[int]] = {}  # per session, what its cache holds, as the calls said
        self.calls: dict[str, int] = {}
        self.attacks = 0
        self.rng = random.Random(1)
        self.lock = threading.Lock()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not details.method.endswith("/Verify"):
            return handler
        inner = handler.unary_unary

        def verify(request, context):
            response = inner(request, context)
            if ("x-attack", "1") in tuple(context.invocation_metadata()):
                return response  # the attack's own calls are not victims
            with self.lock:  # (the attack's own call comes through here too, on another thread)
                sid = request.session_id
                held = self.tokens.get(sid, [])[: request.prefix_len]
                self.tokens[sid] = held + list(request.append_tokens) + list(request.draft_token_ids)
                self.calls[sid] = self.calls.get(sid, 0) + 1
                due = self.calls[sid] % self.every == 0
            if due:
                self.attack(sid)
            return response

        return grpc.unary_unary_rpc_method_handler(verify, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)

    def attack(self, sid: str) -> None:
        junk = [self.rng.randrange(1, VOCAB) for _ in range(100)]
        self.attacks += 1
        if self.kind == "overwrite-verify":
            self.verify_stub.Verify(verify_pb2.VerifyRequest(session_id=sid, append_tokens=junk), timeout=30,
                                    metadata=ATTACK)
        elif self.kind == "overwrite-draft":
            self.draft_stub.Propose(draft_pb2.ProposeRequest(session_id=sid, append_tokens=junk, num_draft_tokens=4),
                                    timeout=30)
        elif self.kind == "release":
            for stub in (self.verify_stub, self.draft_stub):
                stub.ReleaseSession(common_pb2.ReleaseSessionRequest(session_id=sid), timeout=30)
        elif self.kind == "knows-the-prefix":
            held = self.tokens[sid]
            keep = max(1, len(held) - 3)  # a true prefix, then tokens the victim never sent
            self.verify_stub.Verify(verify_pb2.VerifyRequest(
                session_id=sid, prefix_len=keep, prefix_fingerprint=fingerprint(held[:keep]),
                append_tokens=junk[:5], draft_token_ids=junk[5:9]), timeout=30, metadata=ATTACK)
        else:
            raise ValueError(self.kind)


def _attacked_stack(tiny, attacker: Attacker) -> Stack:
    verify = verify_server.start(ModelServerSettings(str(tiny.target), host="localhost"), interceptors=[attacker])
    draft = draft_server.start(ModelServerSettings(str(tiny.noisy_draft), host="localhost"))
    attacker.verify_stub = verify_pb2_grpc.VerifyServiceStub(grpc.insecure_channel(f"localhost:{verify.port}"))
    attacker.draft_stub = draft_pb2_grpc.DraftServiceStub(grpc.insecure_channel(f"localhost:{draft.port}"))
    orchestrator = orchestrator_server.start(orchestrator_server.OrchestratorSettings(
        verify=f"localhost:{verify.port}", draft=f"localhost:{draft.port}", host="localhost"))
    return Stack(verify, draft, orchestrator)


@pytest.fixture(scope="module")
def reference(target_model, tokenizer):
    @functools.cache
    def generate(prompt: str) -> list[int]:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = target_model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
        return out[0, inputs["input_ids"].shape[1]:].tolist()
    return generate


@pytest.mark.parametrize("kind", ["overwrite-verify", "overwrite-draft", "release", "knows-the-prefix"])
def test_attacks_on_a_live_session_leave_the_victims_output_equal_to_the_target_alone(tiny, reference, kind):
    attacker = Attacker(kind)
    stack = _attacked_stack(tiny, attacker)
    reprefills = 0
    try:
        with stack.client() as client:
            for prompt in PROMPTS[:8]:
                result = client.generate(prompt, max_new_tokens=MAX_NEW, num_draft_tokens=3)
                assert result.token_ids == reference(prompt), (kind, prompt)
                reprefills += result.stats["reprefills"]
    finally:
        stack.stop()
    assert attacker.attacks >= 8  # every generation was attacked, most of them more than once
    if kind != "knows-the-prefix":  # the victim noticed (a miss) and re-sent its prefix
        assert reprefills >= 8


def test_a_sampled_generation_under_attack_is_the_same_seeded_sample_as_without(tiny):
    """Sampling: the attack may cost re-prefills; the seeded draws, and so the tokens, stay the same."""
    outputs = []
    for kind in (None, "overwrite-verify"):
        attacker = Attacker(kind or "none", every=10**9 if kind is None else 2)
        stack = _attacked_stack(tiny, attacker)
        try:
            with stack.client() as client:
                outputs.append([client.generate(p, max_new_tokens=MAX_NEW, temperature=0.9, seed=11,
                                                num_draft_tokens=3).token_ids for p in PROMPTS[:4]])
        finally:
            stack.stop()
    assert outputs[0] == outputs[1]


def test_the_session_fingerprint_the_services_keep_is_that_of_the_tokens_they_were_sent(tiny):
    """Propose keeps all but its last proposal in the cache, Verify all it was sent: each answers a call
    naming exactly that prefix and misses one naming a prefix one token longer or different."""
    stack = _attacked_stack(tiny, Attacker("none", every=10**9))
    try:
        verify = verify_pb2_grpc.VerifyServiceStub(grpc.insecure_channel(f"localhost:{stack.verify.port}"))
        draft = draft_pb2_grpc.DraftServiceStub(grpc.insecure_channel(f"localhost:{stack.draft.port}"))
        reply = draft.Propose(draft_pb2.ProposeRequest(session_id="d", append_tokens=[5, 6, 7], num_draft_tokens=4),
                              timeout=30)
        held = [5, 6, 7, *reply.token_ids][: reply.cached_len]
        assert reply.cached_len == 3 + len(reply.token_ids) - 1
        ok = draft.Propose(draft_pb2.ProposeRequest(session_id="d", prefix_len=len(held), append_tokens=[1],
                                                    prefix_fingerprint=fingerprint(held), num_draft_tokens=1), timeout=30)
        assert ok.cached_len == len(held) + 1
        v = verify.Verify(verify_pb2.VerifyRequest(session_id="v", append_tokens=[5, 6], draft_token_ids=[8, 9]),
                          timeout=30)
        assert v.cached_len == 4
        for prefix, fp in ((4, fingerprint([5, 6, 8, 8])), (3, fingerprint([5, 6, 9])), (4, b"")):
            with pytest.raises(grpc.RpcError) as caught:
                verify.Verify(verify_pb2.VerifyRequest(session_id="v", prefix_len=prefix, prefix_fingerprint=fp,
                                                       append_tokens=[1]), timeout=30)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert ("specdec-error", "session-lost") in tuple(caught.value.trailing_metadata())
        again = verify.Verify(verify_pb2.VerifyRequest(session_id="v", prefix_len=4, append_tokens=[1],
                                                       prefix_fingerprint=extend(EMPTY, [5, 6, 8, 9])[-1]), timeout=30)
        assert again.cached_len == 5  # the misses left it as it was
    finally:
        stack.stop()


def test_sessions_are_kept_per_caller_so_one_caller_cannot_reach_anothers(tiny):
    """Two callers (here: two peer addresses, as two hosts would be) sending the same session id and even
    the right fingerprint get two separate sessions; neither can use or release the other's."""
    stack = _attacked_stack(tiny, Attacker("none", every=10**9))
    try:
        port = stack.verify.port
        ipv4 = verify_pb2_grpc.VerifyServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        ipv6 = verify_pb2_grpc.VerifyServiceStub(grpc.insecure_channel(f"[::1]:{port}"))
        ipv4.Verify(verify_pb2.VerifyRequest(session_id="shared", append_tokens=[5, 6, 7]), timeout=30)
        continuation = verify_pb2.VerifyRequest(session_id="shared", prefix_len=3, prefix_fingerprint=fingerprint([5, 6, 7]),
                                                append_tokens=[8])
        with pytest.raises(grpc.RpcError) as caught:
            ipv6.Verify(continuation, timeout=30)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "session 'shared' is not held here" in caught.value.details()  # the id it sent, nothing else
        assert not ipv6.ReleaseSession(common_pb2.ReleaseSessionRequest(session_id="shared"), timeout=30).released
        assert ipv4.Verify(continuation, timeout=30).cached_len == 4
        assert ipv4.ReleaseSession(common_pb2.ReleaseSessionRequest(session_id="shared"), timeout=30).released
    finally:
        stack.stop()


def test_a_client_whose_chain_went_stale_recovers_with_one_reprefill(stacks):
    from orchestrator.replicas import ReplicaSet
    from orchestrator.service_clients import VerifySession

    stub = verify_pb2_grpc.VerifyServiceStub(grpc.insecure_channel(f"localhost:{stacks('different').verify.port}"))
    client = VerifySession(ReplicaSet.of_stubs("verify", {"verify:1": stub}), "stale-chain", timeout_s=30)
    client.chain = PrefixChain(window=2)
    first = list(range(10, 30))
    reply = client.verify(first, [])
    client.advance(reply.base, reply.cached_len, 0)
    assert client.synced_len == 20
    departed = [7] + first[1:]  # differs far behind the window: the chain's fingerprint is stale
    reply = client.verify(departed + [5], [])
    assert client.reprefills == 1 and reply.cached_len == 21
    fresh = stub.Verify(verify_pb2.VerifyRequest(session_id="stale-fresh", append_tokens=departed + [5]), timeout=30)
    assert list(reply.argmax_token_ids) == list(fresh.argmax_token_ids)


# -- fair shares of the session budget ----------------------------------------------------------------

class _Sized(_Cache):
    def __init__(self, size=0):
        super().__init__()
        self.size = size

    def nbytes(self):
        return self.size


def test_a_caller_holding_every_slot_busy_does_not_get_another_callers_new_session_refused():
    store = SessionStore(_Cache, max_sessions=4)
    hog = [store.use(("hog", f"s{i}"), 0) for i in range(4)]
    for held in hog:
        held.__enter__()  # four calls in flight: every slot busy
    with store.use(("victim", "v"), 0) as session:  # below its share (2 of 4): admitted over the bound
        session.cache.tokens += [1]
        session.record([1])
    with pytest.raises(ResourceExhausted, match="this caller holding 4"):
        with store.use(("hog", "s4"), 0):  # at its share with nothing of its own idle: refused
            pass
    hog[0].__exit__(None, None, None)  # one of the hog's calls ends: its session, not the victim's, goes
    assert ("hog", "s0") not in store and ("victim", "v") in store and store.stats().live_sessions == 4
    for held in hog[1:]:
        held.__exit__(None, None, None)


def test_memory_over_budget_is_taken_back_from_the_caller_holding_the_most():
    sizes = iter([100, 300, 300, 300, 300])
    store = SessionStore(lambda: _Sized(next(sizes)), max_bytes=1000)
    with store.use(("victim", "v"), 0) as session:  # oldest, so plain LRU would evict it first
        session.record([])
    for i in range(4):
        with store.use(("hog", f"s{i}"), 0) as session:
            session.record([])
    # 1300 bytes of 1000: the hog holds 1200 (over its share of 500), the victim 100
    assert ("victim", "v") in store
    assert store.stats().bytes_used <= 1000 and store.evictions == 1


def test_with_one_caller_eviction_is_least_recently_used():
    store = SessionStore(lambda: _Sized(400), max_bytes=1000)
    for name in ("a", "b", "c"):
        with store.use(name, 0) as session:
            session.record([])
    assert "a" not in store and "b" in store and "c" in store


def test_callers_below_their_share_go_over_the_bound_by_a_quarter_at_most():
    store = SessionStore(_Cache, max_sessions=4)
    held = [store.use(("hog", f"s{i}"), 0) for i in range(4)]
    for use in held:
        use.__enter__()
    newcomer = store.use(("a", "x"), 0)
    newcomer.__enter__()  # the fifth: one over, the headroom of 4 // 4
    with pytest.raises(ResourceExhausted):
        with store.use(("b", "y"), 0):  # another caller below its share, but the headroom is used up
            pass
    for use in [*held, newcomer]:
        use.__exit__(None, None, None)
    assert store.stats().live_sessions <= 4
