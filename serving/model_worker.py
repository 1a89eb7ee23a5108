"""The one thread that runs forward passes: it measures queue wait apart from compute, batches work
from different sessions, shares the passes fairly between callers, and pushes back when it is
overloaded.

gRPC handler threads `submit` a payload and block on the result. On a CPU (`inline`), when nothing is running,
queued or expected, the handler thread runs its job itself: no hand-off to the worker and back, which costs two
thread wake-ups (~0.1-0.4 ms on a VM). Otherwise the job waits in its caller's queue and the worker
builds passes from the queues, drops jobs whose caller has gone (cancelled, or past its deadline), and
hands each pass to `run_batch(payloads) -> results` as one batch.

Fair shares (start-time fair queueing by tokens). Each job names its caller (the servicers pass the TLS
identity or the peer host, service_common/callers.py; by default the session `key`). Every caller has a tag,
the virtual time at which its next job starts: taking a job charges its caller the job's tokens
(`tokens_of`, 1 a job without it), and a caller that was idle starts again at the worker's virtual time
(the tag of the last pass started), neither in debt nor with credit. A pass is led by the caller with
the lowest tag, so a caller who floods only delays the others by the pass already running: a round
arriving behind any number of a flooder's queued jobs runs in the next pass. The pass then fills from
all callers in tag order, under two rules that keep one caller from making it slow for the others:
- a prefill (at least `solo_tokens`, the prefill lane's threshold when there is one, or any chunk of a
  chunked job) never shares a pass with rounds: on this project's CPU a 5-token round alone took 10 ms
  on the reference target and 106 ms in one pass with a 200-token prefill (LeanLlama.extend_batch, one
  thread);
- a pass that holds jobs of more than one caller, or prefills, stops at `pass_tokens` (a pass of
  prefills at `chunk_tokens`, when chunks are on and smaller): a lone caller still batches all its
  rounds (up to `max_batch`) as before, and a caller's queue never makes another caller's pass longer
  than `pass_tokens`.
The first job of a pass is always taken, so a job larger than the budget runs, alone.
What this cannot do: a pass in progress is not preempted. Without chunks (below) or a prefill lane, a
round still waits for the flooder's prefill already running (512 tokens: ~300 ms on the reference target
here), once per round: a generation beside 4 threads of 512-token Verify calls took ~20x its time alone
on 2 cores (~37x with the old FIFO, which put the round in a pass with every queued prefill).

Chunked prefill (`chunk_tokens` > 0, with `split`). A job that feeds more than `chunk_tokens` tokens is fed
in chunks: `split(payload, n) -> (head, rest)` (the servicer's: head feeds at most n tokens and its result
is thrown away, rest is the remainder; None when the payload cannot be split further) gives the chunk that
runs as this pass, and the rest goes back to the front of its caller's queue after it, as a job of its
own size. So the pass in progress that a round can wait for is at most one chunk, and every chunk is a
job in the fair order: charged its tokens, a prefill or a round by its own size, taken by the prefill lane
like any prefill, dropped if its caller has gone. Every chunk of a chunked job is a prefill (never in a
pass with rounds, whatever its size), and a pass of prefills stops at `chunk_tokens` rather than
`pass_tokens`: on the reference target a flooder's 4 queued 512-token jobs in chunks of 64 otherwise ran
as passes of four chunks (256 tokens, ~144 ms), and the victim's rounds waited as long with chunks of 64
as with chunks of 128. Only the last chunk's result reaches the caller; its
Timed holds the compute of all the job's passes, the rest of its time as queue, and the batch of its last
pass. A chunked job never runs inline (its chunks must be able to yield to others between passes). A chunk
that fails fails the whole job (after the retry alone, as any pass): run_batch restored the caches to the
length before that pass, and the caller (the servicer's session) rolls back what the earlier chunks fed.
The cost: every chunk re-reads the weights, and attention over the cached chunks is done in pieces.
Measured (`python -m benchmarking.flood --chunk-tokens 0,64,128`, reference pair, 2 cores, no lane): a
generation beside 4 threads of 512-token Verify calls took 18.5x its time alone unchunked, 5.3x in chunks
of 128 and 3.2x in chunks of 64 (each round waits about one chunk pass: its verify arrives just after
the next chunk started, while it was drafting); the flood's calls/s fell 11% and 32%.

Queue bounds: a full queue (`max_queue` jobs waiting) is refused at once with RESOURCE_EXHAUSTED rather
than accepted and served late, and so is a caller that already has `max_queue_per_caller` jobs waiting
(half the queue by default), so that one caller cannot fill the queue for everybody. Jobs without a
caller (None, only when neither `caller` nor `key` is given) are not capped per caller.

A failed pass. `run_batch` must leave every job as it found it when it raises (each session's KV cache
at its length before the call; the servicers restore it), so that the worker can run the jobs again:
when a pass of several jobs raises, each job is run again alone, and only a job that fails alone gets
the error. One bad request never fails the requests batched with it (DESIGN.md, principle 9).

Holding a batch open (`max_wait_ms` > 0) waits only for sessions that are expected back: a session
(the `key` of its jobs) whose last pass ended here and which has not been released, predicted by how
long it stayed away before, is awaited if it should arrive before the wait runs out. Without this,
sessions drift into groups that take turns (two passes of 2 sessions where one pass of 4 would do),
and each pass pays the full read of the weights; with a plain fixed wait, a lone session would pay the
wait every round for nobody. New sessions are not predicted and are not waited for.

The prefill lane (optional) is a second forward thread that takes prefills, one at a time, in the same
fair order. The main thread (inline runs too) leaves prefills to it while it is free and, while it is
busy, runs the prefills of callers other than the one it serves (in passes of their own): a caller who
floods prefills gets the lane and never the main thread's passes, and another caller's prefill does not
wait behind the flood (see `_lane_callers`).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import grpc

from service_common.errors import ResourceExhausted, ServiceError
from serving.runtimes.clock import DeviceClock

log = logging.getLogger(__name__)

FORGET_AFTER_S = 60.0  # a session not back this long after it was due is no longer tracked
SOLO_TOKENS = 64  # without a prefill lane: a job this large is a prefill (the lane's default threshold)
PASS_TOKENS = 256  # a pass shared by callers stops here: ~32 rounds of gamma 4-6, ~14x one round's cost on CPU


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
    key: Hashable
    caller: Hashable
    tokens: int  # what the job costs its caller's share: tokens_of(payload), or 1 without it
    prefill: bool  # never batched with rounds; the prefill lane's to take
    seq: int  # arrival order: breaks ties between equal tags
    rest: Any = None  # chunked prefill: what is left to run after `payload` (None: this is the last chunk)
    first_enqueued: int = 0  # when the job (its first chunk) was queued
    compute_ns: int = 0  # the job's passes so far (its earlier chunks)
    chunked: bool = False  # fed in chunks: each of them, small or not, is a prefill


@dataclass
class _Caller:
    """One caller's waiting jobs (rounds and prefills apart, each in arrival order) and its tag."""
    rounds: deque = field(default_factory=deque)
    prefills: deque = field(default_factory=deque)
    tag: float = 0.0  # virtual time at which its next job starts (at least the worker's clock)

    def waiting(self) -> int:
        return len(self.rounds) + len(self.prefills)


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
    """Counters, written under the worker's `_count` lock by whichever thread runs or drops a job (main,
    prefill lane, an inline caller). Each is counted before the job's caller is woken, so a caller that has its
    result (or error) reads counters that include its job. Read while jobs run, two counters may be from
    different moments (no snapshot is taken)."""
    batches: int = 0
    jobs: int = 0
    dropped: int = 0
    rejected: int = 0  # refused for a full queue, either limit
    rejected_per_caller: int = 0  # of those, refused for the caller's own limit
    prefill_lane_jobs: int = 0
    retried_batches: int = 0  # passes of several jobs that failed and were run again job by job
    isolated_failures: int = 0  # jobs that failed again alone: their callers got the error, nobody else
    chunks: int = 0  # chunks of long jobs run with more of the job to follow (chunked prefill)


class ModelWorker:
    def __init__(self, run_batch: Callable[[Sequence[Any]], Sequence[Any]], max_batch: int = 1,
                 max_wait_ms: float = 0.0, max_queue: int = 256, name: str = "model-worker",
                 on_batch: Callable[[int, float], None] | None = None,
                 tokens_of: Callable[[Any], int] | None = None, prefill_lane: PrefillLane | None = None,
                 max_queue_per_caller: int | None = None, pass_tokens: int = PASS_TOKENS,
                 solo_tokens: int | None = None, chunk_tokens: int = 0,
                 split: Callable[[Any, int], tuple[Any, Any] | None] | None = None,
                 clock: DeviceClock | None = None, inline: bool = True):
        self.run_batch = run_batch
        # Times each pass's compute on the device that runs it (serving/runtimes/clock.py): on a GPU the host
        # clock alone would time the kernel launches, not the work.
        self.clock = clock or DeviceClock()
        # Whether a handler thread may run its own job when the worker is idle. Off on a GPU: there every forward
        # runs on the worker's one thread, so CUDA graphs, streams and the caching allocator see one thread per
        # device, and the hand-off (~0.1-0.4 ms) is small beside a GPU pass's host work.
        self.inline = inline
        self.tokens_of = tokens_of  # a payload's token count: its cost to its caller, and the pass's batch_tokens
        self.max_batch, self.max_wait_s, self.max_queue = max(1, max_batch), max_wait_ms / 1000, max_queue
        self.max_queue_per_caller = max(1, max_queue // 2) if max_queue_per_caller is None else max_queue_per_caller
        self.pass_tokens = max(1, pass_tokens)
        if prefill_lane is not None and tokens_of is None:
            raise ValueError("a prefill lane needs the worker to know each job's token count (tokens_of)")
        if solo_tokens is None:
            solo_tokens = prefill_lane.min_tokens if prefill_lane is not None else SOLO_TOKENS
        self.solo_tokens = solo_tokens  # (without tokens_of, no job is a prefill)
        if chunk_tokens < 0:
            raise ValueError(f"chunk_tokens must be >= 0 (0: no chunks), got {chunk_tokens}")
        if chunk_tokens and (split is None or tokens_of is None):
            raise ValueError("chunked prefill needs the worker to know each job's token count (tokens_of) and "
                             "how to split a job (split)")
        self.chunk_tokens, self.split = chunk_tokens, split
        # (batch size, queue wait ms of its oldest job): metrics hook. Called by the main thread, the prefill lane
        # and inline callers, possibly at once, so it must be thread-safe (metric instruments are).
        self.on_batch = on_batch
        self.stats = WorkerStats()
        # Locks, taken in this order when nested: _forward, then _queue, then _count. _away_lock nests in none.
        self._forward = threading.Lock()  # one main forward pass at a time, inline or on the worker
        self._count = threading.Lock()  # the stats counters (two lanes and inline callers update them)
        # The queues, under one condition: callers' jobs and tags, the virtual clock, what waits, the lane's job.
        # Every read and write of _callers, _clock, _waiting, _arrivals and _on_lane holds it.
        self._queue = threading.Condition()
        self._callers: dict[Hashable, _Caller] = {}
        self._clock = 0.0  # virtual time: the tag of the last pass started
        self._waiting = 0  # submitted to the worker and not yet started (what max_queue bounds)
        self._arrivals = itertools.count()
        self._on_lane: _Job | None = None  # the prefill the lane is running
        self._away: dict[Hashable, _Away] = {}  # sessions expected back (see the module docstring)
        self._away_lock = threading.Lock()
        self.prefill_lane = prefill_lane
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        if prefill_lane is not None:
            threading.Thread(target=self._prefill_loop, name=name + "-prefill", daemon=True).start()

    def submit(self, payload: Any, alive: Callable[[], bool] = lambda: True, key: Hashable = None,
               caller: Hashable = None) -> Timed:
        """Run `payload` (in a batch) and return its result; `alive` says whether the caller still waits;
        `key` names the session, so that a batch held open can wait for it to come back; `caller` names
        who sends it, for fair shares and the per-caller queue limit (None: the session `key`)."""
        caller = key if caller is None else caller
        job = _Job(None, Future(), 0, 0, alive, key, caller, 1, False, 0)
        self._next_chunk(job, payload)
        # `self._waiting == 0` unlocked is only a hint, to leave `_forward` alone while jobs are queued (the worker
        # wants it then); _may_run_inline decides under the lock.
        if self.inline and job.rest is None and self._waiting == 0 and self._forward.acquire(blocking=False):
            try:
                if self._may_run_inline(job):
                    return self._run_inline(job)
            finally:
                self._forward.release()
        with self._queue:
            self._admit(caller)
            job.enqueued, job.enqueued_unix, job.seq = time.perf_counter_ns(), time.time_ns(), next(self._arrivals)
            job.first_enqueued = job.enqueued
            state = self._callers.get(caller)
            if state is None:
                state = self._callers[caller] = _Caller(tag=self._clock)
            (state.prefills if job.prefill else state.rounds).append(job)
            self._waiting += 1
            self._queue.notify_all()
        self._arrived(key)  # after the enqueue: a batch that stops waiting for this key finds its job queued
        return job.future.result()

    def queued(self) -> int:
        """Jobs waiting for the worker, all callers (the replica's reported load). Read without the lock: a
        gauge for a load report, one int, not worth a lock taken on every reply."""
        return self._waiting

    def _may_run_inline(self, job: _Job) -> bool:
        """Whether the calling thread may run its job now, as a batch of one (it holds `_forward`): nothing is
        waiting for the worker, the main thread may take the job (a prefill only as `_lane_callers` says), and
        no other session is expected back soon. The queue state is read under its lock like everywhere else:
        unlocked, the lane could clear `_on_lane` between `_lane_callers`' None check and its `.caller`. A job
        queued just after the check waits for this one's pass, as it would for any pass already running."""
        with self._queue:
            if self._waiting or not self._main_may_take(job):
                return False
        return not self._others_expected(job.key)

    def _next_chunk(self, job: _Job, payload: Any) -> None:
        """Make `payload` the job's next pass: all of it, or its first chunk with the remainder kept as
        `rest`; size and kind follow the chunk."""
        job.rest = None
        if self.chunk_tokens and self.tokens_of(payload) > self.chunk_tokens:
            parts = self.split(payload, self.chunk_tokens)
            if parts is not None:
                payload, job.rest = parts
                job.chunked = True
        job.payload = payload
        job.tokens = max(1, self.tokens_of(payload)) if self.tokens_of is not None else 1
        job.prefill = job.chunked or (self.tokens_of is not None and job.tokens >= self.solo_tokens)

    def _requeue(self, job: _Job, started: int, finished: int) -> None:
        """A chunk ran: the rest of the job waits at the front of its caller's queue (it is the caller's
        oldest job), charged again by its own tokens when it is taken."""
        job.compute_ns += finished - started
        with self._count:
            self.stats.chunks += 1
        self._next_chunk(job, job.rest)
        with self._queue:
            state = self._callers.get(job.caller)
            if state is None:
                state = self._callers[job.caller] = _Caller(tag=self._clock)
            job.enqueued = time.perf_counter_ns()
            (state.prefills if job.prefill else state.rounds).appendleft(job)
            self._waiting += 1
            self._queue.notify_all()

    def forget(self, key: Hashable) -> None:
        """The session is over (released): stop expecting it back."""
        with self._away_lock:
            self._away.pop(key, None)

    # -- admission -------------------------------------------------------------------------------------
    def _admit(self, caller: Hashable) -> None:
        """Raise ResourceExhausted if the queue, or this caller's part of it, is full (under the queue lock)."""
        if self._waiting >= self.max_queue:
            self._count_rejected(False)
            raise ResourceExhausted(f"the model worker's queue is full ({self.max_queue} requests waiting); "
                                    "retry with backoff or add replicas")
        state = self._callers.get(caller)
        if caller is not None and state is not None and state.waiting() >= self.max_queue_per_caller:
            self._count_rejected(True)
            raise ResourceExhausted(
                f"this caller already has {state.waiting()} requests waiting for the model worker, the most one "
                f"caller may queue (max_queue_per_caller={self.max_queue_per_caller}, of a queue of "
                f"{self.max_queue}); retry with backoff")

    def _count_rejected(self, per_caller: bool) -> None:
        with self._count:
            self.stats.rejected += 1
            self.stats.rejected_per_caller += per_caller

    # -- sessions expected back (max_wait_ms) ------------------------------------------------------------
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

    # -- fair order (under the queue lock) ---------------------------------------------------------------
    def _charge(self, job: _Job) -> float:
        """The job starts: its caller's tag moves past it; returns the job's own start tag."""
        state = self._callers.get(job.caller)
        if state is None:  # (an inline job of a caller with nothing queued)
            state = self._callers[job.caller] = _Caller(tag=self._clock)
        start = max(self._clock, state.tag)
        state.tag = start + job.tokens
        return start

    def _head(self, prefill: bool, exclude: set) -> tuple[_Caller, _Job] | None:
        """The next job of the given kind in fair order: the first of the caller with the lowest tag.
        Jobs whose caller has gone are dropped on the way."""
        best, best_order = None, None
        for caller, state in self._callers.items():
            if caller in exclude:
                continue
            jobs = state.prefills if prefill else state.rounds
            while jobs and not jobs[0].alive():
                self._waiting -= 1
                self._drop(jobs.popleft())
            if jobs:
                order = (max(self._clock, state.tag), jobs[0].seq)
                if best_order is None or order < best_order:
                    best, best_order = (state, jobs[0]), order
        return best

    def _take(self, state: _Caller, job: _Job) -> None:
        (state.prefills if job.prefill else state.rounds).popleft()
        self._waiting -= 1
        self._charge(job)

    def _lead(self, lane: str) -> list[_Job]:
        """The first job of the next pass: the fairest round or prefill this lane may take."""
        self._prune()
        if lane == "prefill":
            heads = [self._head(True, set())]
        else:
            passed_over = self._lane_callers()
            heads = [self._head(False, set()), None if passed_over is None else self._head(True, passed_over)]
        heads = [head for head in heads if head is not None]
        if not heads:
            return []
        state, job = min(heads, key=lambda h: (max(self._clock, h[0].tag), h[1].seq))
        self._clock = max(self._clock, state.tag)
        self._take(state, job)
        return [job]

    def _fill(self, batch: list[_Job], full: set) -> None:
        """Add queued jobs of the batch's kind in fair order, while the pass stays within its limits;
        `full` collects the callers whose next job did not fit (they wait for the next pass)."""
        prefill = batch[0].prefill
        budget = self.pass_tokens
        if prefill:
            full |= self._lane_callers() or set()
            if self.chunk_tokens:  # a round waits for at most one chunk, not a pass of several
                budget = min(budget, self.chunk_tokens)
        tokens = sum(job.tokens for job in batch)
        callers = {job.caller for job in batch}
        while len(batch) < self.max_batch:
            head = self._head(prefill, full)
            if head is None:
                return
            state, job = head
            shared = prefill or len(callers | {job.caller}) > 1
            if shared and tokens + job.tokens > budget:
                full.add(job.caller)
                continue
            self._take(state, job)
            batch.append(job)
            tokens += job.tokens
            callers.add(job.caller)

    def _prune(self) -> None:
        """Forget callers with nothing waiting that are not ahead of the clock (they would restart at it)."""
        for caller in [c for c, s in self._callers.items() if not s.waiting() and s.tag <= self._clock]:
            del self._callers[caller]

    def _lane_callers(self) -> set | None:
        """Whose prefills the main thread leaves to the prefill lane: None, all of them, while the lane is
        free to take them; the caller it is serving while it is busy. So a caller who floods prefills gets
        the lane and never the main thread, whose passes stay free for others' rounds (and prefills): on 2
        cores, a round beside a flood of 512-token prefills took 29x its time alone when the main thread
        helped the busy lane with any prefill, 1.8x when not. Another caller's prefill does not wait behind
        the flood on the lane, and a prefill is never stranded behind a lane that does not get to run
        unless its own caller is on that lane. (Jobs without a caller are not told apart.)"""
        if self.prefill_lane is None:
            return set()
        if self._on_lane is None:
            return None
        return set() if self._on_lane.caller is None else {self._on_lane.caller}

    def _main_may_take(self, job: _Job) -> bool:
        """Whether the main thread may run this job (inline too): a prefill only as `_lane_callers` says."""
        if not job.prefill:
            return True
        passed_over = self._lane_callers()
        return passed_over is not None and job.caller not in passed_over

    def _main_has_work(self) -> bool:
        passed_over = self._lane_callers()
        return any(s.rounds or (s.prefills and passed_over is not None and caller not in passed_over)
                   for caller, s in self._callers.items())

    # -- running ---------------------------------------------------------------------------------------
    def _run_inline(self, job: _Job) -> Timed:
        self._arrived(job.key)
        with self._queue:
            self._clock = max(self._clock, self._charge(job))
        enqueued_unix = time.time_ns()
        started = self.clock.now_ns()
        try:
            result = self.run_batch([job.payload])[0]
            compute_ns = self.clock.now_ns() - started
        finally:
            self._left([job.key])
        self._count_batch(1, 0)
        return _timed(result, 0, compute_ns, enqueued_unix, 1, self._tokens([job.payload]))

    def _tokens(self, payloads: Sequence[Any]) -> int:
        return sum(self.tokens_of(p) for p in payloads) if self.tokens_of is not None else 0

    def _count_batch(self, size: int, oldest_wait_ns: int) -> None:
        with self._count:  # two lanes may finish at once
            self.stats.batches += 1
            self.stats.jobs += size
        if self.on_batch is not None:
            self.on_batch(size, oldest_wait_ns / 1e6)

    def _drop(self, job: _Job) -> None:
        """The caller has gone (cancelled, or past its deadline): do not spend a forward pass on it."""
        with self._count:  # both lanes drop
            self.stats.dropped += 1
        job.future.set_exception(CallerGone("the caller cancelled or its deadline passed"))

    def _collect(self) -> list[_Job]:
        """The next pass: its fairest job, what is queued that may join it, and the sessions expected back
        within `max_wait_ms`."""
        full: set = set()
        with self._queue:
            batch = self._lead("main")
            if batch:
                self._fill(batch, full)
        if not batch or self.max_wait_s == 0 or batch[0].prefill:  # a prefill pass is not held open
            return batch
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            now = time.monotonic()
            if now >= deadline or not self._expected(deadline, now, {job.key for job in batch}):
                break
            with self._queue:  # an arrival (expected or not) wakes this; re-check who is still out after each
                self._queue.wait(min(deadline - now, 0.002))
                self._fill(batch, full)
        return batch

    def _loop(self) -> None:
        while True:
            with self._queue:
                while not self._main_has_work():
                    self._queue.wait()
            with self._forward:  # an inline forward may be running: wait for it, then batch all that queued
                batch = self._collect()
                if batch:
                    self._run_jobs(batch, "main")
            # Let go of the pass's jobs before waiting for the next: their payloads hold session caches, and a
            # cache the session store has dropped must die now (a static runtime's slot goes back to its pool when
            # its cache dies; held here, a released session's slot stayed taken until the next pass).
            batch = None

    def _prefill_loop(self) -> None:
        lane = self.prefill_lane
        try:
            if lane.cpus is not None:
                os.sched_setaffinity(0, lane.cpus)  # 0: this thread (Linux)
        except OSError as error:
            log.warning("prefill lane: could not pin to CPUs %s (%s); it runs where the process may",
                        sorted(lane.cpus), error)
        while True:
            with self._queue:
                batch = self._lead("prefill")
                while not batch:
                    self._queue.wait()
                    batch = self._lead("prefill")
                self._on_lane = batch[0]
                self._queue.notify_all()  # the main thread may take other callers' prefills now
            try:
                with self._count:
                    self.stats.prefill_lane_jobs += 1
                self._run_jobs(batch, "prefill")
            finally:
                with self._queue:
                    self._on_lane = None
                batch = None  # as in _loop: a finished pass's caches must not outlive their sessions

    def _run_jobs(self, batch: list[_Job], lane: str, alone: bool = False) -> None:
        """One forward pass over the taken jobs still wanted; each caller gets its result or its error. A
        pass of several jobs that fails is run again job by job (`alone`: run_batch left the jobs as it
        found them), so that only a job that fails by itself gets an error."""
        live = []
        for job in batch:
            if job.alive():
                live.append(job)
            else:
                self._drop(job)
        if not live:
            return
        started = self.clock.now_ns()
        results = None
        try:
            results = self.run_batch([job.payload for job in live])
            finished = self.clock.now_ns()
        except Exception as error:  # noqa: BLE001 - handed to its caller, or the pass is run again
            if len(live) == 1:
                if alone:
                    with self._count:
                        self.stats.isolated_failures += 1
                live[0].future.set_exception(error)
                return
            with self._count:
                self.stats.retried_batches += 1
            log.warning("a pass of %d jobs failed (%s: %s); running each alone so that only a failing one gets "
                        "the error", len(live), type(error).__name__, error)
            for job in live:
                self._run_jobs([job], lane, alone=True)
            return
        except BaseException as error:  # noqa: BLE001 - (the interpreter is exiting) handed to every caller
            for job in live:
                job.future.set_exception(error)
            return
        finally:  # as on the inline path: a failed pass's sessions are out again (a retry may follow)
            self._left([job.key for job in live if job.rest is None or not results])
        self._count_batch(len(live), started - live[0].enqueued)
        tokens = self._tokens([job.payload for job in live])
        for job, result in zip(live, results):
            if job.rest is not None:  # a chunk: its result is not the job's; the rest waits its turn
                self._requeue(job, started, finished)
                continue
            compute = job.compute_ns + finished - started
            job.future.set_result(_timed(result, finished - job.first_enqueued - compute, compute,
                                         job.enqueued_unix, len(live), tokens, lane))


def _timed(result: Any, queue_ns: int, compute_ns: int, enqueued_unix: int, batch_size: int,
           batch_tokens: int = 0, lane: str = "main") -> Timed:
    """A job's result with its queue wait and compute, and its start and end on the wall clock."""
    start_unix = enqueued_unix + queue_ns
    return Timed(result, queue_ns // 1000, compute_ns // 1000, enqueued_unix, start_unix, start_unix + compute_ns,
                 batch_size, batch_tokens, lane)
