"""Chunked prefill: a long call is fed in chunks with other callers' rounds between them, so a round waits
for at most one chunk of someone else's prefill; the chunks change no token, a failing chunk fails only its
caller and leaves its session at the call's prefix, and a caller who leaves is not fed further."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import grpc
import pytest
import torch

from serving.model_worker import CallerGone, ModelWorker
from service_common.session_fingerprint import fingerprint
from specdec_api import verify_pb2, verify_pb2_grpc
from tests.conftest import PROMPTS, start_stack


# -- the worker, with a fake model ----------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """A fake job: `tokens` to feed; `part` counts the chunks split off before it."""
    caller: str
    name: str
    tokens: int
    part: int = 0

    @property
    def label(self) -> str:
        return f"{self.name}#{self.part}"


def split(piece: Piece, n: int):
    return Piece(piece.caller, piece.name, n, piece.part), Piece(piece.caller, piece.name, piece.tokens - n, piece.part + 1)


class Model:
    """run_batch over Pieces: records each pass's labels, sleeps 50 us a token; a gated label waits for its
    gate, a failing one raises (a pass of several with a failing one in it raises too)."""

    def __init__(self):
        self.passes: list[list[str]] = []
        self.gates: dict[str, threading.Event] = {}
        self.failing: set[str] = set()

    def run_batch(self, pieces):
        labels = [p.label for p in pieces]
        self.passes.append(labels)
        for label in labels:
            if label in self.gates:
                self.gates[label].wait(10)
        if self.failing & set(labels):
            raise RuntimeError(f"chunk {sorted(self.failing & set(labels))} failed")
        time.sleep(50e-6 * sum(p.tokens for p in pieces))
        return [p.label.upper() for p in pieces]

    def gate(self, label: str) -> threading.Event:
        self.gates[label] = threading.Event()
        return self.gates[label]

    def wait_for(self, label: str) -> None:
        deadline = time.monotonic() + 5
        while not any(label in labels for labels in self.passes):
            assert time.monotonic() < deadline, f"{label} never ran"
            time.sleep(0.001)


def _worker(model: Model, chunk_tokens: int = 64, **settings) -> ModelWorker:
    return ModelWorker(model.run_batch, **{"max_batch": 32, "tokens_of": lambda p: p.tokens, "split": split,
                                           "chunk_tokens": chunk_tokens, **settings})


def _in_thread(worker, piece: Piece, results: dict, errors: dict, alive=lambda: True) -> threading.Thread:
    def run():
        try:
            results[piece.name] = worker.submit(piece, alive=alive, key=piece.name, caller=piece.caller)
        except Exception as error:  # noqa: BLE001
            errors[piece.name] = error

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_victims_rounds_run_between_the_chunks_of_a_flooders_long_job():
    model = Model()
    worker = _worker(model)
    results, errors = {}, {}
    release = model.gate("flood#0")
    flood = _in_thread(worker, Piece("attacker", "flood", 512), results, errors)  # 8 chunks of 64
    model.wait_for("flood#0")
    more = _in_thread(worker, Piece("attacker", "more", 256), results, errors)  # its chunks could share a pass
    deadline = time.monotonic() + 5
    while worker._waiting != 1:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    overtaken = []  # per victim round: the flood chunks that started after it was submitted, before it ran

    def victim():
        for i in range(4):
            submitted = len(model.passes)
            done = worker.submit(Piece("victim", f"r{i}", 5), key="victim", caller="victim")
            assert done.result == f"R{i}#0"
            ran = next(k for k, labels in enumerate(model.passes) if f"r{i}#0" in labels)
            overtaken.append([labels for labels in model.passes[submitted:ran] if not labels[0].startswith("r")])

    rounds = threading.Thread(target=victim)
    rounds.start()
    while worker._waiting != 2:  # the first round waits behind the chunk in progress
        assert time.monotonic() < deadline + 5
        time.sleep(0.001)
    release.set()
    rounds.join(10)
    for thread in (flood, more):
        thread.join(10)
    assert not errors
    assert model.passes[:2] == [["flood#0"], ["r0#0"]]  # the first round ran right after the chunk in progress
    # Never more than one chunk ahead of a round: not two passes, and no pass of two chunks (pass_tokens 256)
    assert all(len(passes) <= 1 and len(passes[0]) == 1 for passes in overtaken if passes), overtaken
    last_round = max(k for k, labels in enumerate(model.passes) if labels[0].startswith("r"))
    assert last_round < model.passes.index(["flood#7"])  # the rounds did not wait for the whole flood job
    assert [labels for labels in model.passes if labels[0].startswith("flood")] == [[f"flood#{k}"] for k in range(8)]
    assert results["more"].result == "MORE#3"
    done = results["flood"]
    assert done.result == "FLOOD#7" and done.batch_tokens == 64  # the last chunk's result and pass
    assert done.compute_us >= 512 * 50 * 0.9  # the compute of all eight chunks
    assert done.queue_us > 0  # the victim's rounds in between (and the held first chunk is compute)


def test_a_failing_later_chunk_fails_only_its_caller_and_stops_its_chunks():
    model = Model()
    model.failing.add("bad#1")
    # Chunks of 30 (a split may feed fewer than n): two callers' chunks share a pass of at most 64 tokens.
    worker = _worker(model, split=lambda piece, n: split(piece, 30))
    results, errors = {}, {}
    release = model.gate("hold#0")
    hold = _in_thread(worker, Piece("x", "hold", 1), results, errors)  # inline: holds the pass
    model.wait_for("hold#0")
    threads = [_in_thread(worker, Piece("a", "bad", 150), results, errors),  # chunks of 30, 30, 30, then 60
               _in_thread(worker, Piece("b", "good", 150), results, errors)]
    deadline = time.monotonic() + 5
    while worker._waiting != 2:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    release.set()
    for thread in (hold, *threads):
        thread.join(10)
    assert sorted(model.passes[1]) == ["bad#0", "good#0"] and sorted(model.passes[2]) == ["bad#1", "good#1"]
    assert sorted(model.passes[3:5]) == [["bad#1"], ["good#1"]]  # the failed pass, each of its chunks alone
    assert not any(label in ("bad#2", "bad#3") for labels in model.passes for label in labels)  # no chunk after it
    assert list(errors) == ["bad"] and "bad#1" in str(errors["bad"])
    assert results["good"].result == "GOOD#3"
    assert worker.stats.retried_batches == 1 and worker.stats.isolated_failures == 1


def test_a_caller_who_leaves_between_chunks_gets_no_more_of_them():
    model = Model()
    worker = _worker(model)
    results, errors = {}, {}
    wanted = threading.Event()
    wanted.set()
    release = model.gate("long#0")
    thread = _in_thread(worker, Piece("a", "long", 320), results, errors, alive=wanted.is_set)
    model.wait_for("long#0")
    wanted.clear()  # cancelled while its first chunk runs
    release.set()
    thread.join(10)
    assert model.passes == [["long#0"]]
    assert isinstance(errors["long"], CallerGone) and worker.stats.dropped == 1


def test_chunk_settings_are_checked():
    with pytest.raises(ValueError, match="tokens_of.*split"):
        ModelWorker(lambda p: p, chunk_tokens=16)
    with pytest.raises(ValueError, match="chunk_tokens must be >= 0"):
        ModelWorker(lambda p: p, tokens_of=len, split=split, chunk_tokens=-1)


# -- the services, end to end -------------------------------------------------------------------------------
LONG_PROMPTS = ["".join(PROMPTS[i:i + 3]) for i in range(0, 18, 3)]  # ~10-40 tokens each
MAX_NEW = 24


@pytest.fixture(scope="module")
def generate_reference(target_model, tokenizer):
    def reference(prompt: str) -> list[int]:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = target_model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
        return out[0, inputs["input_ids"].shape[1]:].tolist()
    return reference


@pytest.mark.parametrize("chunk", [7, 16])
@pytest.mark.parametrize("runtime", ["lean", "hf"])
def test_greedy_output_with_chunked_prefill_equals_target_generate(tiny, tokenizer, generate_reference, runtime, chunk):
    assert max(len(tokenizer(p)["input_ids"]) for p in LONG_PROMPTS) > 2 * chunk  # several chunks a prompt
    settings = {"runtime": runtime, "prefill_chunk_tokens": chunk}
    stack = start_stack(tiny.target, tiny.noisy_draft, verify_settings=settings, draft_settings=settings)
    try:
        with stack.client() as client:
            for prompt in LONG_PROMPTS:
                result = client.generate(prompt, max_new_tokens=MAX_NEW, num_draft_tokens=3)
                assert result.token_ids == generate_reference(prompt), (prompt, runtime, chunk)
        for server in (stack.verify, stack.draft):
            assert server.servicer.worker.chunk_tokens == chunk
            assert server.servicer.worker.stats.chunks > 0  # prompts were fed in chunks on both services
    finally:
        stack.stop()


def test_a_failing_later_chunk_leaves_the_session_at_the_calls_prefix(tiny):
    stack = start_stack(tiny.target, None, verify_settings={"prefill_chunk_tokens": 16, "max_queue_per_caller": 5,
                                                            "pass_tokens": 100})
    servicer = stack.verify.servicer
    worker = servicer.worker  # the settings reach the worker
    assert (worker.chunk_tokens, worker.max_queue_per_caller, worker.pass_tokens) == (16, 5, 100)
    forward = servicer.forward
    prefix = [3 + (5 * i) % 200 for i in range(10)]
    append = [7 + (11 * i) % 200 for i in range(40)]  # chunks of 16 at 10, 26, 42 (then the rest)

    def second_chunk_fails(jobs):
        if any(job.cache.length == 26 for job in jobs):
            raise RuntimeError("the second chunk failed")
        return forward(jobs)

    try:
        with grpc.insecure_channel(f"localhost:{stack.verify.port}") as channel:
            stub = verify_pb2_grpc.VerifyServiceStub(channel)
            stub.Verify(verify_pb2.VerifyRequest(session_id="s", prefix_len=0, append_tokens=prefix), timeout=30)
            call = verify_pb2.VerifyRequest(session_id="s", prefix_len=len(prefix), prefix_fingerprint=fingerprint(prefix),
                                            append_tokens=append, draft_token_ids=[5, 6])
            servicer.forward = second_chunk_fails
            with pytest.raises(grpc.RpcError, match="the second chunk failed"):
                stub.Verify(call, timeout=30)
            (session,) = [s for key, s in servicer.store._sessions.items() if key[1] == "s"]
            assert session.length == len(prefix) and len(session.digests) == len(prefix) + 1
            servicer.forward = forward
            retried = stub.Verify(call, timeout=30)  # the prefix is still served, and scores as a fresh run
            fresh = stub.Verify(verify_pb2.VerifyRequest(session_id="t", prefix_len=0, append_tokens=prefix + append,
                                                         draft_token_ids=[5, 6]), timeout=30)
        assert retried.cached_len == fresh.cached_len == len(prefix) + len(append) + 2
        assert list(retried.argmax_token_ids) == list(fresh.argmax_token_ids)
    finally:
        servicer.forward = forward
        stack.stop()


def test_the_chunk_flag_defaults_by_device_and_bad_worker_flags_are_refused():
    from serving.model_server import ModelServerSettings, chunk_tokens_from, worker_problems

    assert chunk_tokens_from(ModelServerSettings("m")) == 128
    assert chunk_tokens_from(ModelServerSettings("m", device="cuda")) == 512
    assert chunk_tokens_from(ModelServerSettings("m", prefill_chunk_tokens=0)) == 0
    with pytest.raises(ValueError, match="--prefill-chunk-tokens must be >= 0"):
        chunk_tokens_from(ModelServerSettings("m", prefill_chunk_tokens=-1))
    assert worker_problems(ModelServerSettings("m", max_queue_per_caller=0, pass_tokens=0)) == [
        "--max-queue-per-caller must be at least 1, got 0", "--pass-tokens must be at least 1, got 0"]
