"""Model runtimes behind one interface (base.py): `hf` (the model's own forward, any causal LM), `lean`
(a lean forward for Llama 2/3.x, Mistral and Qwen2/3, lean.py) and `static` (the same architectures on a preallocated KV
pool, CUDA graphs for decode steps: the GPU fast path, static.py). `make_runtime` picks one for a loaded model;
`auto` takes the fastest that serves the model exactly on its device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serving.runtimes.base import Capabilities, Cache, Runtime
from serving.runtimes.clock import DeviceClock, clock_for

RUNTIMES = ("auto", "hf", "lean", "static")


@dataclass(frozen=True)
class RuntimeOptions:
    """What a runtime with a preallocated KV pool (static) is sized by: the service's flags."""
    slot_tokens: int = 0  # each session's capacity; 0: the model's context, at most static.DEFAULT_SLOT_TOKENS
    gpu_memory_fraction: float = 0.9  # of the free device memory (after the weights), less a reserve
    session_memory_mb: float | None = None  # the CPU pool; None: static.DEFAULT_POOL_MB
    max_sessions: int = 1024
    graphs: bool = True  # CUDA graphs for decode steps (static, on CUDA)


def make_runtime(model: torch.nn.Module, device: torch.device, runtime: str = "auto",
                 options: RuntimeOptions | None = None) -> Runtime:
    """`hf`: the model's own forward, for any causal LM. `lean`: serving/runtimes/lean.py for the architectures
    it computes exactly (`lean.unsupported(config)` says why not). `static`: the same architectures on a KV
    pool sized by `options` (a service's: serving/model_server.py runtime_options_from), with CUDA graphs on CUDA.
    `auto` (the default, for drafts and targets): static on CUDA and lean elsewhere where supported, else hf.

    Neither is bit-identical to `generate`'s one-token steps when it scores several positions at once:
    a [5, hidden] matrix product sums in another order than five [1, hidden] ones. Measured on the
    reference target, both differ from the one-token logits by ~1e-5 (HF 1.1e-5, lean 1.3e-5), far
    below the gaps between greedy candidates; the greedy-exactness tests run on whichever is default."""
    from serving.runtimes import hf, lean

    if runtime not in RUNTIMES:
        raise ValueError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    why_not = lean.unsupported(model.config)
    if runtime in ("lean", "static") and why_not:
        raise ValueError(f"--runtime {runtime} cannot serve this {model.config.model_type!r} model: {why_not}; "
                         f"use --runtime hf")
    from serving.runtimes import static

    on_cuda = torch.device(device).type == "cuda"
    if runtime == "static" or (runtime == "auto" and on_cuda and not why_not and not static.unsupported_model(model)):
        options = options or RuntimeOptions()
        chosen: Runtime = static.StaticRuntime(
            model, slot_tokens=options.slot_tokens, pool_mb=options.session_memory_mb,
            gpu_memory_fraction=options.gpu_memory_fraction, max_sessions=options.max_sessions,
            graphs=options.graphs)
    elif runtime == "lean" or (runtime == "auto" and not why_not):
        chosen = lean.LeanLlama(model)
    else:
        chosen = hf.ModelRunner(model, device)
    chosen.check()
    return chosen


__all__ = ["RUNTIMES", "Capabilities", "Cache", "DeviceClock", "Runtime", "RuntimeOptions", "clock_for",
           "make_runtime"]
