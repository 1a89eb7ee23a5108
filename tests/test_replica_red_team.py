"""Red team of the replica sets (issue 19): what happens to a generation when replicas hang, die, come back
(the same or another model), flap in DNS, drain, refuse work, or are many orchestrators' at once.

The promises under attack: greedy output is token-identical to the target alone whatever happens to
replicas; no request fails while one healthy replica of each role remains; a draining replica takes no new
session and finishes those it holds; sessions stay put when nothing fails; nothing hangs, and errors are
clear gRPC statuses. Tiny models (tests/conftest.py), real servers on free localhost ports."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import grpc
import pytest

import draft_service.server as draft_server
import orchestrator.server as orchestrator_server
import verify_service.server as verify_server
from orchestrator.deployment import replica_set, same_target
from orchestrator.replica_routing import rendezvous_weight
from orchestrator.replicas import ReplicaSet, ReplicaTargets, parse_targets
from orchestrator.service_clients import VerifyFailed, VerifySession
from serving.model_server import ModelServerSettings
from specdec_api import common_pb2, verify_pb2, verify_pb2_grpc
from specdec_client import Client
from specdec_client.errors import SpecDecError
from tests.conftest import PROMPTS

TOKENS, GAMMA = 24, 3
SOME = PROMPTS[:8]


# -- scaffolding ------------------------------------------------------------------------------------------
class Gate(grpc.ServerInterceptor):
    """What a replica does with its Propose / Verify calls: serve them (mode None), hang in the handler
    until released ("hang": a stuck model worker; its GetModelInfo still answers), or refuse them
    ("exhausted": RESOURCE_EXHAUSTED, a queue that stays full; "broken": INTERNAL, a device that failed;
    "cancelled": CANCELLED, what gRPC reports for some calls in flight when their server stops; "blip":
    UNAVAILABLE for the next call of a session it holds, once).
    Records the sessions it served, and the calls that reached it per session."""

    def __init__(self):
        self.mode: str | None = None
        self.release = threading.Event()
        self.sessions: set[str] = set()
        self.calls = 0
        self.arrivals: dict[str, int] = {}  # calls that reached it per session, served or not
        self.lock = threading.Lock()

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or not details.method.endswith(("/Propose", "/Verify")):
            return handler
        inner = handler.unary_unary

        def run(request, context):
            with self.lock:
                self.arrivals[request.session_id] = self.arrivals.get(request.session_id, 0) + 1
            if self.mode == "hang":
                self.release.wait(120)
            elif self.mode == "exhausted":
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the queue is full (red team)")
            elif self.mode == "blip" and request.prefix_len > 0:  # one call lost in transit, the replica fine
                self.mode = None
                context.abort(grpc.StatusCode.UNAVAILABLE, "Connection reset by peer (red team)")
            elif self.mode == "cancelled":
                context.abort(grpc.StatusCode.CANCELLED, "CANCELLED")
            elif self.mode == "broken":
                context.abort(grpc.StatusCode.INTERNAL, "CUDA error: an illegal memory access (red team)")
            reply = inner(request, context)
            with self.lock:
                self.sessions.add(request.session_id)
                self.calls += 1
            return reply

        return grpc.unary_unary_rpc_method_handler(run, handler.request_deserializer, handler.response_serializer)


class Cluster:
    """Model servers (each with its Gate), orchestrators over them, and a teardown that stops them all."""

    def __init__(self, tiny):
        self.tiny = tiny
        self.servers: list = []
        self.gates: dict[int, Gate] = {}  # port -> gate
        self.orchestrators: list = []
        self.extra_stops: list = []

    def serve(self, role: str, model=None, port: int = 0, **settings):
        gate = Gate()
        module = verify_server if role == "verify" else draft_server
        default = self.tiny.target if role == "verify" else self.tiny.draft
        server = module.start(ModelServerSettings(str(model or default), host="localhost", port=port, **settings),
                              interceptors=[gate])
        self.servers.append(server)
        self.gates[server.port] = gate
        return server

    def restart(self, server, role: str, model=None):
        """Stopped (as a SIGKILL would leave it: in-flight calls cut) and started again at the same port."""
        server.stop(grace=None)
        return self.serve(role, model, port=server.port)

    def orchestrator(self, verify: str, draft: str | None, **settings):
        running = orchestrator_server.start(orchestrator_server.OrchestratorSettings(
            verify=verify, draft=draft, host="localhost", **{"resolve_interval_s": 0.5, **settings}))
        self.orchestrators.append(running)
        return running

    def close(self) -> None:
        for gate in self.gates.values():
            gate.mode = None
            gate.release.set()
        for server in [*self.orchestrators, *self.servers]:
            server.stop(grace=None)
        for stop in self.extra_stops:
            stop()


@pytest.fixture
def cluster(tiny):
    c = Cluster(tiny)
    yield c
    c.close()


def addresses(*servers) -> str:
    return ",".join(f"localhost:{s.port}" for s in servers)


@pytest.fixture(scope="module")
def expected(stacks):
    """Greedy output of the single-replica stack (checked against the target's generate() elsewhere)."""
    with stacks("different").client() as client:
        return {p: client.generate(p, max_new_tokens=TOKENS, num_draft_tokens=GAMMA).token_ids for p in SOME}


def generate_all(orchestrator, prompts, timeout: float = 60.0, **kw) -> dict:
    """prompt -> GenerationResult, or the SpecDecError it failed with."""
    def one(prompt):
        with Client(f"localhost:{orchestrator.port}", timeout=timeout) as client:
            try:
                return client.generate(prompt, max_new_tokens=TOKENS, num_draft_tokens=GAMMA, **kw)
            except SpecDecError as error:
                return error

    with ThreadPoolExecutor(len(prompts)) as pool:
        return dict(zip(prompts, pool.map(one, prompts)))


def assert_exact(results: dict, expected: dict) -> None:
    failed = {p: f"{r.code.name}: {r.details}" for p, r in results.items() if isinstance(r, Exception)}
    assert not failed, f"requests failed although a healthy replica of each role remained: {failed}"
    wrong = {p: (r.token_ids, expected[p]) for p, r in results.items() if r.token_ids != expected[p]}
    assert not wrong, f"greedy output differs from the target alone (got, expected): {wrong}"


def bound_counts(running) -> dict:
    d = running.servicer.deployment
    return {role: {a: b for a, b, _up in s.snapshot()} for role, s in (("verify", d.verify), ("draft", d.draft)) if s}


def session_preferring(first: str, second: str) -> str:
    """A session id that rendezvous hashing sends to `first` over `second` when their loads are equal."""
    return next(f"s{i}" for i in range(1000) if rendezvous_weight(f"s{i}", first) > rendezvous_weight(f"s{i}", second))


def verify_set(spec: str, interval_s: float = 0.5, resolver=None) -> ReplicaSet:
    """The orchestrator's verify replica set (its channels and checks), started."""
    replicas = replica_set("verify", spec, "--verify", verify_pb2_grpc.VerifyServiceStub, same_target, None, None,
                           interval_s)
    if resolver is not None:
        replicas.resolver = resolver
    replicas.wait_ready(30)
    replicas.start()
    return replicas


def reference_argmax(server, committed: list[int], drafts: list[int]) -> list[int]:
    """What the target scores for `committed` + `drafts`, asked of a replica in a session of its own."""
    with grpc.insecure_channel(f"localhost:{server.port}") as channel:
        stub = verify_pb2_grpc.VerifyServiceStub(channel)
        sid = f"reference-{time.monotonic_ns()}"
        reply = stub.Verify(verify_pb2.VerifyRequest(session_id=sid, append_tokens=committed,
                                                     draft_token_ids=drafts), timeout=30)
        stub.ReleaseSession(common_pb2.ReleaseSessionRequest(session_id=sid), timeout=30)
        return list(reply.argmax_token_ids)


COMMITTED = [5, 17, 42, 9, 33, 101, 7, 64]
DRAFTS = [3, 8, 21]


def later_rounds(session: VerifySession, committed: list[int], rounds: int = 3) -> list[int]:
    """A few rounds of a session (fixed drafts, none accepted, the target's token committed); the last verdict."""
    scored = None
    for _ in range(rounds):
        scored = session.verify(committed, DRAFTS)
        session.advance(scored.base, scored.cached_len, 0)
        committed.append(scored.argmax_token_ids[0])
    return scored.argmax_token_ids


class TwoReplicas(NamedTuple):
    first_server: object
    second_server: object
    first: str
    second: str
    replicas: ReplicaSet
    session: VerifySession
    committed: list[int]


def session_on_the_first_of_two(cluster, timeout_s: float, interval_s: float) -> TwoReplicas:
    """Two verify replicas, the orchestrator's set over them, and a session a few rounds into the first."""
    a, b = cluster.serve("verify"), cluster.serve("verify")
    first, second = f"localhost:{a.port}", f"localhost:{b.port}"
    replicas = verify_set(f"{first},{second}", interval_s=interval_s)
    cluster.extra_stops.append(replicas.close)
    committed = list(COMMITTED)
    session = VerifySession(replicas, session_preferring(first, second), timeout_s=timeout_s)
    later_rounds(session, committed)
    assert session.replica_address == first
    return TwoReplicas(a, b, first, second, replicas, session, committed)


class Blackhole:
    """A TCP listener that accepts connections and never says a word (no HTTP/2 preface, no settings)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self):
        self.closed = True
        self.sock.close()
        for conn in self.held:
            conn.close()


# -- hung replicas ----------------------------------------------------------------------------------------
def test_a_verify_replica_hung_in_its_handler_is_left_for_the_healthy_one(cluster, expected):
    """A replica whose Verify never returns (a stuck worker; its GetModelInfo still answers) beside a healthy
    one: the sessions bound to it must move, not fail with DEADLINE_EXCEEDED at rpc_timeout_s."""
    good, stuck = cluster.serve("verify"), cluster.serve("verify")
    draft = cluster.serve("draft")
    cluster.gates[stuck.port].mode = "hang"
    orch = cluster.orchestrator(addresses(good, stuck), addresses(draft), rpc_timeout_s=6.0)
    results = generate_all(orch, SOME[:4])
    assert_exact(results, expected)


def test_a_verify_replica_that_never_speaks_http2_is_not_waited_on_when_the_other_comes_back(cluster):
    """One listed replica is a TCP listener that never answers; the healthy one is away for a second. A
    session that binds while neither answers may try the silent one, but must not wait there until its
    deadline: once the healthy replica is back, the call is served there."""
    good, hole = cluster.serve("verify"), Blackhole()
    cluster.extra_stops.append(hole.close)
    replicas = verify_set(f"localhost:{good.port},127.0.0.1:{hole.port}")
    cluster.extra_stops.append(replicas.close)
    expected = reference_argmax(good, COMMITTED, DRAFTS)
    port = good.port
    good.stop(grace=None)
    deadline = time.monotonic() + 15
    while any(up for _a, _b, up in replicas.snapshot()):  # the refresher saw the healthy one go
        assert time.monotonic() < deadline
        time.sleep(0.05)
    threading.Timer(1.0, lambda: cluster.serve("verify", port=port)).start()
    session = VerifySession(replicas, session_preferring(f"127.0.0.1:{hole.port}", f"localhost:{port}"), timeout_s=6.0)
    started = time.monotonic()
    try:
        scored = session.verify(COMMITTED, DRAFTS)
    except VerifyFailed as failure:
        pytest.fail(f"the call failed after {time.monotonic() - started:.1f} s ({failure}) although the healthy "
                    "replica was back after 1 s")
    assert scored.argmax_token_ids == expected


# -- all replicas away, then one back ------------------------------------------------------------------
def test_every_verify_replica_away_then_the_first_one_tried_comes_back(cluster):
    """Both verify replicas stop; the one the session was on comes back after 1.5 s, the other never does.
    The call must be served by the one that came back within its deadline (it moved off it when the other
    still looked up, and must not rule it out for good)."""
    a, b, first, _, _, session, committed = session_on_the_first_of_two(cluster, timeout_s=8.0, interval_s=30.0)
    expected = reference_argmax(b, committed, DRAFTS)
    port = a.port
    a.stop(grace=None)
    b.stop(grace=None)
    threading.Timer(1.5, lambda: cluster.serve("verify", port=port)).start()
    started = time.monotonic()
    try:
        scored = session.verify(committed, DRAFTS)
    except VerifyFailed as failure:
        pytest.fail(f"the call failed after {time.monotonic() - started:.1f} s ({failure}) although {first} was "
                    "back after 1.5 s")
    assert scored.argmax_token_ids == expected and session.replica_address == first


# -- a replica restarted at the same address -------------------------------------------------------------
def test_a_verify_replica_restarted_with_the_same_target_mid_generation_costs_a_reprefill_only(cluster):
    a, b, _, _, _, session, committed = session_on_the_first_of_two(cluster, timeout_s=15.0, interval_s=0.5)
    expected = reference_argmax(b, committed, DRAFTS)
    cluster.restart(a, "verify")
    scored = session.verify(committed, DRAFTS)
    assert scored.argmax_token_ids == expected
    assert session.reprefills == 1


def test_a_verify_replica_restarted_with_another_target_mid_generation_scores_nothing_more(cluster):
    """The session's replica is restarted at its address with another model (a rollout, a wrong image).
    The next call finds the session lost; re-sending the prefix there would have the wrong model score
    the rest of the generation. Its verdict must be the target's."""
    a, b, _, _, _, session, committed = session_on_the_first_of_two(cluster, timeout_s=15.0, interval_s=30.0)
    expected = reference_argmax(b, committed, DRAFTS)
    cluster.restart(a, "verify", model=cluster.tiny.noisy_draft)
    wrong = reference_argmax(cluster.servers[-1], committed, DRAFTS)
    assert wrong != expected  # the attack is visible
    scored = session.verify(committed, DRAFTS)
    assert scored.argmax_token_ids == expected, f"scored by the other model (its verdict: {wrong})"


def test_a_verify_replica_found_serving_another_target_loses_the_sessions_bound_to_it(cluster):
    """As above, but the refresher has already probed the restarted replica and refused it: the sessions
    still bound to it must leave it too, not only new sessions."""
    a, b, first, second, replicas, session, committed = session_on_the_first_of_two(cluster, timeout_s=15.0, interval_s=30.0)
    expected = reference_argmax(b, committed, DRAFTS)
    cluster.restart(a, "verify", model=cluster.tiny.noisy_draft)
    replicas.refresh()
    assert {addr: up for addr, _b, up in replicas.snapshot()} == {first: False, second: True}
    scored = session.verify(committed, DRAFTS)
    assert scored.argmax_token_ids == expected


def test_new_generations_avoid_a_replica_restarted_with_another_target_before_any_probe(cluster, expected):
    """Between generations (no call failed, so nothing probes it soon) a verify replica is restarted at its
    address with another model. New sessions must not be scored by it."""
    a, b = cluster.serve("verify"), cluster.serve("verify")
    draft = cluster.serve("draft")
    orch = cluster.orchestrator(addresses(a, b), addresses(draft), resolve_interval_s=30.0)
    assert_exact(generate_all(orch, SOME[:4]), expected)
    cluster.restart(b, "verify", model=cluster.tiny.noisy_draft)
    assert_exact(generate_all(orch, SOME), expected)


def test_verify_replicas_hosting_different_weights_under_one_name_are_not_mixed(cluster, tmp_path, expected):
    """A rolling update of the verify pods to new weights at the same path (/models/target in every image):
    old and new replicas report the same model name, vocabulary, context and parameter count. The
    orchestrator must not let both score sessions (here the new weights are the noisy copy)."""
    path = tmp_path / "target"
    shutil.copytree(cluster.tiny.target, path)
    old = cluster.serve("verify", model=path)
    path.rename(tmp_path / "old-image")  # the new image has other weights at the same path (the old replica
    shutil.copytree(cluster.tiny.noisy_draft, path)  # keeps the files it mapped: they are only renamed)
    new = cluster.serve("verify", model=path)
    draft = cluster.serve("draft")
    orch = cluster.orchestrator(addresses(old, new), addresses(draft))
    assert_exact(generate_all(orch, SOME), expected)


# -- a name whose only address is replaced ---------------------------------------------------------------
def test_a_lone_resolved_replica_replaced_by_one_at_a_new_address_takes_the_session(cluster):
    """dns:/// with one verify pod; the pod is replaced (a new IP, as a rescheduled pod gets). The call that
    was waiting for the old address must go to the new one once the name resolves to it, not wait for the
    old one until its deadline."""
    old, new = cluster.serve("verify"), cluster.serve("verify")
    answer = [f"127.0.0.1:{old.port}"]
    replicas = verify_set("dns:///specdec-verify:1", resolver=lambda host, port: list(answer))
    cluster.extra_stops.append(replicas.close)
    committed = list(COMMITTED)
    session = VerifySession(replicas, "s", timeout_s=8.0)
    later_rounds(session, committed)
    expected = reference_argmax(new, committed, DRAFTS)
    old.stop(grace=None)
    threading.Timer(1.0, lambda: answer.__setitem__(0, f"127.0.0.1:{new.port}")).start()
    started = time.monotonic()
    try:
        scored = session.verify(committed, DRAFTS)
    except VerifyFailed as failure:
        pytest.fail(f"the call failed after {time.monotonic() - started:.1f} s ({failure}) although the name "
                    "resolved to a healthy replica after 1 s")
    assert scored.argmax_token_ids == expected and session.replica_address == f"127.0.0.1:{new.port}"


# -- refusals ---------------------------------------------------------------------------------------------
def test_a_verify_replica_refusing_every_call_with_resource_exhausted_is_left_for_an_idle_one(cluster, expected):
    """One verify replica answers every Verify with RESOURCE_EXHAUSTED (a queue that stays full) while the
    other is idle: the sessions bound to the full one must move rather than fail."""
    good, full = cluster.serve("verify"), cluster.serve("verify")
    draft = cluster.serve("draft")
    cluster.gates[full.port].mode = "exhausted"
    orch = cluster.orchestrator(addresses(good, full), addresses(draft))
    assert_exact(generate_all(orch, SOME[:4]), expected)


def test_a_call_cut_with_cancelled_by_a_stopping_replica_moves_to_the_other(cluster, expected):
    """A server that stops (SIGTERM past its drain, or killed) cuts the calls in flight; gRPC reports most as
    UNAVAILABLE but some as CANCELLED ("CANCELLED": ~2 % of the calls in flight in a loop of 15 stops of
    a plain grpc server; a run of this file's tests that stop replicas mid-run failed once this way). The orchestrator
    never cancels its own verify calls, so a CANCELLED one was cut by the replica: the session must move
    as for UNAVAILABLE, not end the generation with CANCELLED."""
    a, b = cluster.serve("verify"), cluster.serve("verify")
    draft = cluster.serve("draft")
    orch = cluster.orchestrator(addresses(a, b), addresses(draft))
    gate = cluster.gates[a.port]
    gate.mode = "cancelled"

    def stop_when_cut():
        deadline = time.monotonic() + 30
        while not gate.arrivals and time.monotonic() < deadline:
            time.sleep(0.005)
        a.stop(grace=None)

    stopper = threading.Thread(target=stop_when_cut)
    stopper.start()
    results = generate_all(orch, SOME[:4])
    stopper.join()
    assert gate.arrivals, "no session was bound to the replica that stopped: the attack did not happen"
    assert_exact(results, expected)


def test_a_verify_replica_whose_device_failed_is_left_for_a_healthy_one(cluster, expected):
    """One verify replica answers every Verify with INTERNAL (its device failed; GetModelInfo, which runs no
    model, still answers) while the other is healthy: a request bound to it must be retried on the other
    before it fails."""
    good, broken = cluster.serve("verify"), cluster.serve("verify")
    draft = cluster.serve("draft")
    cluster.gates[broken.port].mode = "broken"
    orch = cluster.orchestrator(addresses(good, broken), addresses(draft))
    assert_exact(generate_all(orch, SOME[:4]), expected)


def test_when_every_verify_replica_serves_another_target_the_error_says_so(cluster):
    """Every verify replica was restarted with another model, of another vocabulary (one with the same
    tokenizer and limits is followed as a rolling update: tests/test_replica_sets.py): no generation can
    run. It fails with a status whose details name the reason (another model), not "down or draining", and
    within rpc_timeout_s."""
    verify = [cluster.serve("verify") for _ in range(2)]
    draft = cluster.serve("draft")
    orch = cluster.orchestrator(addresses(*verify), addresses(draft), rpc_timeout_s=3.0)
    for server in verify:
        cluster.restart(server, "verify", model=cluster.tiny.other_vocab_draft)
    deadline = time.monotonic() + 15
    while any(up for _a, _b, up in orch.servicer.deployment.verify.snapshot()):  # the probes found them out
        assert time.monotonic() < deadline
        time.sleep(0.05)
    started = time.monotonic()
    result = generate_all(orch, SOME[:1])[SOME[0]]
    assert isinstance(result, SpecDecError), "a generation ran on a replica that serves another target"
    assert time.monotonic() - started < 10
    assert "model" in result.details, f"{result.code.name}: {result.details}"


# -- DNS answers that flap ---------------------------------------------------------------------------------
def test_generations_stay_exact_and_put_while_the_names_resolve_to_flapping_subsets(cluster, expected):
    """Every re-resolution answers a random subset of the replicas (sometimes none): sessions bound to a
    replica that left the answer stay on it (nothing failed: no rebind), and no output changes."""
    import random

    verify = [cluster.serve("verify") for _ in range(3)]
    drafts = [cluster.serve("draft") for _ in range(2)]
    orch = cluster.orchestrator(f"dns:///localhost:{verify[0].port}", f"dns:///localhost:{drafts[0].port}",
                                resolve_interval_s=0.02)
    rng = random.Random(7)

    def flapping(servers):
        def resolve(_host, _port):
            return sorted(f"127.0.0.1:{s.port}" for s in servers if rng.random() < 0.5)
        return resolve

    d = orch.servicer.deployment
    d.verify.resolver, d.draft.resolver = flapping(verify), flapping(drafts)
    time.sleep(0.3)
    results = generate_all(orch, SOME)
    assert_exact(results, expected)
    assert [r.stats["rebinds"] for r in results.values()] == [0] * len(SOME)
    assert all(b == 0 for counts in bound_counts(orch).values() for b in counts.values()), bound_counts(orch)


# -- draining ----------------------------------------------------------------------------------------------
def test_a_session_evicted_from_a_draining_replica_moves_with_its_whole_prefix(cluster):
    """The session's replica drains, then loses the session (evicted): the replica refuses to start it again
    (draining), so it moves to the other replica with its whole prefix, exact, and the drain then ends."""
    a, b, first, second, _, session, committed = session_on_the_first_of_two(cluster, timeout_s=15.0, interval_s=30.0)
    drained = []
    drain = threading.Thread(target=lambda: drained.append(a.drain(20.0)))
    drain.start()
    while not a.servicer.draining:
        time.sleep(0.01)
    later_rounds(session, committed, rounds=1)  # a held session is still served there
    assert session.replica_address == first and session.rebinds == 0
    expected = reference_argmax(b, committed, DRAFTS)
    a.servicer.store.drop_all()  # evicted
    scored = session.verify(committed, DRAFTS)
    assert scored.argmax_token_ids == expected
    assert session.replica_address == second and session.rebinds == 1
    drain.join(10)
    assert drained == [True]


def test_a_session_that_left_a_live_replica_is_released_there(cluster, expected):
    """One call to a live replica is lost in transit (UNAVAILABLE once): the session moves, with its prefix,
    to the other replica. The replica it left still holds its cache: unless told, it keeps it until its TTL
    (600 s), and when it drains, waits for it until --drain-timeout-s. The orchestrator must release it."""
    a, b = cluster.serve("verify"), cluster.serve("verify")
    draft = cluster.serve("draft")
    orch = cluster.orchestrator(addresses(a, b), addresses(draft))
    cluster.gates[a.port].mode = "blip"
    results = generate_all(orch, SOME[:4])
    assert_exact(results, expected)
    assert cluster.gates[a.port].mode is None, "no session was bound to the replica: the attack did not happen"
    assert sum(r.stats["rebinds"] for r in results.values()) == 1
    deadline = time.monotonic() + 5
    while a.servicer.store.stats().live_sessions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert a.servicer.store.stats().live_sessions == 0, "the session it left is still held there"
    started = time.monotonic()
    assert a.drain(10.0) and time.monotonic() - started < 2


# -- many orchestrators ------------------------------------------------------------------------------------
def test_two_orchestrators_lose_a_verify_and_a_draft_replica_mid_run_and_stay_exact(cluster, expected):
    verify = [cluster.serve("verify") for _ in range(2)]
    drafts = [cluster.serve("draft") for _ in range(2)]
    orchs = [cluster.orchestrator(addresses(*verify), addresses(*drafts)) for _ in range(2)]
    gates = [cluster.gates[s.port] for s in verify]

    def kill_when_busy():
        deadline = time.monotonic() + 30
        while min(g.calls for g in gates) < 10 and time.monotonic() < deadline:
            time.sleep(0.005)
        verify[0].stop(grace=None)
        drafts[1].stop(grace=None)

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda o: generate_all(o, SOME[:6]), orchs))
    killer.join()
    for results in runs:
        assert_exact(results, expected)
    assert sum(r.stats["rebinds"] for results in runs for r in results.values()) > 0
    for orch in orchs:
        assert all(b == 0 for counts in bound_counts(orch).values() for b in counts.values()), bound_counts(orch)


# -- the draft set ---------------------------------------------------------------------------------------
def test_every_draft_replica_down_leaves_target_only_generations_exact(cluster, expected):
    verify = cluster.serve("verify")
    drafts = [cluster.serve("draft") for _ in range(2)]
    orch = cluster.orchestrator(addresses(verify), addresses(*drafts), draft_timeout_s=1.0)
    for server in drafts:
        server.stop(grace=None)
    results = generate_all(orch, SOME[:4])
    assert_exact(results, expected)
    sampled = generate_all(orch, SOME[:4], temperature=0.8, seed=3)
    assert all(not isinstance(r, Exception) and len(r.token_ids) == TOKENS for r in sampled.values()), sampled


def test_a_session_that_timed_out_on_a_hung_draft_replica_moves_to_the_healthy_one(cluster, expected):
    """A draft replica whose Propose hangs beside a healthy one. The rounds it times out go target-only, so
    output stays exact and no request fails; but a session bound there must not wait draft_timeout_s on it
    again every DRAFT_RETRY_AFTER_ROUNDS rounds (3 timeouts in 24 tokens, ~1 per 10 tokens: at the default
    5 s, a long generation crawls) while the other draft replica is idle: after a timeout it moves."""
    verify = cluster.serve("verify")
    good, stuck = cluster.serve("draft"), cluster.serve("draft")
    cluster.gates[stuck.port].mode = "hang"
    orch = cluster.orchestrator(addresses(verify), addresses(good, stuck), draft_timeout_s=1.0)
    results = generate_all(orch, SOME[:4])
    assert_exact(results, expected)
    arrivals = cluster.gates[stuck.port].arrivals
    assert arrivals, "no session was bound to the hung replica: the attack did not happen"
    assert max(arrivals.values()) == 1, f"Propose calls that reached the hung replica, per session: {arrivals}"


# -- TLS with resolved names -------------------------------------------------------------------------------
def test_tls_replicas_dialled_by_ip_through_a_dns_name_are_checked_against_the_name(cluster, tmp_path, expected):
    """Certificates name the service (here only "localhost", no IP): replicas resolved from dns:///localhost
    are dialled by IP and must be verified against the name, with no --tls-server-name given."""
    from transport.throwaway_ca import ThrowawayCA

    node = ThrowawayCA().issue(tmp_path, "node", hosts=("localhost",))
    tls = node.tls(require_client_cert=True)
    verify = cluster.serve("verify", tls=tls)
    draft = cluster.serve("draft", tls=tls)
    orch = cluster.orchestrator(f"dns:///localhost:{verify.port}", f"dns:///localhost:{draft.port}",
                                tls=node.tls(require_client_cert=False))
    resolved = {a for a, _b, up in orch.servicer.deployment.verify.snapshot() if up}
    assert f"127.0.0.1:{verify.port}" in resolved
    with Client(f"localhost:{orch.port}", timeout=60, **node.client_kwargs()) as client:
        results = {p: client.generate(p, max_new_tokens=TOKENS, num_draft_tokens=GAMMA) for p in SOME[:3]}
    assert_exact(results, expected)


# -- malformed replica lists ---------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [
    "::1:50051",  # IPv6 without brackets: is 50051 the port or part of the address?
    "host:1:2",
    "localhost:\u0665",  # an Arabic-Indic digit five: str.isdigit() says yes, gRPC cannot dial it
    "bad host:50051",
    "http://host:50051",
    "dns:///a:1,b:2",  # a name cannot hold a list
    "localhost:5,dns:///svc:5",  # dns:/// inside a list would be dialled as one gRPC channel to every pod
])
def test_malformed_replica_lists_are_refused_when_parsed(spec):
    with pytest.raises(ValueError):
        parse_targets(spec, "--verify")


def test_the_cli_refuses_a_malformed_verify_list_at_once(tmp_path):
    """Not after waiting --ready-timeout (120 s) for an address that can never be dialled."""
    from transport import free_port

    try:
        done = subprocess.run([sys.executable, "-m", "specdec_cli", "serve", "orchestrator", "--verify", "host:1:2",
                               "--port", str(free_port()), "--host", "127.0.0.1"], capture_output=True, text=True,
                              timeout=20, env={**os.environ, "GRPC_VERBOSITY": "ERROR"})
    except subprocess.TimeoutExpired:
        pytest.fail("`serve orchestrator --verify host:1:2` was still waiting after 20 s")
    assert done.returncode == 2 and "is not HOST:PORT" in done.stderr, done.stderr[-2000:]


# -- leaks -------------------------------------------------------------------------------------------------
def test_fifty_join_and_leave_cycles_leave_no_channel_or_thread_behind(cluster):
    """Replicas join and leave the name's answer 50 times, some with sessions bound while they leave: every
    channel of a replica that left and holds no session is closed, and no thread is left per cycle."""
    servers = [cluster.serve("verify") for _ in range(3)]
    names = [f"127.0.0.1:{s.port}" for s in servers]
    answer = list(names)
    opened: list = []
    closed: list = []

    def open_channel(address):
        channel = grpc.insecure_channel(address)
        close = channel.close
        channel.close = lambda: (closed.append(channel), close())
        opened.append(channel)
        return channel

    replicas = ReplicaSet("verify", ReplicaTargets(dns_host="specdec-verify", dns_port=1), open_channel,
                          verify_pb2_grpc.VerifyServiceStub, same_target, resolver=lambda host, port: list(answer))
    replicas.wait_ready(30)
    threads = None
    for cycle in range(50):
        answer[:] = [names[cycle % 3]] if cycle % 2 else names  # two of three leave, then all are back
        bound = replicas.bind(f"s{cycle}") if cycle % 5 == 0 else None
        replicas.refresh()
        if bound is not None:
            replicas.unbind(bound)
        if cycle == 9:
            threads = threading.active_count()
    replicas.refresh()
    assert len(opened) > 20  # replicas did leave (channels closed) and join again (new channels)
    assert threading.active_count() <= threads + 1, (threads, threading.active_count())
    live = {id(r.channel) for r in replicas._replicas.values()}
    assert len(live) == len(answer)
    assert {id(c) for c in opened} - {id(c) for c in closed} == live, "channels of replicas that left stayed open"
    replicas.close()
    assert {id(c) for c in opened} == {id(c) for c in closed}
