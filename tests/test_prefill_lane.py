"""The prefill lane (--prefill-cpus): prefills run on a second forward thread beside the batched rounds,
never delay a round pass, cannot be stranded on a lane that does not get to run, and never change a
generation's tokens."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from orchestrator.load_gamma import LoadModel
from serving.model_server import ModelServerSettings, prefill_lane_from
from serving.model_service import timing
from serving.model_worker import CallerGone, ModelWorker, PrefillLane, Timed, parse_cpus
from tests.conftest import PROMPTS, start_stack


def _worker(gates: dict[str, threading.Event], seen: list):
    """A worker whose payloads are strings: ones starting with "P" feed 100 tokens (prefills), others 2;
    a payload with a gate blocks its pass until the gate is set."""
    def run_batch(payloads):
        seen.append((threading.current_thread().name, list(payloads)))
        for p in payloads:
            if p in gates:
                gates[p].wait(10)
        return [p.lower() for p in payloads]

    return ModelWorker(run_batch, max_batch=8, name="w", tokens_of=lambda p: 100 if p.startswith("P") else 2,
                       prefill_lane=PrefillLane(min_tokens=64))


def _submit_in_thread(worker, payload, results):
    thread = threading.Thread(target=lambda: results.__setitem__(payload, worker.submit(payload)))
    thread.start()
    return thread


def test_a_prefill_runs_on_the_lane_while_a_round_holds_the_main_pass():
    gates = {"d1": threading.Event()}
    seen, results = [], {}
    worker = _worker(gates, seen)
    d1 = _submit_in_thread(worker, "d1", results)  # idle worker: runs inline and blocks there
    time.sleep(0.1)
    p1 = _submit_in_thread(worker, "P1", results)
    p1.join(5)
    assert not p1.is_alive() and "d1" not in results  # done while the round still holds the main pass
    assert results["P1"].result == "p1" and results["P1"].lane == "prefill"
    assert ("w-prefill", ["P1"]) in seen and worker.stats.prefill_lane_jobs == 1
    gates["d1"].set()
    d1.join(5)
    assert results["d1"].result == "d1" and results["d1"].lane == "main"


def test_a_batch_of_rounds_passes_over_a_prefill_and_the_main_thread_runs_it_when_the_lane_is_busy():
    gates = {"d1": threading.Event(), "P1": threading.Event()}
    seen, results = [], {}
    worker = _worker(gates, seen)
    threads = [_submit_in_thread(worker, "d1", results)]  # main pass busy (inline)
    time.sleep(0.1)
    threads.append(_submit_in_thread(worker, "P1", results))  # the lane, busy until its gate opens
    time.sleep(0.1)
    for payload in ("d2", "P2", "d3"):  # queued behind d1, in this order
        threads.append(_submit_in_thread(worker, payload, results))
        time.sleep(0.05)
    gates["d1"].set()
    for payload in ("d2", "d3", "P2"):
        threads[["d1", "P1", "d2", "P2", "d3"].index(payload)].join(5)
    assert "P1" not in results  # the lane is still held: P2 ran on the main thread, a pass of its own
    assert results["P2"].lane == "main" and results["P2"].batch_size == 1
    assert results["d2"].batch_size == 2 and results["d3"].batch_size == 2  # one pass of rounds, P2 passed over
    assert ("w", ["d2", "d3"]) in seen and ("w", ["P2"]) in seen
    gates["P1"].set()
    threads[1].join(5)
    assert results["P1"].lane == "prefill" and worker.stats.jobs == 5


def test_a_departed_caller_is_dropped_from_the_lane():
    gates = {"d1": threading.Event()}
    seen, results = [], {}
    worker = _worker(gates, seen)
    d1 = _submit_in_thread(worker, "d1", results)
    time.sleep(0.1)
    with pytest.raises(CallerGone, match="cancelled or its deadline passed"):
        worker.submit("Pgone", alive=lambda: False)
    assert worker.stats.dropped == 1 and all("Pgone" not in payloads for _, payloads in seen)
    gates["d1"].set()
    d1.join(5)


def test_bad_prefill_lane_flags_are_refused_with_a_message():
    assert parse_cpus("0,2-3") == {0, 2, 3}
    with pytest.raises(ValueError, match="bad CPU list 'x-1'"):
        parse_cpus("x-1")
    with pytest.raises(ValueError, match="bad CPU list '3-1'"):
        parse_cpus("3-1")
    too_far = (os.cpu_count() or 1) + 7
    with pytest.raises(ValueError, match=f"prefill CPUs \\[{too_far}\\] are not all on this machine"):
        prefill_lane_from(ModelServerSettings("m", prefill_cpus=str(too_far)))
    with pytest.raises(ValueError, match="at least 1 token"):
        prefill_lane_from(ModelServerSettings("m", prefill_cpus="0", prefill_min_tokens=0))
    assert prefill_lane_from(ModelServerSettings("m")) is None


def test_the_lane_needs_the_lean_runtime(tiny):
    from verify_service import server as verify_server

    with pytest.raises(ValueError, match="needs a runtime that runs two passes at once"):
        verify_server.start(ModelServerSettings(str(tiny.target), host="localhost", runtime="hf", prefill_cpus="0"))


def test_generations_served_with_a_prefill_lane_equal_their_solo_runs(tiny):
    # min_tokens 4: every verify call of gamma 3 is a prefill, so the lanes race for all of them
    stack = start_stack(tiny.target, tiny.noisy_draft,
                        verify_settings={"runtime": "lean", "prefill_cpus": "0", "prefill_min_tokens": 4})
    try:
        jobs = [(PROMPTS[i], 6 + 5 * (i % 4), {"temperature": 0.9, "seed": 100 + i} if i % 3 == 1 else {})
                for i in range(10)]

        def generate(client, job):
            return client.generate(job[0], max_new_tokens=job[1], num_draft_tokens=3, **job[2]).token_ids

        with stack.client() as client:
            solo = [generate(client, job) for job in jobs]
            with ThreadPoolExecutor(len(jobs)) as pool:
                together = list(pool.map(lambda job: generate(client, job), jobs))
        assert together == solo
        assert stack.verify.servicer.worker.stats.prefill_lane_jobs > 0
    finally:
        stack.stop()


def test_replies_say_which_lane_served_them():
    assert timing(0, Timed("r", 1, 2, lane="prefill")).prefill_lane
    assert not timing(0, Timed("r", 1, 2)).prefill_lane


class _CountingLoadModel(LoadModel):
    def __init__(self):
        super().__init__()
        self.observed = 0

    def observe(self, *args, **kwargs):
        self.observed += 1
        super().observe(*args, **kwargs)


def test_the_load_policy_leaves_lane_replies_out_of_its_verify_cost_fit(tiny):
    # Without overlap every round makes exactly one verify call, so the policy's observations must be
    # the verify's jobs less those its prefill lane served (min_tokens 2: any call may go to the lane).
    stack = start_stack(tiny.target, tiny.noisy_draft,
                        verify_settings={"runtime": "lean", "prefill_cpus": "0", "prefill_min_tokens": 2},
                        gamma_policy="load", overlap=False)
    try:
        counting = stack.orchestrator.servicer.load_model = _CountingLoadModel()
        worker = stack.verify.servicer.worker
        with stack.client() as client, ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: client.generate(PROMPTS[i % len(PROMPTS)], max_new_tokens=12), range(16)))
        assert worker.stats.prefill_lane_jobs > 0 and worker.stats.dropped == 0
        assert counting.observed == worker.stats.jobs - worker.stats.prefill_lane_jobs
    finally:
        stack.stop()
