"""What a model runtime is: the one interface both services run forwards through.

A runtime turns token ids into logits over a session's KV cache. The services never look inside one: they ask
for a cache (`new_cache`), feed tokens (`extend_batch`: several sessions, each its own new tokens and how many
logit rows it wants back), and feed one token per session on the device (`decode_step`, the draft's inner loop,
where the tokens come from the previous step's pick and never visit the host). What a runtime can do beyond that
is said by its `capabilities`, never by its name.

Every runtime must pass tests/test_runtimes.py: the conformance test (prefill, decode, rollback, a multi-token
append; one session and a ragged batch) against the HF forward.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

import torch

from serving.runtimes.clock import DeviceClock, clock_for


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` in one copy that does not block the host: from pinned memory, non-blocking, on a
    GPU (a blocking copy is a host sync); as it is on a CPU."""
    if device.type == "cpu":
        return host
    if torch.cuda.is_available():
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


class Cache(Protocol):
    """A session's KV cache. Rollback is `crop`: the tokens past `length` are forgotten (their slots are reused)."""

    @property
    def length(self) -> int: ...

    def crop(self, length: int) -> None: ...

    def nbytes(self) -> int: ...


@dataclass(frozen=True)
class Capabilities:
    # One pass runs several sessions' caches of different lengths together (the worker batches across sessions).
    batches_sessions: bool
    # Two threads may run passes at once on different caches (the prefill lane needs it).
    concurrent_passes: bool
    # Decode steps are replayed as CUDA graphs (captured at bucketed batch sizes).
    graphs: bool = False


class Runtime(ABC):
    """A causal LM's forward over session caches, on one device."""

    name: str  # as --runtime names it, and as GetModelInfo reports it
    capabilities: Capabilities
    device: torch.device
    dtype: torch.dtype

    @property
    def clock(self) -> DeviceClock:
        """How compute on this runtime's device is timed (serving/runtimes/clock.py)."""
        return clock_for(self.device)

    @abstractmethod
    def new_cache(self) -> Cache: ...

    @abstractmethod
    def extend_batch(self, caches: list, token_lists: list[list[int]], keeps: list[int]) -> list[torch.Tensor]:
        """Append each session's tokens to its cache; return each session's float32 logits of its last `keep`
        positions ([keep, vocab], on the runtime's device). If it raises, the caller crops the caches back."""

    def extend(self, cache, token_ids: list[int], keep: int) -> torch.Tensor:
        return self.extend_batch([cache], [token_ids], [keep])[0]

    def decode_step(self, caches: list, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per session, given as a [sessions] long tensor on the device (the previous step's
        picks); return [sessions, vocab] float32 logits. This default reads the tokens to the host (one sync);
        a runtime that can feed them from the device without one overrides it."""
        ids = tokens.tolist()
        return torch.cat(self.extend_batch(caches, [[t] for t in ids], [1] * len(ids)))

    def check(self) -> None:  # noqa: B027 - a default that checks nothing; hf overrides it
        """Raise ValueError, saying why, when this runtime cannot serve its model (run once at startup)."""
