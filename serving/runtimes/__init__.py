"""Model runtimes behind one interface (base.py): `hf` (the model's own forward, any causal LM) and `lean`
(a lean forward for the Llama family, lean.py). `make_runtime` picks one for a loaded model; `auto` takes the
fastest that serves the model exactly on its device."""

from __future__ import annotations

import torch

from serving.runtimes.base import Capabilities, Cache, Runtime
from serving.runtimes.clock import DeviceClock, clock_for

RUNTIMES = ("auto", "hf", "lean")


def make_runtime(model: torch.nn.Module, device: torch.device, runtime: str = "auto") -> Runtime:
    """`hf`: the model's own forward, for any causal LM. `lean`: serving/runtimes/lean.py for the architectures
    it computes exactly (`lean.unsupported(config)` says why not). `auto` (the default, for drafts and targets):
    lean where supported, else hf.

    Neither is bit-identical to `generate`'s one-token steps when it scores several positions at once:
    a [5, hidden] matrix product sums in another order than five [1, hidden] ones. Measured on the
    reference target, both differ from the one-token logits by ~1e-5 (HF 1.1e-5, lean 1.3e-5), far
    below the gaps between greedy candidates; the greedy-exactness tests run on whichever is default."""
    from serving.runtimes import hf, lean

    if runtime not in RUNTIMES:
        raise ValueError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    why_not = lean.unsupported(model.config)
    if runtime == "lean" and why_not:
        raise ValueError(f"--runtime lean cannot serve this {model.config.model_type!r} model: {why_not}; "
                         f"use --runtime hf")
    if runtime == "lean" or (runtime == "auto" and not why_not):
        chosen: Runtime = lean.LeanLlama(model)
    else:
        chosen = hf.ModelRunner(model, device)
    chosen.check()
    return chosen


__all__ = ["RUNTIMES", "Capabilities", "Cache", "DeviceClock", "Runtime", "clock_for", "make_runtime"]
