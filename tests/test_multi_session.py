"""Many sessions on one deployment: batched verification, bounded session memory, cancellation,
backpressure. None of it may change a generation's tokens."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from service_common.errors import ResourceExhausted
from serving.model_worker import CallerGone, ModelWorker
from serving.sessions import SessionStore
from tests.conftest import PROMPTS, start_stack

LEAN = {"runtime": "lean"}


def _jobs():
    # mixed lengths, greedy and seeded sampling
    return [(PROMPTS[i], 6 + 5 * (i % 4), {"temperature": 0.9, "seed": 100 + i} if i % 3 == 1 else {})
            for i in range(10)]


def _generate(client, job):
    prompt, n, options = job
    return client.generate(prompt, max_new_tokens=n, num_draft_tokens=3, **options).token_ids


def test_concurrent_generations_are_batched_and_each_equals_its_solo_run(tiny):
    stack = start_stack(tiny.target, tiny.noisy_draft, verify_settings={**LEAN, "max_wait_ms": 5.0},
                        draft_settings={"max_wait_ms": 5.0})
    try:
        jobs = _jobs()
        with stack.client() as client:
            solo = [_generate(client, job) for job in jobs]
            worker = stack.verify.servicer.worker
            solo_batches = worker.stats.batches
            with ThreadPoolExecutor(len(jobs)) as pool:
                together = list(pool.map(lambda job: _generate(client, job), jobs))
        assert together == solo
        batched_jobs = worker.stats.jobs - solo_batches
        assert worker.stats.batches - solo_batches < batched_jobs  # some forward passes served several sessions
    finally:
        stack.stop()


def test_outputs_stay_identical_under_a_budget_that_forces_evictions(tiny):
    reference = start_stack(tiny.target, tiny.noisy_draft)
    tight = start_stack(tiny.target, tiny.noisy_draft, verify_settings={"session_memory_mb": 0.02},
                        draft_settings={"session_memory_mb": 0.005})
    try:
        jobs = _jobs()
        with reference.client() as client:
            expected = [_generate(client, job) for job in jobs]
        with tight.client() as client, ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda job: client.generate(job[0], max_new_tokens=job[1], num_draft_tokens=3,
                                                                **job[2]), jobs))
        assert [r.token_ids for r in results] == expected
        assert tight.verify.servicer.store.evictions > 0 and tight.draft.servicer.store.evictions > 0
        assert sum(r.stats["reprefills"] for r in results) > 0
    finally:
        reference.stop()
        tight.stop()


def test_a_cancelled_client_frees_its_session_memory_on_both_services(tiny):
    stack = start_stack(tiny.target, tiny.noisy_draft)
    try:
        with stack.client() as client:
            stream = client.stream(PROMPTS[0], max_new_tokens=200, num_draft_tokens=2)
            next(stream)
            assert stack.verify.servicer.store.stats().live_sessions == 1
            stream.close()  # the SDK cancels the call
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if (stack.verify.servicer.store.stats().live_sessions == 0
                    and stack.draft.servicer.store.stats().live_sessions == 0):
                break
            time.sleep(0.05)
        assert stack.verify.servicer.store.stats().live_sessions == 0
        assert stack.draft.servicer.store.stats().live_sessions == 0
    finally:
        stack.stop()


def test_a_full_session_budget_with_nothing_idle_is_resource_exhausted():
    store = SessionStore(lambda: _FakeCache(), max_sessions=1)
    with store.use("a", 0):
        with pytest.raises(ResourceExhausted, match="session memory is full"):
            with store.use("b", 0):
                pass
    with store.use("b", 0):  # once "a" is idle it can be evicted
        pass
    assert "a" not in store and store.evictions == 1


class _FakeCache:
    length = 0

    def crop(self, n):
        pass

    def nbytes(self):
        return 0


def test_a_full_queue_is_refused_and_departed_callers_are_dropped():
    release = threading.Event()
    ran = []

    def run_batch(payloads):
        release.wait(5)
        ran.extend(payloads)
        return payloads

    worker = ModelWorker(run_batch, max_batch=1, max_queue=3)
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, worker.submit(i))) for i in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.05)  # the first is running, two wait
    gone = []
    threading.Thread(target=lambda: gone.append(_raises(lambda: worker.submit("dead", alive=lambda: False)))).start()
    time.sleep(0.05)  # three wait now
    with pytest.raises(ResourceExhausted, match="queue is full"):
        worker.submit("overflow")
    release.set()
    for t in threads:
        t.join(5)
    time.sleep(0.2)
    assert sorted(results) == [0, 1, 2] and "dead" not in ran and gone == [CallerGone]
    assert worker.stats.dropped == 1 and worker.stats.rejected == 1


def test_an_idle_worker_runs_the_call_on_its_own_thread_and_a_busy_one_batches():
    release = threading.Event()
    threads_seen = []

    def run_batch(payloads):
        threads_seen.append((threading.get_ident(), list(payloads)))
        if payloads == ["first"]:
            release.wait(5)
        return [p.upper() for p in payloads]

    worker = ModelWorker(run_batch, max_batch=8)
    done = worker.submit("solo")
    assert done.result == "SOLO" and done.queue_us == 0 and threads_seen[-1] == (threading.get_ident(), ["solo"])

    first = threading.Thread(target=worker.submit, args=("first",))
    first.start()
    time.sleep(0.05)  # "first" holds the forward pass: the next two must queue and share one
    results = {}
    waiting = [threading.Thread(target=lambda p=p: results.__setitem__(p, worker.submit(p))) for p in ("a", "b")]
    for t in waiting:
        t.start()
    time.sleep(0.05)
    release.set()
    for t in (first, *waiting):
        t.join(5)
    assert {p: r.result for p, r in results.items()} == {"a": "A", "b": "B"}
    assert sorted(threads_seen[-1][1]) == ["a", "b"] and results["a"].batch_size == 2
    assert threads_seen[-1][0] not in (threading.get_ident(), first.ident)  # the worker thread ran it


def test_a_held_batch_waits_only_for_sessions_expected_back():
    """max_wait_ms holds a pass open for a session that just left an earlier pass, not for nobody."""
    gate = threading.Event()
    passes = []

    def run_batch(payloads):
        passes.append(sorted(payloads))
        if "a1" in payloads:
            gate.wait(5)  # hold a's first pass so that b queues behind it
        return payloads

    worker = ModelWorker(run_batch, max_batch=8, max_wait_ms=400)
    started = time.perf_counter()
    assert worker.submit("solo", key="solo").batch_size == 1  # nobody else is known: runs at once
    worker.forget("solo")
    assert time.perf_counter() - started < 0.2

    results = {}
    first = threading.Thread(target=lambda: results.__setitem__("a1", worker.submit("a1", key="a")))
    first.start()
    time.sleep(0.05)
    second = threading.Thread(target=lambda: results.__setitem__("b1", worker.submit("b1", key="b")))
    second.start()
    time.sleep(0.05)
    gate.set()  # a's pass ends: a is out, expected back; b's pass holds open for it
    first.join(5)
    time.sleep(0.05)  # a's round elsewhere (its draft, the accept step)
    results["a2"] = worker.submit("a2", key="a")
    second.join(5)
    assert passes[-1] == ["a2", "b1"] and results["b1"].batch_size == results["a2"].batch_size == 2

    worker.forget("a")
    worker.forget("b")
    started = time.perf_counter()
    assert worker.submit("c1", key="c").batch_size == 1  # released sessions are not waited for
    assert time.perf_counter() - started < 0.2


def test_a_session_whose_pass_failed_is_expected_back_like_any_other():
    """A failed pass on the worker thread leaves its sessions out again, as the inline path does: the
    client may retry, so a held batch waits for it (and does not for a session that was released)."""
    gate = threading.Event()

    def run_batch(payloads):
        if payloads == ["hold"]:
            gate.wait(5)
        if "boom" in payloads:
            raise RuntimeError("forward failed")
        return payloads

    worker = ModelWorker(run_batch, max_batch=8, max_wait_ms=300)
    holder = threading.Thread(target=worker.submit, args=("hold",), kwargs={"key": "x"})
    holder.start()
    time.sleep(0.05)
    failed = []
    loser = threading.Thread(target=lambda: failed.append(_raises(lambda: worker.submit("boom", key="a"))))
    loser.start()
    time.sleep(0.05)
    gate.set()  # "boom" runs on the worker thread, after "hold", and fails
    holder.join(5)
    loser.join(5)
    assert failed == [RuntimeError]
    worker.forget("x")
    started = time.perf_counter()
    worker.submit("c1", key="c")
    assert time.perf_counter() - started > 0.15  # held open for "a", which may come back
    worker.forget("a")
    worker.forget("c")
    started = time.perf_counter()
    worker.submit("c2", key="d")
    assert time.perf_counter() - started < 0.15


def _raises(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001
        return type(error)
    return None


def test_load_aware_gamma_keeps_greedy_output_identical_and_adapts(tiny, stacks):
    jobs = _jobs()
    with stacks("noisy").client() as client:
        expected = [client.generate(p, max_new_tokens=n).token_ids for p, n, _ in jobs]
    stack = start_stack(tiny.target, tiny.noisy_draft, verify_settings=LEAN, gamma_policy="load")
    try:
        with stack.client() as client, ThreadPoolExecutor(5) as pool:
            chunks = list(pool.map(lambda job: list(client.stream(job[0], max_new_tokens=job[1])), jobs))
        assert [[t for c in job_chunks for t in c.token_ids] for job_chunks in chunks] == expected
        gammas = {c.round["num_draft_tokens"] for job_chunks in chunks for c in job_chunks}
        assert len(gammas) > 1  # the policy moved gamma away from the default
        load = stack.orchestrator.servicer.load_model
        assert load.verify_cost.coefficients() is not None
        assert load.round_overhead_ms > 0  # each round's transport and orchestrator time reached the policy
        assert load.acceptance.trials != load.acceptance.prior_trials  # so did the deployment's acceptance
        # the generations in flight, which the policy reads as the sessions sharing the verify
        assert load.active == 0
        with stack.client() as client:
            stream = client.stream(jobs[0][0], max_new_tokens=jobs[0][1])
            next(stream)
            assert load.active == 1
            list(stream)
        assert load.active == 0
    finally:
        stack.stop()
