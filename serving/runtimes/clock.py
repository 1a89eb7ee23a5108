"""Device clocks: how the model worker times a forward pass on the device that runs it.

On a CPU the work is done when the call returns, so the wall clock is the compute time. On a GPU a call
returns once its kernels are queued: timing it on the host measures launch, not compute. The CUDA clock waits
for the calling thread's current stream inside the timer, at the start (so that earlier work is not billed to
this pass) and at the end (so that all of this pass's work is). It waits on an event recorded on that stream,
not with a device-wide synchronize: another thread may be capturing a CUDA graph on another stream (two
runtimes in one process: the draft's decode graphs beside the verify's passes), and a device-wide synchronize
during a capture is an error that also invalidates the capture (seen on an H200: "operation not permitted when
stream is capturing"). A wait rather than CUDA events' elapsed time: the events would time the kernels alone,
and leave out the host's launch work between them, which on an eager decode step is most of the cost
(DESIGN.md, principle 11). The pass's own results are read to the host inside the timed call anyway, so the
end wait costs nothing extra.
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
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        done.synchronize()
        return time.perf_counter_ns()


_CPU = DeviceClock()


def clock_for(device: torch.device | str | None) -> DeviceClock:
    device = torch.device(device) if device is not None else torch.device("cpu")
    return CudaClock(device) if device.type == "cuda" else _CPU
