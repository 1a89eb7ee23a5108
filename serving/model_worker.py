"""The one thread that runs forward passes: it measures queue wait apart from compute, batches work
from different sessions, and pushes back when it is overloaded.

gRPC handler threads `submit` a payload and block on the result. When nothing is running or queued
and batches are not held open (`max_wait_ms` 0), the handler thread runs its job itself: no hand-off
to the worker and back, which costs two thread wake-ups (~0.1-0.4 ms on a VM). Otherwise the worker
takes the oldest job,
waits up to `max_wait_ms` for more (up to `max_batch`), drops jobs whose caller has gone (cancelled,
or past its deadline), and hands the rest to `run_batch(payloads) -> results` as one batch. A full
queue is refused at once with RESOURCE_EXHAUSTED rather than accepted and served late.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from serving.errors import ResourceExhausted, ServiceError

import grpc


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


@dataclass
class _Job:
    payload: Any
    future: Future
    enqueued: int
    enqueued_unix: int
    alive: Callable[[], bool]


@dataclass
class WorkerStats:
    batches: int = 0
    jobs: int = 0
    dropped: int = 0
    rejected: int = 0


class ModelWorker:
    def __init__(self, run_batch: Callable[[Sequence[Any]], Sequence[Any]], max_batch: int = 1,
                 max_wait_ms: float = 0.0, max_queue: int = 256, name: str = "model-worker",
                 on_batch: Callable[[int, float], None] | None = None):
        self.run_batch = run_batch
        self.max_batch, self.max_wait_s, self.max_queue = max(1, max_batch), max_wait_ms / 1000, max_queue
        self.on_batch = on_batch  # (batch size, queue wait ms of its oldest job): metrics hook
        self.stats = WorkerStats()
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._forward = threading.Lock()  # one forward pass at a time, inline or on the worker
        self._waiting = 0  # submitted to the worker and not yet started (what max_queue bounds)
        self._count = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, payload: Any, alive: Callable[[], bool] = lambda: True) -> Timed:
        """Run `payload` (in a batch) and return its result; `alive` says whether the caller still waits."""
        if self._waiting >= self.max_queue:
            self.stats.rejected += 1
            raise ResourceExhausted(f"the model worker's queue is full ({self.max_queue} requests waiting); "
                                    "retry with backoff or add replicas")
        if self.max_wait_s == 0 and self._waiting == 0 and self._forward.acquire(blocking=False):
            try:
                if self._waiting == 0:  # still nobody waiting: run here, a batch of one
                    return self._run_inline(payload)
            finally:
                self._forward.release()
        future: Future = Future()
        with self._count:
            self._waiting += 1
        self._jobs.put(_Job(payload, future, time.perf_counter_ns(), time.time_ns(), alive))
        return future.result()

    def _run_inline(self, payload: Any) -> Timed:
        enqueued_unix = time.time_ns()
        started = time.perf_counter_ns()
        result = self.run_batch([payload])[0]
        compute_ns = time.perf_counter_ns() - started
        self._count_batch(1, 0)
        return _timed(result, 0, compute_ns, enqueued_unix, 1)

    def _count_batch(self, size: int, oldest_wait_ns: int) -> None:
        self.stats.batches += 1
        self.stats.jobs += size
        if self.on_batch is not None:
            self.on_batch(size, oldest_wait_ns / 1e6)

    def _collect(self, first: _Job) -> list[_Job]:
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self._jobs.get(timeout=remaining) if remaining > 0 else self._jobs.get_nowait())
            except queue.Empty:
                break
        return batch

    def _loop(self) -> None:
        while True:
            first = self._jobs.get()
            with self._forward:  # an inline forward may be running: wait for it, then batch all that queued
                batch = self._collect(first)
                with self._count:
                    self._waiting -= len(batch)
                live = []
                for job in batch:
                    if job.alive():
                        live.append(job)
                    else:  # cancelled or past its deadline: do not spend the forward pass on it
                        self.stats.dropped += 1
                        job.future.set_exception(CallerGone("the caller cancelled or its deadline passed"))
                if not live:
                    continue
                started = time.perf_counter_ns()
                try:
                    results = self.run_batch([job.payload for job in live])
                except BaseException as error:  # noqa: BLE001 - handed to every waiting caller
                    for job in live:
                        job.future.set_exception(error)
                    continue
                finished = time.perf_counter_ns()
            self._count_batch(len(live), started - live[0].enqueued)
            for job, result in zip(live, results):
                job.future.set_result(_timed(result, started - job.enqueued, finished - started, job.enqueued_unix,
                                             len(live)))


def _timed(result: Any, queue_ns: int, compute_ns: int, enqueued_unix: int, batch_size: int) -> Timed:
    """A job's result with its queue wait and compute, and its start and end on the wall clock."""
    start_unix = enqueued_unix + queue_ns
    return Timed(result, queue_ns // 1000, compute_ns // 1000, enqueued_unix, start_unix, start_unix + compute_ns,
                 batch_size)
