"""Device clocks: how the model worker times a forward pass on the device that runs it.

On a CPU the work is done when the call returns, so the wall clock is the compute time. On a GPU a call
returns once its kernels are queued: timing it on the host measures launch, not compute. The CUDA clock
synchronizes the device inside the timer, at the start (so that earlier work is not billed to this pass)
and at the end (so that all of this pass's work is). A synchronize rather than CUDA events: the events
would time the kernels alone, and leave out the host's launch work between them, which on a decode step
is most of the cost (DESIGN.md, principle 11). The pass's own results are read to the host inside the
timed call anyway, so the end synchronize costs nothing extra.
"""

from __future__ import annotations

import time

import torch


class DeviceClock:
    """Wall-clock nanoseconds, with the device's queued work finished before each reading."""

    name = "cpu"

    def now_ns(self) -> int:
        return time.perf_counter_ns()


class CudaClock(DeviceClock):
    name = "cuda"

    def __init__(self, device: torch.device):
        self.device = device

    def now_ns(self) -> int:
        torch.cuda.synchronize(self.device)
        return time.perf_counter_ns()


_CPU = DeviceClock()


def clock_for(device: torch.device | str | None) -> DeviceClock:
    device = torch.device(device) if device is not None else torch.device("cpu")
    return CudaClock(device) if device.type == "cuda" else _CPU
