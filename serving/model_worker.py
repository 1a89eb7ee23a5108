"""The one thread that runs forward passes: it measures queue wait apart from compute, batches work
from different sessions, and pushes back when it is overloaded.

gRPC handler threads `submit` a payload and block on the result. When nothing is running, queued or
expected, the handler thread runs its job itself: no hand-off to the worker and back, which costs two
thread wake-ups (~0.1-0.4 ms on a VM). Otherwise the worker takes the oldest job and everything queued
behind it (up to `max_batch`), drops jobs whose caller has gone (cancelled, or past its deadline), and
hands the rest to `run_batch(payloads) -> results` as one batch. A full queue is refused at once with
RESOURCE_EXHAUSTED rather than accepted and served late.

Holding a batch open (`max_wait_ms` > 0) waits only for sessions that are expected back: a session
(the `key` of its jobs) whose last pass ended here and which has not been released, predicted by how
long it stayed away before, is awaited if it should arrive before the wait runs out. Without this,
sessions drift into groups that take turns (two passes of 2 sessions where one pass of 4 would do),
and each pass pays the full read of the weights; with a plain fixed wait, a lone session would pay the
wait every round for nobody. New sessions are not predicted and are not waited for.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

from serving.errors import ResourceExhausted, ServiceError

import grpc


log = logging.getLogger(__name__)

FORGET_AFTER_S = 60.0  # a session not back this long after it was due is no longer tracked


class CallerGone(ServiceError):
    code = grpc.StatusCode.CANCELLED


@dataclass
class Timed:
    result: Any
    queue_us: int
    compute_us: int
    # Wall-clock (epoch) nanoseconds, for spans drawn after the fact.
    enqueued_unix_ns: int = 0
    started_unix_ns: int = 0
    finished_unix_ns: int = 0
    batch_size: int = 1
    batch_tokens: int = 0  # tokens the pass fed, over all its jobs (0 when the worker has no `tokens_of`)
    lane: str = "main"  # "prefill" when the prefill lane ran it


@dataclass
class _Job:
    payload: Any
    future: Future
    enqueued: int
    enqueued_unix: int
    alive: Callable[[], bool]
    key: Hashable = None
    prefill: bool = False
    claimed: bool = False  # taken by a lane (a prefill sits in both queues until one claims it)


@dataclass
class _Away:
    """A session between passes: when its last pass ended, and how long it stayed away before (EWMA)."""
    left: float
    away_s: float | None = None


@dataclass(frozen=True)
class PrefillLane:
    """A second forward thread for jobs of at least `min_tokens` tokens, on `cpus` (None: wherever the
    process may run)."""
    min_tokens: int = 64
    cpus: frozenset[int] | None = None

    def problems(self) -> list[str]:
        found = []
        if self.min_tokens < 1:
            found.append(f"the prefill lane's minimum must be at least 1 token, got {self.min_tokens}")
        if self.cpus is not None:
            known = os.cpu_count() or 1
            if not self.cpus or any(not 0 <= cpu < known for cpu in self.cpus):
                found.append(f"prefill CPUs {sorted(self.cpus)} are not all on this machine (CPUs 0-{known - 1})")
            elif not hasattr(os, "sched_setaffinity"):
                found.append("this OS cannot pin a thread to CPUs; leave the prefill CPUs unset")
        return found


def parse_cpus(text: str) -> frozenset[int]:
    """A Linux CPU list ("0", "0,2", "0-3") as a set; ValueError with the offending part."""
    cpus: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                low, high = (int(x) for x in part.split("-", 1))
                if low > high:
                    raise ValueError
                cpus.update(range(low, high + 1))
            else:
                cpus.add(int(part))
        except ValueError:
            raise ValueError(f"bad CPU list {text!r} at {part!r}: use numbers and ranges like 0,2-3") from None
    return frozenset(cpus)


@dataclass
class WorkerStats:
    batches: int = 0
    jobs: int = 0
    dropped: int = 0
    rejected: int = 0
    prefill_lane_jobs: int = 0


class ModelWorker:
    def __init__(self, run_batch: Callable[[Sequence[Any]], Sequence[Any]], max_batch: int = 1,
                 max_wait_ms: float = 0.0, max_queue: int = 256, name: str = "model-worker",
                 on_batch: Callable[[int, float], None] | None = None,
                 tokens_of: Callable[[Any], int] | None = None, prefill_lane: PrefillLane | None = None):
        self.run_batch = run_batch
        self.tokens_of = tokens_of  # a payload's token count, reported back as the pass's batch_tokens
        self.max_batch, self.max_wait_s, self.max_queue = max(1, max_batch), max_wait_ms / 1000, max_queue
        self.on_batch = on_batch  # (batch size, queue wait ms of its oldest job): metrics hook
        self.stats = WorkerStats()
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._forward = threading.Lock()  # one forward pass at a time, inline or on the worker
        self._waiting = 0  # submitted to the worker and not yet started (what max_queue bounds)
        self._count = threading.Lock()
        self._away: dict[Hashable, _Away] = {}  # sessions expected back (see the module docstring)
        self._away_lock = threading.Lock()
        if prefill_lane is not None and tokens_of is None:
            raise ValueError("a prefill lane needs the worker to know each job's token count (tokens_of)")
        self.prefill_lane = prefill_lane
        self._prefills: queue.Queue[_Job] = queue.Queue()
        self._claim_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        if prefill_lane is not None:
            threading.Thread(target=self._prefill_loop, name=name + "-prefill", daemon=True).start()

    def submit(self, payload: Any, alive: Callable[[], bool] = lambda: True, key: Hashable = None) -> Timed:
        """Run `payload` (in a batch) and return its result; `alive` says whether the caller still waits;
        `key` names the session, so that a batch held open can wait for it to come back."""
        if self._waiting >= self.max_queue:
            self.stats.rejected += 1
            raise ResourceExhausted(f"the model worker's queue is full ({self.max_queue} requests waiting); "
                                    "retry with backoff or add replicas")
        if self._waiting == 0 and self._forward.acquire(blocking=False):
            try:
                # Still nobody waiting, and nobody else expected soon: run here, a batch of one.
                if self._waiting == 0 and not self._others_expected(key):
                    return self._run_inline(payload, key)
            finally:
                self._forward.release()
        future: Future = Future()
        with self._count:
            self._waiting += 1
        job = _Job(payload, future, time.perf_counter_ns(), time.time_ns(), alive, key,
                   prefill=self.prefill_lane is not None and self.tokens_of(payload) >= self.prefill_lane.min_tokens)
        self._jobs.put(job)
        if job.prefill:
            self._prefills.put(job)
        self._arrived(key)  # after the put: a batch that stops waiting for this key finds its job queued
        return future.result()

    def forget(self, key: Hashable) -> None:
        """The session is over (released): stop expecting it back."""
        with self._away_lock:
            self._away.pop(key, None)

    def _arrived(self, key: Hashable) -> None:
        if key is None or self.max_wait_s == 0:
            return
        now = time.monotonic()
        with self._away_lock:
            away = self._away.get(key)
            if away is not None and away.left != math.inf:
                took = now - away.left
                away.away_s = took if away.away_s is None else 0.7 * away.away_s + 0.3 * took
                away.left = math.inf  # here now; set again when its pass ends

    def _left(self, keys: Sequence[Hashable]) -> None:
        if self.max_wait_s == 0:
            return
        now = time.monotonic()
        with self._away_lock:
            for key in keys:
                if key is not None:
                    self._away.setdefault(key, _Away(now)).left = now

    def _expected(self, deadline: float, now: float, present: set) -> bool:
        """Whether a session not in `present` is predicted back before `deadline`. One overdue by more
        than the wait itself is not waited for (it may have ended without a release, or be slow)."""
        with self._away_lock:
            for key, away in list(self._away.items()):
                if key in present or away.left == math.inf:
                    continue
                due = away.left + (away.away_s or 0.0)
                if now > due + FORGET_AFTER_S:  # gone without a release (its client vanished)
                    del self._away[key]
                elif due <= deadline and now <= due + self.max_wait_s:
                    return True
        return False

    def _others_expected(self, key: Hashable) -> bool:
        if self.max_wait_s == 0:
            return False
        now = time.monotonic()
        return self._expected(now + self.max_wait_s, now, {key})

    def _run_inline(self, payload: Any, key: Hashable = None) -> Timed:
        self._arrived(key)
        enqueued_unix = time.time_ns()
        started = time.perf_counter_ns()
        try:
            result = self.run_batch([payload])[0]
        finally:
            self._left([key])
        compute_ns = time.perf_counter_ns() - started
        self._count_batch(1, 0)
        return _timed(result, 0, compute_ns, enqueued_unix, 1, self._tokens([payload]))

    def _tokens(self, payloads: Sequence[Any]) -> int:
        return sum(self.tokens_of(p) for p in payloads) if self.tokens_of is not None else 0

    def _count_batch(self, size: int, oldest_wait_ns: int) -> None:
        with self._count:  # two lanes may finish at once
            self.stats.batches += 1
            self.stats.jobs += size
        if self.on_batch is not None:
            self.on_batch(size, oldest_wait_ns / 1e6)

    def _claim(self, job: _Job) -> bool:
        with self._claim_lock:
            if job.claimed:
                return False
            job.claimed = True
        with self._count:
            self._waiting -= 1
        return True

    def _take(self, batch: list[_Job], passed_over: list[_Job], job: _Job) -> None:
        """Add `job` to a batch of rounds; a prefill is passed over (and queued again after the batch is
        collected), for the prefill lane to claim meanwhile or for a pass of its own when it comes first
        here: a starved lane delays it by no more than the passes queued before it."""
        if job.prefill:
            if not job.claimed:
                passed_over.append(job)
        elif self._claim(job):
            batch.append(job)

    def _collect(self, first: _Job) -> list[_Job]:
        """The oldest job, all queued behind it, and those expected back within `max_wait_ms`; a
        prefill that comes first is a batch of its own."""
        batch: list[_Job] = [first]
        if first.prefill:
            return batch
        passed_over: list[_Job] = []
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                self._take(batch, passed_over, self._jobs.get_nowait())
                continue
            except queue.Empty:
                pass
            now = time.monotonic()
            if self.max_wait_s == 0 or now >= deadline:
                break
            if not self._expected(deadline, now, {job.key for job in batch}):
                break
            try:  # an arrival (expected or not) wakes this; re-check who is still out after each
                self._take(batch, passed_over, self._jobs.get(timeout=min(deadline - now, 0.002)))
            except queue.Empty:
                pass
        for job in passed_over:
            self._jobs.put(job)
        return batch

    def _loop(self) -> None:
        while True:
            first = self._jobs.get()
            with self._forward:  # an inline forward may be running: wait for it, then batch all that queued
                if self._claim(first):  # (not a prefill the lane took meanwhile)
                    self._run_jobs(self._collect(first), "main")

    def _prefill_loop(self) -> None:
        lane = self.prefill_lane
        try:
            if lane.cpus is not None:
                os.sched_setaffinity(0, lane.cpus)  # 0: this thread (Linux)
        except OSError as error:
            log.warning("prefill lane: could not pin to CPUs %s (%s); it runs where the process may", sorted(lane.cpus), error)
        while True:
            job = self._prefills.get()
            if self._claim(job):
                self.stats.prefill_lane_jobs += 1
                self._run_jobs([job], "prefill")

    def _run_jobs(self, batch: list[_Job], lane: str) -> None:
        """One forward pass over the claimed jobs still wanted; each caller gets its result or the error."""
        live = []
        for job in batch:
            if job.alive():
                live.append(job)
            else:  # cancelled or past its deadline: do not spend the forward pass on it
                with self._count:  # both lanes drop
                    self.stats.dropped += 1
                job.future.set_exception(CallerGone("the caller cancelled or its deadline passed"))
        if not live:
            return
        started = time.perf_counter_ns()
        try:
            results = self.run_batch([job.payload for job in live])
            finished = time.perf_counter_ns()
        except BaseException as error:  # noqa: BLE001 - handed to every waiting caller
            for job in live:
                job.future.set_exception(error)
            return
        finally:  # as on the inline path: a failed pass's sessions are out again (a retry may follow)
            self._left([job.key for job in live])
        self._count_batch(len(live), started - live[0].enqueued)
        tokens = self._tokens([job.payload for job in live])
        for job, result in zip(live, results):
            job.future.set_result(_timed(result, started - job.enqueued, finished - started, job.enqueued_unix,
                                         len(live), tokens, lane))


def _timed(result: Any, queue_ns: int, compute_ns: int, enqueued_unix: int, batch_size: int,
           batch_tokens: int = 0, lane: str = "main") -> Timed:
    """A job's result with its queue wait and compute, and its start and end on the wall clock."""
    start_unix = enqueued_unix + queue_ns
    return Timed(result, queue_ns // 1000, compute_ns // 1000, enqueued_unix, start_unix, start_unix + compute_ns,
                 batch_size, batch_tokens, lane)
