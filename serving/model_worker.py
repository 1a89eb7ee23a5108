"""The one thread that runs forward passes, so queue wait and compute time are measured apart.

gRPC handler threads submit jobs and block on the result; the worker runs them one at a time (torch on
a CPU core or one accelerator gains nothing from interleaving), recording how long each waited.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Timed:
    result: Any
    queue_us: int
    compute_us: int
    # Wall-clock (epoch) nanoseconds, for spans drawn after the fact.
    enqueued_unix_ns: int = 0
    started_unix_ns: int = 0
    finished_unix_ns: int = 0


class ModelWorker:
    def __init__(self, name: str = "model-worker"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def run(self, job: Callable[[], Any]) -> Timed:
        future: Future = Future()
        self._jobs.put((job, future, time.perf_counter_ns(), time.time_ns()))
        return future.result()

    def _loop(self) -> None:
        while True:
            job, future, enqueued, enqueued_unix = self._jobs.get()
            started = time.perf_counter_ns()
            try:
                result = job()
            except BaseException as error:  # noqa: BLE001 - handed to the waiting caller
                future.set_exception(error)
                continue
            finished = time.perf_counter_ns()
            queue_ns, compute_ns = started - enqueued, finished - started
            future.set_result(Timed(result, queue_ns // 1000, compute_ns // 1000, enqueued_unix,
                                    enqueued_unix + queue_ns, enqueued_unix + queue_ns + compute_ns))
