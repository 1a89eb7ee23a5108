"""One caller can neither starve nor fail another's requests on the model worker: passes are shared by
tokens between callers, prefills never ride with rounds, a shared pass has a token budget, one caller
cannot fill the queue, and a job that breaks a batch fails alone."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import grpc
import pytest

from service_common.callers import caller_of, peer_host
from service_common.errors import ResourceExhausted
from serving.model_worker import ModelWorker, PrefillLane


class Recorder:
    """A fake model: payloads are (caller, name, tokens); a pass sleeps 20 us a token and is recorded. A
    pass holding a gated name waits for its gate first."""

    def __init__(self):
        self.passes: list[list[str]] = []
        self.lanes: list[str] = []
        self.gates: dict[str, threading.Event] = {}
        self.failing: set[str] = set()

    def run_batch(self, payloads):
        self.passes.append([name for _, name, _ in payloads])
        self.lanes.append(threading.current_thread().name)
        for _, name, _ in payloads:
            if name in self.gates:
                self.gates[name].wait(10)
        if len(payloads) > 1 and self.failing & {name for _, name, _ in payloads}:
            raise RuntimeError("a batch with a bad job in it")
        for _, name, _ in payloads:
            if name in self.failing:
                raise ValueError(f"{name} is bad")
        time.sleep(20e-6 * sum(tokens for _, _, tokens in payloads))
        return [name.upper() for _, name, _ in payloads]

    def gate(self, name: str) -> threading.Event:
        self.gates[name] = threading.Event()
        return self.gates[name]

    def pass_of(self, name: str) -> int:
        return next(i for i, names in enumerate(self.passes) if name in names)


def _worker(recorder: Recorder, **settings) -> ModelWorker:
    return ModelWorker(recorder.run_batch, **{"max_batch": 32, "tokens_of": lambda p: p[2], **settings})


class Callers:
    """Submits (caller, name, tokens) from threads; results and errors by name."""

    def __init__(self, worker: ModelWorker):
        self.worker = worker
        self.results, self.errors, self.threads = {}, {}, {}

    def submit(self, caller: str, name: str, tokens: int) -> None:
        def run():
            try:
                self.results[name] = self.worker.submit((caller, name, tokens), key=name, caller=caller)
            except Exception as error:  # noqa: BLE001
                self.errors[name] = error

        self.threads[name] = threading.Thread(target=run)
        self.threads[name].start()

    def queued(self, count: int) -> None:
        """Wait until `count` jobs wait for the worker."""
        deadline = time.monotonic() + 5
        while self.worker._waiting != count:
            assert time.monotonic() < deadline, f"{self.worker._waiting} jobs queued, expected {count}"
            time.sleep(0.001)

    def running(self, recorder: Recorder, name: str) -> None:
        deadline = time.monotonic() + 5
        while not any(name in names for names in recorder.passes):
            assert time.monotonic() < deadline, f"{name} never started"
            time.sleep(0.001)

    def join(self) -> None:
        for thread in self.threads.values():
            thread.join(10)


def test_a_round_behind_a_flooders_queued_prefills_runs_right_after_the_pass_in_progress():
    recorder = Recorder()
    worker = _worker(recorder)
    calls = Callers(worker)
    release = recorder.gate("a0")
    calls.submit("attacker", "a0", 200)  # an idle worker: runs inline, held by its gate
    calls.running(recorder, "a0")
    for i in range(1, 8):
        calls.submit("attacker", f"a{i}", 200)
    calls.queued(7)
    calls.submit("victim", "round", 5)
    calls.queued(8)
    release.set()
    calls.join()
    assert recorder.passes[1] == ["round"]  # next, and alone: not in a pass with any of the prefills
    assert all(len(names) == 1 for names in recorder.passes)  # prefills never share a pass with a round
    assert calls.results["round"].result == "ROUND" and len(calls.results) == 9


def test_a_pass_shared_with_a_flooder_of_small_jobs_stays_within_the_token_budget():
    recorder = Recorder()
    worker = _worker(recorder, pass_tokens=256)
    calls = Callers(worker)
    release = recorder.gate("a0")
    calls.submit("attacker", "a0", 50)
    calls.running(recorder, "a0")
    for i in range(1, 41):
        calls.submit("attacker", f"a{i}", 50)  # rounds by size (under the 64-token prefill threshold)
    calls.queued(40)
    calls.submit("victim", "round", 5)
    calls.queued(41)
    release.set()
    calls.join()
    victims = recorder.passes[recorder.pass_of("round")]
    assert recorder.pass_of("round") == 1
    assert 5 + 50 * (len(victims) - 1) <= 256 and len(victims) == 1 + (256 - 5) // 50  # the budget, filled
    assert len(calls.results) == 42


def test_a_lone_caller_still_batches_all_its_rounds_past_the_budget():
    recorder = Recorder()
    worker = _worker(recorder, pass_tokens=256)
    calls = Callers(worker)
    release = recorder.gate("a0")
    calls.submit("orchestrator", "a0", 50)
    calls.running(recorder, "a0")
    for i in range(1, 21):
        calls.submit("orchestrator", f"a{i}", 50)
    calls.queued(20)
    release.set()
    calls.join()
    assert len(recorder.passes) == 2 and len(recorder.passes[1]) == 20  # 1000 tokens: nobody else to protect


def test_passes_alternate_by_tokens_between_two_backlogged_callers():
    recorder = Recorder()
    worker = _worker(recorder, max_batch=1)
    calls = Callers(worker)
    release = recorder.gate("x")
    calls.submit("third", "x", 1)
    calls.running(recorder, "x")
    for i in range(6):
        calls.submit("big", f"b{i}", 40)
    calls.queued(6)
    for i in range(12):
        calls.submit("small", f"s{i}", 20)
    calls.queued(18)
    release.set()
    calls.join()
    order = ["b" if names[0].startswith("b") else "s" for names in recorder.passes[1:]]
    # Equal tokens: two 20-token jobs for each 40-token one while both have work queued.
    assert order == ["b", "s", "s", "b", "s", "s", "b", "s", "s", "b", "s", "s", "b", "s", "s", "b", "s", "s"]


def test_a_job_that_fails_its_batch_fails_only_its_own_caller():
    recorder = Recorder()
    recorder.failing.add("bad")
    worker = _worker(recorder)
    calls = Callers(worker)
    release = recorder.gate("hold")
    calls.submit("x", "hold", 1)
    calls.running(recorder, "hold")
    for caller, name in (("a", "good1"), ("attacker", "bad"), ("b", "good2")):
        calls.submit(caller, name, 5)
    calls.queued(3)
    release.set()
    calls.join()
    assert sorted(recorder.passes[1]) == ["bad", "good1", "good2"]  # batched, and the batch failed
    assert {name: done.result for name, done in calls.results.items()} == {"hold": "HOLD", "good1": "GOOD1",
                                                                           "good2": "GOOD2"}
    assert list(calls.errors) == ["bad"] and str(calls.errors["bad"]) == "bad is bad"
    assert calls.results["good1"].batch_size == 1  # it ran again, alone
    assert worker.stats.retried_batches == 1 and worker.stats.isolated_failures == 1


def test_the_per_caller_queue_limit_refuses_the_flooder_and_not_the_victim():
    recorder = Recorder()
    worker = _worker(recorder, max_batch=1, max_queue=8)  # a caller may queue half: 4
    calls = Callers(worker)
    release = recorder.gate("a0")
    calls.submit("attacker", "a0", 5)
    calls.running(recorder, "a0")
    for i in range(1, 5):
        calls.submit("attacker", f"a{i}", 5)
    calls.queued(4)
    with pytest.raises(ResourceExhausted, match=r"this caller already has 4 requests waiting .*"
                                                r"max_queue_per_caller=4, of a queue of 8"):
        worker.submit(("attacker", "a5", 5), caller="attacker")
    calls.submit("victim", "round", 5)
    calls.queued(5)
    release.set()
    calls.join()
    assert calls.results["round"].result == "ROUND" and not calls.errors
    assert worker.stats.rejected == worker.stats.rejected_per_caller == 1


def test_the_prefill_lane_serves_callers_fairly_too():
    recorder = Recorder()
    worker = _worker(recorder, prefill_lane=PrefillLane(min_tokens=64), name="w")
    calls = Callers(worker)
    hold_main, hold_lane = recorder.gate("d"), recorder.gate("a0")
    calls.submit("someone", "d", 2)  # inline: holds the main pass
    calls.running(recorder, "d")
    calls.submit("attacker", "a0", 100)  # the lane takes it, held by its gate
    calls.running(recorder, "a0")
    for i in range(1, 5):
        calls.submit("attacker", f"a{i}", 100)
    calls.queued(4)
    calls.submit("victim", "prompt", 100)
    calls.queued(5)
    hold_lane.set()
    calls.running(recorder, "prompt")
    assert recorder.passes[2] == ["prompt"] and recorder.lanes[2] == "w-prefill"
    hold_main.set()
    calls.join()
    assert len(calls.results) == 7


def test_a_flooder_of_prefills_gets_the_lane_and_never_the_main_thread():
    recorder = Recorder()
    worker = _worker(recorder, prefill_lane=PrefillLane(min_tokens=64), name="w")
    calls = Callers(worker)
    hold_main, hold_lane = recorder.gate("d"), recorder.gate("a0")
    calls.submit("someone", "d", 2)  # inline: holds the main pass, so that the lane takes a0
    calls.running(recorder, "d")
    calls.submit("attacker", "a0", 100)
    calls.running(recorder, "a0")
    hold_main.set()
    calls.threads["d"].join(5)
    for i in range(1, 4):
        calls.submit("attacker", f"a{i}", 100)
    calls.queued(3)
    calls.submit("victim", "prompt", 100)  # another caller's prefill: the main thread takes it
    calls.threads["prompt"].join(5)
    calls.submit("victim", "round", 5)
    calls.threads["round"].join(5)
    assert recorder.passes[2:] == [["prompt"], ["round"]] and recorder.lanes[2:] == ["w", "w"]
    hold_lane.set()
    calls.join()
    assert recorder.passes[4:] == [["a1"], ["a2"], ["a3"]] and set(recorder.lanes[4:]) == {"w-prefill"}


# -- the caller key ----------------------------------------------------------------------------------------
def test_the_caller_is_the_peer_host_without_its_port():
    assert peer_host("ipv4:10.1.2.3:51234") == "ipv4:10.1.2.3"
    assert peer_host("ipv6:[::1]:51234") == peer_host("ipv6:%5B::1%5D:4") == "ipv6:[::1]"
    assert peer_host("ipv6:%5B::ffff:10.1.2.3%5D:80") == "ipv4:10.1.2.3"  # IPv4 on a dual-stack listener
    # An IPv6 host owns a whole /64: every address in it is one caller (else 2^64 of them).
    assert peer_host("ipv6:[2001:db8:1:2:a:b:c:d]:51234") == peer_host("ipv6:%5B2001:db8:1:2::9%5D:7") \
        == "ipv6:[2001:db8:1:2::/64]"
    assert peer_host("ipv6:[2001:db8:1:3::1]:1") == "ipv6:[2001:db8:1:3::/64]"
    assert peer_host("unix:/run/specdec.sock") == "unix:/run/specdec.sock"
    assert peer_host("") is None and peer_host(None) is None


def test_the_caller_is_the_certificates_names_over_mutual_tls():
    tls = SimpleNamespace(peer_identities=lambda: [b"orchestrator.specdec", b"orchestrator"], peer=lambda: "ipv4:1.2.3.4:5")
    assert caller_of(tls) == "tls:orchestrator,orchestrator.specdec"
    plain = SimpleNamespace(peer_identities=lambda: None, peer=lambda: "ipv4:1.2.3.4:5")
    assert caller_of(plain) == "ipv4:1.2.3.4"


def test_every_connection_from_one_host_is_one_caller():
    seen = []

    def who(request, context):
        seen.append(caller_of(context))
        return b""

    server = grpc.server(ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Who", {"Who": grpc.unary_unary_rpc_method_handler(who)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        for _ in range(2):  # two channels: two connections, two source ports
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                channel.unary_unary("/test.Who/Who")(b"", timeout=5)
    finally:
        server.stop(None)
    assert seen == ["ipv4:127.0.0.1", "ipv4:127.0.0.1"]


# -- end to end ------------------------------------------------------------------------------------------
FLOOD_TOKENS = 240  # each flood call prefills this many tokens (the tiny target's context is 256)


def test_a_generation_beside_a_verify_flood_is_exact_and_waits_at_most_one_flood_pass_per_round(tiny):
    """A direct VerifyService caller floods 240-token prefills from 4 threads, on its own sessions and
    from another address (IPv4 loopback against the orchestrator's IPv6, or the other way), while a
    client generates. Every verify of the generation runs in a pass without flood jobs, after at most
    the flood pass in progress when it arrived; so the generation takes at most its time alone plus
    one flood pass per verify (with room for the flood's Python threads sharing the GIL and 2 cores)."""
    from specdec_api import verify_pb2, verify_pb2_grpc
    from tests.conftest import PROMPTS, start_stack

    stack = start_stack(tiny.target, tiny.noisy_draft, verify_settings={"prefill_chunk_tokens": 0})  # whole flood passes
    worker = stack.verify.servicer.worker
    passes, client_callers = [], set()
    submit, run_batch = worker.submit, worker.run_batch

    def recording_submit(payload, *args, **kwargs):
        payload.record = {"caller": kwargs.get("caller")}  # (a ScoreJob: a plain dataclass)
        done = submit(payload, *args, **kwargs)
        payload.record["enqueued"] = done.enqueued_unix_ns  # the worker's clock: when it queued the job
        return done

    def recording_run_batch(payloads):
        started = time.time_ns()
        try:
            return run_batch(payloads)
        finally:
            passes.append((started, time.time_ns(), [(p.record, len(p.tokens)) for p in payloads]))

    worker.submit, worker.run_batch = recording_submit, recording_run_batch
    stop = threading.Event()
    flood_calls = []
    try:
        with stack.client() as client:
            def generate():
                passes.clear()
                started = time.perf_counter()
                result = client.generate(PROMPTS[2], max_new_tokens=40, num_draft_tokens=3)
                return result, time.perf_counter() - started, list(passes)

            generate()  # warm up
            alone, alone_s, _ = min((generate() for _ in range(2)), key=lambda run: run[1])
            client_callers = {record["caller"] for _, _, jobs in passes for record, _ in jobs}
            # The flood calls from the loopback the orchestrator does not use: another caller.
            host = "127.0.0.1" if client_callers == {"ipv6:[::1]"} else "[::1]"

            def flood(thread: int):
                with grpc.insecure_channel(f"{host}:{stack.verify.port}") as channel:
                    stub = verify_pb2_grpc.VerifyServiceStub(channel)
                    request = verify_pb2.VerifyRequest(session_id=f"flood-{thread}", prefix_len=0,
                                                       append_tokens=[1 + (7 * i) % 300 for i in range(FLOOD_TOKENS)])
                    while not stop.is_set():
                        try:
                            stub.Verify(request, timeout=30)
                        except grpc.RpcError:
                            if stop.is_set():  # the stack stopping under it
                                return
                            raise
                        flood_calls.append(thread)

            flooders = [threading.Thread(target=flood, args=(t,)) for t in range(4)]
            for thread in flooders:
                thread.start()
            while len(flood_calls) < 8:
                time.sleep(0.01)
            flooded, flooded_s, flooded_passes = generate()
    finally:
        stop.set()
        stack.stop()
    assert flooded.token_ids == alone.token_ids
    flood_callers = {record["caller"] for _, _, jobs in flooded_passes for record, n in jobs if n == FLOOD_TOKENS}
    assert len(client_callers) == 1 and not flood_callers & client_callers  # two callers, as the servicer keys them
    flood_passes = [(start, end) for start, end, jobs in flooded_passes if jobs[0][1] == FLOOD_TOKENS]
    rounds = [jobs for _, _, jobs in flooded_passes if jobs[0][1] < FLOOD_TOKENS]
    assert flood_passes and rounds
    assert all(tokens < FLOOD_TOKENS for jobs in rounds for _, tokens in jobs)  # no prefill rode with a round
    for start, _, jobs in flooded_passes:
        if jobs[0][1] < FLOOD_TOKENS:
            queued = min(record["enqueued"] for record, _ in jobs)
            overtaking = [s for s, _ in flood_passes if queued < s < start]
            assert len(overtaking) <= 1, "a round waited behind more than the flood pass in progress"
    longest = max(end - start for start, end in flood_passes) / 1e9
    bound = 2 * alone_s + 2 * len(rounds) * longest
    print(f"alone {alone_s * 1000:.0f} ms, beside the flood {flooded_s * 1000:.0f} ms, {len(rounds)} verify "
          f"passes, longest flood pass {longest * 1000:.1f} ms, bound {bound * 1000:.0f} ms")
    assert flooded_s <= bound


def test_without_inline_runs_every_forward_runs_on_the_workers_own_thread():
    """On a GPU (inline=False) the handler threads never run a forward themselves: one thread per device runs them
    all. With inline runs (the CPU default), an idle worker lets the calling thread run its job."""
    def run_on(inline: bool, concurrent: bool) -> set[str]:
        threads = set()

        def run_batch(payloads):
            threads.add(threading.current_thread().name)
            return payloads

        worker = ModelWorker(run_batch, name=f"device-{inline}", inline=inline)
        if concurrent:
            with ThreadPoolExecutor(4) as pool:
                assert list(pool.map(lambda i: worker.submit(i, key=i).result, range(8))) == list(range(8))
        else:
            assert [worker.submit(i, key=i).result for i in range(8)] == list(range(8))
        return threads

    assert run_on(False, concurrent=True) == run_on(False, concurrent=False) == {"device-False"}
    # One job at a time to an idle worker: the calling thread runs each itself.
    assert run_on(True, concurrent=False) == {threading.current_thread().name}


def test_the_worker_times_passes_with_the_clock_it_is_given():
    """The compute a reply reports is read from the device clock (serving/runtimes/clock.py), not the host's."""
    class TenMsClock:
        def __init__(self):
            self.ns = 0

        def now_ns(self):
            self.ns += 10_000_000
            return self.ns

    worker = ModelWorker(lambda payloads: payloads, clock=TenMsClock(), inline=False)
    assert worker.submit("x").compute_us == 10_000
