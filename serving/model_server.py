"""Starting a model service (draft or verify) from flags: build what it hosts, build the servicer, serve."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from service_common.caller_limits import DEFAULT_MAX_WORKERS
from service_common.server import DEFAULT_MAX_REQUEST_MB, RunningServer, start_server
from serving.runtimes import RuntimeOptions, make_runtime
from serving.metrics import watch_sessions
from serving.model_loading import LoadedModel, ModelIdentity, load_model
from serving.model_worker import PASS_TOKENS, PrefillLane, parse_cpus
from serving.sessions import SessionStore, most_caches
from transport import TLSSettings


@dataclass
class ModelServerSettings:
    model: str
    port: int = 0
    host: str = "[::]"
    device: str = "cpu"
    dtype: str = "auto"
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    session_memory_mb: float = 4096.0
    max_sessions: int = 1024
    session_ttl_s: float = 600.0
    max_draft_tokens: int = 32
    max_workers: int = DEFAULT_MAX_WORKERS  # handler threads (started as calls need them)
    # Calls one caller may have in flight (each holds a handler thread); beyond: RESOURCE_EXHAUSTED at once.
    # None: half of max_workers (128 by default, as max_queue_per_caller is half of max_queue); 0: no limit.
    max_calls_per_caller: int | None = None
    runtime: str = "auto"  # auto | lean | static | hf (serving/runtimes: make_runtime)
    # The static runtime's KV pool (serving/runtimes/static.py): each session's slot, in tokens (0: the model's
    # context, at most static.DEFAULT_SLOT_TOKENS; the service's max_context is then at most this), and on CUDA the fraction of the free device
    # memory the pool takes (less a reserve for activations and graphs); on a CPU session_memory_mb sizes it.
    slot_tokens: int = 0
    gpu_memory_fraction: float = 0.9
    max_batch: int = 32  # sessions per forward pass (batching needs the lean runtime)
    max_wait_ms: float = 0.0  # hold a pass open this long for sessions expected back; 0: what is queued
    max_queue: int = 256  # requests waiting for the worker before RESOURCE_EXHAUSTED
    max_concurrent_rpcs: int | None = None  # gRPC refuses calls beyond this with RESOURCE_EXHAUSTED
    prefill_cpus: str | None = None  # a CPU list: prefills on a second thread there (serving/model_worker.py)
    prefill_min_tokens: int = 64  # with prefill_cpus: tokens that make a call a prefill
    # Calls feeding more are fed in chunks of this many tokens, other callers' passes between them
    # (serving/model_worker.py); 0: never; None: 128 on a CPU, 512 on an accelerator.
    prefill_chunk_tokens: int | None = None
    max_queue_per_caller: int | None = None  # requests one caller may have waiting; None: half of max_queue
    pass_tokens: int = PASS_TOKENS  # a pass shared by several callers (or of prefills) stops at this many tokens
    tls: TLSSettings = field(default_factory=TLSSettings)  # transport/tls.py; off by default
    api_key_file: str | None = None  # callers must send a key from this file
    health_port: int | None = None  # plaintext health service alone on this port (for probes under TLS)
    max_request_mb: float = DEFAULT_MAX_REQUEST_MB  # larger requests are refused before they are parsed
    # Draft services only (draft_service/drafters/): the drafter, or a comma-separated chain of drafters, the
    # n-gram drafter's match lengths, and the layer-skip drafter's layers (the `serve draft` flags of these names).
    drafter: str = "model"
    ngram_min: int = 1
    ngram_max: int = 3
    skip_layers: str = "auto"  # "2,4" | "auto" | "@FILE"
    skip_search_prompts: str | None = None  # JSONL with a `prompt` field; None: the default held-out prompts
    skip_layers_save: str | None = None  # with auto: write the chosen set here (JSON)


CPU_CHUNK_TOKENS = 128  # a 128-token pass of the reference target: ~75 ms on this project's 2-core CPU
ACCELERATOR_CHUNK_TOKENS = 512  # (not measured: a GPU pass costs little more for 512 tokens than for 128)


def chunk_tokens_from(settings: ModelServerSettings) -> int:
    """The prefill chunk the settings ask for (None: by device); ValueError for a negative one."""
    chunk = settings.prefill_chunk_tokens
    if chunk is None:
        return CPU_CHUNK_TOKENS if torch.device(settings.device).type == "cpu" else ACCELERATOR_CHUNK_TOKENS
    if chunk < 0:
        raise ValueError(f"--prefill-chunk-tokens must be >= 0 (0: no chunks), got {chunk}")
    return chunk


def worker_problems(settings: ModelServerSettings) -> list[str]:
    found = []
    if settings.max_queue_per_caller is not None and settings.max_queue_per_caller < 1:
        found.append(f"--max-queue-per-caller must be at least 1, got {settings.max_queue_per_caller}")
    if settings.pass_tokens < 1:
        found.append(f"--pass-tokens must be at least 1, got {settings.pass_tokens}")
    return found


def prefill_lane_from(settings: ModelServerSettings) -> PrefillLane | None:
    """The prefill lane the flags ask for, or None; ValueError (a message for the operator) if they are wrong."""
    if settings.prefill_cpus is None:
        return None
    lane = PrefillLane(settings.prefill_min_tokens, parse_cpus(settings.prefill_cpus))
    problems = lane.problems()
    if problems:
        raise ValueError("; ".join(problems))
    return lane


def runtime_options_from(settings: ModelServerSettings) -> RuntimeOptions:
    """What the flags size a runtime's KV pool by (make_runtime's `options`); ValueError for a flag out of range."""
    if settings.slot_tokens < 0:
        raise ValueError(f"--slot-tokens must be >= 0 (0: the model's context, at most 8192), got {settings.slot_tokens}")
    if not 0 < settings.gpu_memory_fraction <= 1:
        raise ValueError(f"--gpu-memory-fraction must be in (0, 1], got {settings.gpu_memory_fraction}")
    return RuntimeOptions(slot_tokens=settings.slot_tokens, gpu_memory_fraction=settings.gpu_memory_fraction,
                          session_memory_mb=settings.session_memory_mb, max_sessions=settings.max_sessions)


def sessions_for_slots(slots: int) -> int:
    """The most sessions a store may be bounded to when its caches take slots of a fixed pool (serving/sessions.py:
    most_caches, its headroom over the bound and a restart's second cache, within the slots)."""
    bound = max(1, slots - 2)
    while bound > 1 and most_caches(bound) > slots:
        bound -= 1
    return bound


def fit_to_pool(hosted: Hosted, settings: ModelServerSettings) -> tuple[int, int]:
    """The session store's bounds (max_sessions, max_bytes), and the service's max_context, for a runner with
    a fixed KV pool (the static runtime: `session_slots` slots of `slot_bytes`, `max_context` tokens each):
    the pool is then the memory budget, the store evicts idle sessions (freeing their slots) before the pool
    runs out, and no request may pass a slot. Other runners: the flags' bounds, unchanged."""
    max_sessions, max_bytes = settings.max_sessions, int(settings.session_memory_mb * (1 << 20))
    runner = hosted.runner
    slots = getattr(runner, "session_slots", None)
    if slots:
        max_sessions = min(max_sessions, sessions_for_slots(slots))
        max_bytes = max_sessions * runner.slot_bytes
    limit = getattr(runner, "max_context", None)
    if limit and hosted.identity.max_context > limit:
        hosted.identity.max_context = limit  # GetModelInfo says it; requests past it are refused (OUT_OF_RANGE)
    return max_sessions, max_bytes


@dataclass
class Hosted:
    """What a model service serves, built from its flags: what it says it is (GetModelInfo, and the limits its
    requests are checked against), what its servicer runs (a runner; a drafter), how a session's cache is made,
    and the torch runner inside, if there is one (None: no model, as for the n-gram drafter)."""
    identity: LoadedModel | ModelIdentity
    backend: object
    new_cache: Callable[[], object]
    runner: object | None


def host_model(settings: ModelServerSettings) -> Hosted:
    """The usual host: a causal LM from --model and its runner (the verify service's target)."""
    options = runtime_options_from(settings)
    loaded = load_model(settings.model, settings.device, settings.dtype)
    runner = make_runtime(loaded.model, loaded.device, settings.runtime, options)
    return Hosted(loaded, runner, runner.new_cache, runner)


def start_model_server(settings: ModelServerSettings, servicer_class, add_to_server, service_name: str,
                       interceptors=(), host: Callable[[ModelServerSettings], Hosted] = host_model) -> RunningServer:
    """`host` builds what the service serves (loading weights or not); the servicer is
    servicer_class(identity, backend, store, ...)."""
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    lane = prefill_lane_from(settings)
    chunk_tokens = chunk_tokens_from(settings)
    problems = worker_problems(settings)
    if problems:
        raise ValueError("; ".join(problems))
    runtime_options_from(settings)  # its flags refused before any weights are read, whoever builds the runtime
    hosted = host(settings)
    max_sessions, max_bytes = fit_to_pool(hosted, settings)
    if lane is not None and hosted.runner is not None and not hosted.runner.capabilities.concurrent_passes:
        # Two forwards at once on one model: the lean runner keeps no state between calls but the
        # caches it is given; the HF forward is not checked for that. (No model: nothing shared between lanes.)
        raise ValueError("--prefill-cpus needs a runtime that runs two passes at once: lean (Llama, Mistral, Qwen2/3 "
                         "models, --runtime auto or lean on a CPU)")
    store = SessionStore(hosted.new_cache, max_bytes=max_bytes, max_sessions=max_sessions, ttl_s=settings.session_ttl_s)
    servicer = servicer_class(hosted.identity, hosted.backend, store, max_draft_tokens=settings.max_draft_tokens,
                              max_batch=settings.max_batch, max_wait_ms=settings.max_wait_ms,
                              max_queue=settings.max_queue, prefill_lane=lane, chunk_tokens=chunk_tokens,
                              max_queue_per_caller=settings.max_queue_per_caller, pass_tokens=settings.pass_tokens)
    running = start_server([(add_to_server, servicer)], [service_name], settings.port, settings.host,
                           settings.max_workers, interceptors, settings.max_concurrent_rpcs, tls=settings.tls,
                           api_key_file=settings.api_key_file, health_port=settings.health_port,
                           max_request_mb=settings.max_request_mb,
                           max_calls_per_caller=settings.max_calls_per_caller)
    watch_sessions(service_name, store)
    running.servicer = servicer
    running.on_drain.append(servicer.start_draining)  # SIGTERM: no new sessions, those held go on
    running.busy = servicer.busy  # the drain waits until every session is released
    return running
