"""Several draft and verify replicas behind one orchestrator: sessions spread by load and stay on their
replica; a replica that goes away costs a re-prefill elsewhere, never a failed request or a wrong token."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

import draft_service.server as draft_server
import orchestrator.server as orchestrator_server
import verify_service.server as verify_server
from orchestrator.replicas import ReplicaSet, ReplicaTargets, parse_targets, resolve_dns
from serving.model_server import ModelServerSettings
from specdec_api import common_pb2, verify_pb2_grpc
from specdec_client import Client
from tests.conftest import PROMPTS


class SessionLog(grpc.ServerInterceptor):
    """Which session ids each Propose / Verify served, per replica."""

    def __init__(self):
        self.sessions: set[str] = set()
        self.calls = 0
        self.lock = threading.Lock()

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.endswith(("/Propose", "/Verify")):
            return handler
        inner = handler.unary_unary

        def record(request, context):
            reply = inner(request, context)  # a call refused (e.g. draining) raises: not served
            with self.lock:
                self.sessions.add(request.session_id)
                self.calls += 1
            return reply

        return grpc.unary_unary_rpc_method_handler(record, handler.request_deserializer, handler.response_serializer)


class Replicas:
    """Two (or more) replicas of each role, in-process, each with its SessionLog."""

    def __init__(self, tiny, verify: int = 2, draft: int = 2, verify_model=None):
        self.verify_logs = [SessionLog() for _ in range(verify)]
        self.draft_logs = [SessionLog() for _ in range(draft)]
        self.verify = [verify_server.start(ModelServerSettings(str(verify_model or tiny.target), host="localhost"),
                                           interceptors=[log]) for log in self.verify_logs]
        self.draft = [draft_server.start(ModelServerSettings(str(tiny.draft), host="localhost"), interceptors=[log])
                      for log in self.draft_logs]
        self.orchestrator = None

    def addresses(self, role: str) -> str:
        return ",".join(f"localhost:{s.port}" for s in getattr(self, role))

    def start_orchestrator(self, **settings):
        self.orchestrator = orchestrator_server.start(orchestrator_server.OrchestratorSettings(
            verify=settings.pop("verify", self.addresses("verify")), draft=settings.pop("draft", self.addresses("draft")),
            host="localhost", resolve_interval_s=settings.pop("resolve_interval_s", 0.5), **settings))
        return self.orchestrator

    def client(self) -> Client:
        return Client(f"localhost:{self.orchestrator.port}", timeout=120)

    def stop(self) -> None:
        for server in [self.orchestrator, *self.verify, *self.draft]:
            if server is not None:
                server.stop(grace=None)


@pytest.fixture
def replicas(tiny):
    started = []

    def make(**kw) -> Replicas:
        r = Replicas(tiny, **kw)
        started.append(r)
        return r

    yield make
    for r in started:
        r.stop()


@pytest.fixture(scope="module")
def expected(stacks):
    """Greedy output of the single-replica stack (itself checked against generate() elsewhere)."""
    with stacks("different").client() as client:
        return {p: client.generate(p, max_new_tokens=24, num_draft_tokens=3).token_ids for p in PROMPTS[:16]}


def generate_all(client: Client, prompts, **kw) -> dict:
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = pool.map(lambda p: client.generate(p, max_new_tokens=24, num_draft_tokens=3, **kw), prompts)
        return dict(zip(prompts, results))


def test_sessions_spread_over_both_replicas_of_each_role_and_stay_on_one(replicas, expected):
    r = replicas()
    r.start_orchestrator()
    with r.client() as client:
        results = generate_all(client, list(expected))
    assert {p: res.token_ids for p, res in results.items()} == expected
    assert all(res.stats["reprefills"] == 0 and res.stats["rebinds"] == 0 for res in results.values())
    for logs in (r.verify_logs, r.draft_logs):
        served = [log.sessions for log in logs]
        assert not served[0] & served[1], "a session was served by two replicas of one role"
        total = len(served[0] | served[1])
        assert total == len(expected)
        assert all(len(s) >= 0.3 * total for s in served), [len(s) for s in served]


def test_losing_a_verify_and_a_draft_replica_mid_run_leaves_every_generation_exact(replicas, expected):
    r = replicas()
    r.start_orchestrator()
    prompts = list(expected)
    started = threading.Event()

    def kill_when_busy():
        while min(log.calls for log in r.verify_logs) < 20:  # both replicas are mid-generation
            started.wait(0.01)
        r.verify[0].stop(grace=None)
        r.draft[1].stop(grace=None)

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    with r.client() as client:
        results = generate_all(client, prompts)
    killer.join()
    assert {p: res.token_ids for p, res in results.items()} == expected
    assert all(res.finish_reason == "length" for res in results.values())
    assert sum(res.stats["rebinds"] for res in results.values()) > 0
    # Afterwards new sessions go only to the replicas that are left, with no rebind.
    with r.client() as client:
        after = generate_all(client, prompts[:4])
    assert {p: res.token_ids for p, res in after.items()} == {p: expected[p] for p in prompts[:4]}
    assert all(res.stats["rebinds"] == 0 for res in after.values())


def test_a_verify_replica_serving_another_target_takes_no_session(replicas, tiny, expected):
    r = replicas(verify=1)
    odd = verify_server.start(ModelServerSettings(str(tiny.noisy_draft), host="localhost"))
    try:
        r.start_orchestrator(verify=f"localhost:{r.verify[0].port},localhost:{odd.port}")
        with r.client() as client:
            results = generate_all(client, list(expected)[:6])
        assert {p: res.token_ids for p, res in results.items()} == {p: expected[p] for p in list(expected)[:6]}
        states = {a: up for a, _bound, up in r.orchestrator.servicer.deployment.verify.snapshot()}
        assert states == {f"localhost:{r.verify[0].port}": True, f"localhost:{odd.port}": False}
    finally:
        odd.stop(grace=None)


def test_a_draining_replica_finishes_its_sessions_and_takes_no_new_one(replicas, expected):
    r = replicas()
    r.start_orchestrator()
    prompts = list(expected)
    with r.client() as client:
        generate_all(client, prompts[:4])  # both replicas have answered: their loads are known
        draining = r.verify[0]
        drain = threading.Thread(target=draining.drain, args=(5.0,))
        before = len(r.verify_logs[0].sessions)
        drain.start()
        results = generate_all(client, prompts[4:12])
        drain.join()
    assert {p: res.token_ids for p, res in results.items()} == {p: expected[p] for p in prompts[4:12]}
    assert len(r.verify_logs[0].sessions) == before  # no new session reached the draining replica
    assert all(res.stats["reprefills"] == 0 for res in results.values())


def test_dns_names_resolve_to_every_replica_address(replicas, expected):
    r = replicas(verify=1, draft=1)
    r.start_orchestrator(verify=f"dns:///localhost:{r.verify[0].port}", draft=f"dns:///localhost:{r.draft[0].port}")
    with r.client() as client:
        results = generate_all(client, list(expected)[:4])
    assert {p: res.token_ids for p, res in results.items()} == {p: expected[p] for p in list(expected)[:4]}
    resolved = {a for a, _bound, _up in r.orchestrator.servicer.deployment.verify.snapshot()}
    assert resolved == set(resolve_dns("localhost", r.verify[0].port)) and f"127.0.0.1:{r.verify[0].port}" in resolved


def test_replicas_join_and_leave_as_the_name_resolves(tiny):
    """The refresher follows the resolver: a new address is dialled and probed, a vanished one is dropped
    once no session is bound to it."""
    servers = [verify_server.start(ModelServerSettings(str(tiny.target), host="localhost")) for _ in range(2)]
    answer = [f"localhost:{servers[0].port}"]
    try:
        replicas = ReplicaSet("verify", ReplicaTargets(dns_host="specdec-verify", dns_port=1),
                              lambda a: grpc.insecure_channel(a), verify_pb2_grpc.VerifyServiceStub,
                              resolver=lambda host, port: list(answer))
        replicas.wait_ready(30)
        assert [a for a, _b, up in replicas.snapshot() if up] == answer
        answer.append(f"localhost:{servers[1].port}")
        replicas.refresh()
        assert [a for a, _b, up in replicas.snapshot() if up] == sorted(answer)
        bound = replicas.bind("s", exclude=[answer[1]])
        assert bound.address == answer[0]
        answer.pop(0)
        replicas.refresh()  # gone from the name, still bound: kept for its session, but takes no new one
        assert replicas.bind("t").address == answer[0]
        assert sorted((a, up) for a, _b, up in replicas.snapshot()) == sorted([(bound.address, False), (answer[0], True)])
        replicas.unbind(bound)
        assert [a for a, _b, _up in replicas.snapshot()] == answer
        answer.clear()  # a name that resolves to nothing for a moment keeps what it had
        replicas.refresh()
        assert [a for a, _b, _up in replicas.snapshot()] == [f"localhost:{servers[1].port}"]
        replicas.close()
    finally:
        for server in servers:
            server.stop(grace=None)


@pytest.mark.parametrize("spec, problem", [
    ("localhost", "is not HOST:PORT"), ("a:1,b", "is not HOST:PORT"), ("dns://8.8.8.8/svc:50052", "not supported"),
    ("dns:///svc", "is not HOST:PORT"), (" , ", "names no address"), ("a:99999", "is not HOST:PORT")])
def test_malformed_replica_lists_are_refused_with_a_reason(spec, problem):
    with pytest.raises(ValueError, match=problem):
        parse_targets(spec, "--verify")


def test_replica_lists_parse_to_addresses_or_a_name():
    assert parse_targets("a:1, b:2,a:1", "--verify").addresses == ("a:1", "b:2")
    assert parse_targets("[::1]:5", "--verify").addresses == ("[::1]:5",)
    assert parse_targets("unix:/tmp/v.sock,unix:///tmp/w.sock", "--verify").addresses == (
        "unix:/tmp/v.sock", "unix:///tmp/w.sock")
    dns = parse_targets("dns:///specdec-verify.ns.svc:50052", "--verify")
    assert (dns.dns_host, dns.dns_port, dns.addresses) == ("specdec-verify.ns.svc", 50052, ())


def test_no_verify_replica_reachable_is_a_clear_startup_error(tiny):
    with pytest.raises(ConnectionError, match="no replica is ready.*is it up"):
        orchestrator_server.start(orchestrator_server.OrchestratorSettings(
            verify="localhost:1,localhost:2", host="localhost", ready_timeout_s=1.0))


def test_model_info_carries_the_replica_load(replicas):
    r = replicas(verify=1, draft=0)
    stub = verify_pb2_grpc.VerifyServiceStub(grpc.insecure_channel(f"localhost:{r.verify[0].port}"))
    info = stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=30)
    assert info.HasField("load") and not info.load.draining



def test_speed_is_measured_on_decode_steps_only_and_forgotten_when_stale(monkeypatch):
    import orchestrator.replicas as replicas_module

    replicas = ReplicaSet.of_stubs("verify", {"a:1": None})
    a = replicas._replicas["a:1"]
    load = common_pb2.ReplicaLoad(live_sessions=2, queued=1)
    replicas.observe(a, load, compute_ms=400.0, steps=1, decode=False)  # a prefill: no speed from it
    assert a.service_ms is None and (a.others, a.queued) == (2, 1)
    for compute_ms in (8.0, 20.0, 12.0):  # draft calls of 4 steps: 2, 5, 3 ms a step
        replicas.observe(a, load, compute_ms=compute_ms, steps=4)
    assert a.service_ms is None  # three measurements are too few to route by
    replicas.observe(a, load, compute_ms=48.0, steps=4, batch_size=4)  # 4 sessions shared the passes: 3 ms each
    assert a.service_ms == 2.0 and a.view().service_ms == 2.0  # the least: a busy host only adds time
    monkeypatch.setattr(replicas_module, "SPEED_TTL_S", 0.0)
    assert a.view().service_ms is None  # not measured lately: routed as if as fast as the best


def verify_set_resolving_to(answer: list[str]) -> ReplicaSet:
    """The orchestrator's verify set (its checks, as `connect` builds it) over a name that resolves to whatever
    `answer` holds at each refresh; refreshed by hand (its interval is long)."""
    from orchestrator.deployment import replica_set, same_target

    replicas = replica_set("verify", "dns:///specdec-verify:1", "--verify", verify_pb2_grpc.VerifyServiceStub,
                           same_target, None, None, 30.0)
    replicas.resolver = lambda host, port: list(answer)
    return replicas


def test_a_rolling_update_to_new_weights_is_followed_once_no_replica_hosts_the_old(tiny):
    """While old and new weights are both served, sessions stay with the old (the reference): a generation never
    mixes models. Once every replica answering hosts the new weights (same tokenizer and limits), they become
    the reference; a change of vocabulary would not be followed (the orchestrator read the old one)."""
    old = verify_server.start(ModelServerSettings(str(tiny.target), host="localhost"))
    new = verify_server.start(ModelServerSettings(str(tiny.noisy_draft), host="localhost"))
    other_vocab = verify_server.start(ModelServerSettings(str(tiny.other_vocab_draft), host="localhost"))
    answer = [f"localhost:{old.port}"]
    replicas = verify_set_resolving_to(answer)
    try:
        first = replicas.wait_ready(30)
        answer.append(f"localhost:{new.port}")
        replicas.refresh()
        assert {a: up for a, _b, up in replicas.snapshot()} == {answer[0]: True, answer[1]: False}
        answer.pop(0)  # the old pod is gone
        replicas.refresh()
        assert replicas.reference.weights_fingerprint != first.weights_fingerprint
        assert [up for _a, _b, up in replicas.snapshot()] == [True]
        answer[:] = [f"localhost:{other_vocab.port}"]
        replicas.refresh()
        assert [up for _a, _b, up in replicas.snapshot()] == [False]  # another vocabulary: not followed
        assert "refused" in replicas.describe()[0]
    finally:
        replicas.close()
        for server in (old, new, other_vocab):
            server.stop(grace=None)


def test_a_generation_in_flight_when_the_set_follows_new_weights_fails_instead_of_mixing(tiny):
    """The verify replicas all move to new weights (same tokenizer and limits) mid-generation: the set follows,
    and the generation that began on the old weights ends with a clear UNAVAILABLE rather than scoring its
    remaining tokens with another model. A generation begun after that runs on the new weights."""
    from orchestrator.service_clients import VerifyFailed, VerifySession

    old = verify_server.start(ModelServerSettings(str(tiny.target), host="localhost"))
    new = verify_server.start(ModelServerSettings(str(tiny.noisy_draft), host="localhost"))
    answer = [f"localhost:{old.port}"]
    replicas = verify_set_resolving_to(answer)
    try:
        replicas.wait_ready(30)
        session = VerifySession(replicas, "in-flight", timeout_s=10)
        committed = list(range(10, 30))
        scored = session.verify(committed, [])
        session.advance(scored.base, scored.cached_len, 0)
        answer[:] = [f"localhost:{new.port}"]  # the rollout replaced every old pod
        replicas.refresh()
        assert replicas.epoch == 1
        with pytest.raises(VerifyFailed, match="new weights during this generation"):
            session.verify(committed + [scored.argmax_token_ids[0]], [])
        later = VerifySession(replicas, "after", timeout_s=10)
        assert later.verify(committed, []).argmax_token_ids  # served by the new weights
    finally:
        replicas.close()
        old.stop(grace=None)
        new.stop(grace=None)
