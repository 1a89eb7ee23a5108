"""One GPU check of the whole system, in one command, writing DIR/gpu_check.json after every section.

The command to run on the GPU machine (one H200, no network; the wheels come from benchmarking/gpu_wheels.txt,
fetched here into .whl/ by benchmarking/fetch_gpu_wheels.sh, and travel with `carry: [".whl"]`):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.:client_sdk PYTHONUNBUFFERED=1 GRPC_VERBOSITY=ERROR && python3 -m benchmarking.gpu_check --device cuda --out $OUT --budget-s 330

On a CPU, the same sections on tiny configs (hidden 64, 2 layers, vocabulary 512), in well under a minute
(tests/test_gpu_check.py runs this):

    python -m benchmarking.gpu_check --device cpu --tiny --out DIR

Sections (each wrapped: an exception is recorded with its type, message and traceback tail, and the run goes on;
each has a wall-clock budget inside the global --budget-s deadline, and work past it is skipped with the reason):

1. environment: versions, the device, host->device copies (pinned, pageable), a bf16 matmul's TFLOP/s, the
   device-to-device copy bandwidth the floors below divide by.
2. verify: a RANDOM-WEIGHT Llama-3.1-8B-config target in bf16 (built on the device), served by the runtime the
   services would use (static where it exists and takes the model, else make_runtime's auto), timed on verify
   passes of 1..8 new tokens x 1..32 sessions at contexts 512 and 2048, as ms and as a ratio to the memory
   floor (formula in the JSON). Done when 5 tokens at 1 session is within 1.3x the floor.
3. draft: a random-weight Llama-3.2-1B-config draft: one decode step, CUDA graphs vs eager (static runtime
   graphs=True / graphs=False). Done when graphs are at least 2x faster.
4. exactness: (a) the shipped reference pair in float32 on the device: greedy speculative output through each
   runtime and through the services equals HF generate's; (b) the bf16-vs-fp32 greedy argmax drift rate of a
   random model (a number, not a failure).
5. services: the real verify, draft and orchestrator services as separate processes on the one device (8B-config
   target and 1B-config draft co-located), target-only (gamma 0) vs speculative tokens/s through the client SDK,
   the orchestrator's round breakdown, 8 concurrent streams. Random weights make alpha meaningless, so the draft
   service hosts the BENCHMARK-ONLY oracle drafter (benchmarking/oracle_drafter.py: the real draft forwards, the
   target's known greedy continuation proposed with probability alpha). Done when alpha 0.8 gives >= 2x.

The random 8B target in sections 5 (and 2) is "structured" so that its greedy continuation is decided by wide
margins: its embeddings dominate the residual stream and its lm_head is a permutation of them (the next token is
a fixed function of the current one). Its cost is that of any 8B Llama; only its outputs are robust to bf16
rounding (the oracle's continuation, computed once target-only, stays the target's across batch shapes).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import queue
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from local_stack.paths import REPO_ROOT
from speculation.rejection import greedy_accept

SECTIONS = ("environment", "verify", "draft", "exactness", "services")

LLAMA3_ROPE_8B = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
LLAMA3_ROPE_1B = {**LLAMA3_ROPE_8B, "factor": 32.0}
TINY_ROPE = {**LLAMA3_ROPE_8B, "original_max_position_embeddings": 256}  # llama3 scaling too, at a tiny context
# max_position_embeddings: 16384 here (the real configs say 131072; llama3 RoPE wants it above the original 8192):
# rotary tables and any runtime that sizes by the context stay small; nothing measured reaches past 2.1k tokens.
TARGET_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 intermediate_size=14336, vocab_size=128256, rms_norm_eps=1e-5, max_position_embeddings=16384,
                 tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE_8B, head_dim=128)
DRAFT_1B = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=128256, rms_norm_eps=1e-5, max_position_embeddings=16384,
                tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE_1B, head_dim=64)
TINY_TARGET = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=512, rms_norm_eps=1e-5, max_position_embeddings=1024,
                   tie_word_embeddings=False, rope_parameters=TINY_ROPE, head_dim=16)
TINY_DRAFT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=512, rms_norm_eps=1e-5, max_position_embeddings=1024,
                  tie_word_embeddings=True, rope_parameters=TINY_ROPE, head_dim=8)

PLANS = {
    "full": dict(
        target=TARGET_8B, draft=DRAFT_1B, copy_mib=1024, h2d_mib=256, matmul_n=8192, matmul_reps=10,
        contexts=[512, 2048], sessions=[1, 4, 8, 32], new_tokens=[1, 5, 2, 8], warmup=2, reps=6,
        draft_sessions=[1, 8], draft_context=512, draft_steps=32, draft_reps=4,
        exact_prompts=4, exact_new=32, gammas_exact=[1, 4], drift_positions=512, drift_cfg="draft",
        prompt_len=64, max_new=128, single_prompts=4, streams=8, alphas=[0.8, 0.6], gammas=[4, 8],
        slot_tokens=4096, verify_slots=40, service_slots=48, service_slot_tokens=1024, child_ready_s=300,
        budgets={"environment": 25, "verify": 80, "draft": 40, "exactness": 45, "services": 140},
        reserves={"environment": 0, "verify": 0, "draft": 20, "exactness": 20, "services": 100},
    ),
    "tiny": dict(
        target=TINY_TARGET, draft=TINY_DRAFT, copy_mib=32, h2d_mib=8, matmul_n=256, matmul_reps=3,
        contexts=[32, 96], sessions=[1, 4], new_tokens=[1, 5], warmup=1, reps=3,
        draft_sessions=[1, 4], draft_context=32, draft_steps=8, draft_reps=2,
        exact_prompts=2, exact_new=12, gammas_exact=[1, 4], drift_positions=128, drift_cfg="target",
        prompt_len=12, max_new=20, single_prompts=2, streams=4, alphas=[0.8, 0.6], gammas=[4],
        slot_tokens=256, verify_slots=8, service_slots=16, service_slot_tokens=256, child_ready_s=120,
        # generous: on a shared 2-core CI machine a section can take 3-5x its quiet-machine time
        budgets={"environment": 30, "verify": 60, "draft": 45, "exactness": 120, "services": 150},
        reserves={"environment": 0, "verify": 0, "draft": 5, "exactness": 5, "services": 40},
    ),
}

STRUCTURE_EMBED_STD = 64.0  # the structured target's embeddings: far above what its layers add to the residual
EOS = 0  # the structured target never predicts it (its lm_head row is zero; prompts never hold it)


def log(message: str) -> None:
    print(message, flush=True)


def tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def r(x, digits: int = 3):
    return None if x is None else round(float(x), digits)


# -- the report ---------------------------------------------------------------------------------------------


class Report:
    """The JSON file, rewritten (atomically) after every section and every measured row."""

    def __init__(self, out_dir: Path, meta: dict):
        self.path = out_dir / "gpu_check.json"
        out_dir.mkdir(parents=True, exist_ok=True)
        self.data = {"meta": meta, "sections": {}}
        self.lock = threading.Lock()
        self.current: str | None = None

    def write(self) -> None:
        with self.lock:
            tmp = self.path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(self.data, indent=1, default=str))
            os.replace(tmp, self.path)


class Budget:
    def __init__(self, total_s: float):
        self.start = time.monotonic()
        self.deadline = self.start + total_s

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start


class Section:
    """What a section function gets: its dict in the report, its deadline, and a way to skip with a reason."""

    def __init__(self, name: str, data: dict, deadline: float, report: Report):
        self.name, self.data, self.deadline, self.report = name, data, deadline, report

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def over(self, what: str, need_s: float = 0.0) -> bool:
        """True (and the skip recorded) when `what` would start past this section's deadline."""
        if self.left() > need_s:
            return False
        self.data.setdefault("skipped", []).append(f"{what}: section budget spent ({self.left():.1f} s left)")
        self.report.write()
        return True

    def write(self) -> None:
        self.report.write()


# -- devices and timing -------------------------------------------------------------------------------------


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, reps: int, setup=None) -> dict:
    """fn timed `reps` times after `warmup` runs; setup (untimed) before each. Wall ms with a device sync before
    and after (what a caller waits), and on CUDA the events' ms (the stream's time from first to last kernel)."""
    import torch

    for _ in range(warmup):
        if setup:
            setup()
        fn()
    walls, events = [], []
    for _ in range(reps):
        if setup:
            setup()
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start.record()
            fn()
            end.record()
            sync(device)
            walls.append((time.perf_counter() - t0) * 1e3)
            events.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            walls.append((time.perf_counter() - t0) * 1e3)
    out = {"ms": r(statistics.median(walls), 4), "ms_min": r(min(walls), 4), "reps": reps}
    if events:
        out["event_ms"] = r(statistics.median(events), 4)
    return out


def measure_bandwidth(device, mib: int) -> dict:
    """Device-to-device copy (bytes read + bytes written per second) and a read-only pass (a sum)."""
    import torch

    n = mib << 20
    a = torch.empty(n, dtype=torch.uint8, device=device)
    a.random_(0, 255) if device.type == "cuda" else a.fill_(1)
    b = torch.empty_like(a)
    copy = timed(lambda: b.copy_(a), device, 3, 10)
    floats = a.view(torch.float32)
    floats.zero_()
    read = timed(lambda: floats.sum(), device, 3, 10)
    key = "event_ms" if "event_ms" in copy else "ms"
    result = {"bytes": n, "copy_ms": copy[key], "d2d_copy_GBps": r(2 * n / (copy[key] * 1e-3) / 1e9, 1),
              "d2d_copy_one_way_GBps": r(n / (copy[key] * 1e-3) / 1e9, 1),
              "read_sum_GBps": r(n / (read[key] * 1e-3) / 1e9, 1),
              "note": "d2d_copy_GBps counts bytes read + bytes written (2 x size / time): the memory's traffic rate, "
                      "the divisor of every floor below"}
    return result


# -- models -------------------------------------------------------------------------------------------------


def build_llama(cfg: dict, device, dtype, seed: int, structured: bool = False):
    """A random-weight LlamaForCausalLM built directly on `device` in `dtype` (never on the host first)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**cfg, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    for p in model.parameters():
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
    model.eval().requires_grad_(False)
    if structured:
        structure(model, seed)
    return model


def structure(model, seed: int) -> None:
    """Wide-margin greedy outputs (see the module docstring): embeddings of std STRUCTURE_EMBED_STD dominate the
    residual stream, and lm_head row perm(t) is token t's embedding direction, so the argmax after token t is
    perm(t) by a wide margin whatever the layers add; perm is a random permutation of 1..vocab-1, row EOS is 0."""
    import torch

    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    if embed is head or embed.data_ptr() == head.data_ptr():
        raise ValueError("a structured model needs untied embeddings")
    vocab = embed.shape[0]
    generator = torch.Generator(device="cpu").manual_seed(seed + 7)
    with torch.no_grad():
        embed.normal_(0.0, STRUCTURE_EMBED_STD)
        perm = (torch.randperm(vocab - 1, generator=generator) + 1).to(embed.device)
        sources = torch.arange(1, vocab, device=embed.device)
        directions = embed[sources].float()
        directions = directions / directions.norm(dim=-1, keepdim=True)
        head.zero_()
        head[perm] = directions.to(head.dtype)


def weight_read_bytes(model) -> int:
    """Bytes one forward reads of the weights: every parameter, except an untied input embedding (a pass reads
    only its tokens' rows of it)."""
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    tied = embed is head or (embed.device.type != "meta" and embed.data_ptr() == head.data_ptr())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total if tied else total - embed.numel() * embed.element_size()


def kv_bytes_per_token(cfg: dict, element: int) -> int:
    return cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * cfg["head_dim"] * element


def build_static(model, graphs: bool, **sizes):
    """The static runtime on this model (sizes: its constructor's slots / slot_tokens); (None, why) if it refuses."""
    from serving.runtimes.static import StaticRuntime

    try:
        runtime = StaticRuntime(model, graphs=graphs, **sizes)
        runtime.check()
    except Exception as error:  # noqa: BLE001 - it refuses the model, or fails: the caller falls back
        return None, f"static runtime refused: {type(error).__name__}: {error}"
    return runtime, ""


def make_rt(model, device, name: str, sessions: int, slot_tokens: int):
    """make_runtime(model, device, name), a pooled runtime (static) sized for `sessions` sessions of `slot_tokens`
    (not make_runtime's default of 90 % of the free GPU memory)."""
    from serving.runtimes import RuntimeOptions, make_runtime

    return make_runtime(model, device, name, RuntimeOptions(max_sessions=sessions, slot_tokens=slot_tokens))


def serving_runtime(model, device, slots: int, slot_tokens: int):
    """The runtime the services would serve this model with on this device: static on CUDA where it exists and
    takes the model (its KV pool sized here: `slots` sessions of `slot_tokens`, not 90 % of the GPU, so that two
    services share one), else make_runtime's auto. Returns (runtime, how it was chosen)."""
    from serving.runtimes import make_runtime

    why = "cpu: auto" if device.type != "cuda" else ""
    # GPU_CHECK_FORCE_STATIC=1: the static runtime off CUDA too (eager there), to try the GPU run's path on a CPU
    if device.type == "cuda" or os.environ.get("GPU_CHECK_FORCE_STATIC") == "1":
        runtime, why = build_static(model, True, slots=slots, slot_tokens=slot_tokens)
        if runtime is not None:
            return runtime, f"static (slots={slots}, slot_tokens={slot_tokens})"
    runtime = make_runtime(model, device, "auto")
    return runtime, f"make_runtime auto -> {runtime.name} ({why})"


def runtime_stats(runtime) -> dict | None:
    stats = getattr(runtime, "stats", None)
    if callable(stats):
        try:
            return stats()
        except Exception as error:  # noqa: BLE001
            return {"error": repr(error)}
    return None


def free_device(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def release(caches: list) -> None:
    """Give pooled caches' slots back now (the static runtime's caches have release(); others need nothing)."""
    for cache in caches:
        give_back = getattr(cache, "release", None)
        if callable(give_back):
            give_back()


def prefill(runtime, caches: list, context: int, vocab: int, rng: random.Random, chunk: int = 512) -> None:
    for cache in caches:
        tokens = [rng.randrange(1, vocab) for _ in range(context)]
        for i in range(0, context, chunk):
            runtime.extend(cache, tokens[i:i + chunk], 1)


# -- sections -----------------------------------------------------------------------------------------------


def section_environment(sec: Section, ctx: dict) -> None:
    import numpy
    import torch
    import transformers

    device, plan, data = ctx["device"], ctx["plan"], sec.data
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "numpy": numpy.__version__,
                "torch_cuda": torch.version.cuda}
    for name in ("grpc", "google.protobuf", "opentelemetry.version"):
        try:
            module = __import__(name, fromlist=["__version__"])
            versions[name] = getattr(module, "__version__", "?")
        except Exception as error:  # noqa: BLE001
            versions[name] = f"missing ({type(error).__name__})"
    data["versions"] = versions
    data["device"] = str(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        free, total = torch.cuda.mem_get_info(device)
        data.update(device_name=props.name, compute_capability=f"{props.major}.{props.minor}",
                    multiprocessors=props.multi_processor_count, memory_GiB=r(total / 2**30, 1),
                    free_GiB=r(free / 2**30, 1))
    else:
        data.update(device_name=platform.processor() or platform.machine(), cpu_threads=torch.get_num_threads())
    sec.write()
    data["bandwidth"] = ctx["bandwidth"] = measure_bandwidth(device, plan["copy_mib"])
    log(f"  d2d copy {data['bandwidth']['d2d_copy_GBps']} GB/s (read+write), read-only sum "
        f"{data['bandwidth']['read_sum_GBps']} GB/s")
    sec.write()
    if device.type == "cuda":
        n = plan["h2d_mib"] << 20
        pageable = torch.empty(n, dtype=torch.uint8).fill_(1)
        pinned = pageable.pin_memory()
        target = torch.empty(n, dtype=torch.uint8, device=device)
        h2d = {}
        for name, host in (("pinned", pinned), ("pageable", pageable)):
            t = timed(lambda host=host: target.copy_(host, non_blocking=True), device, 2, 5)
            h2d[f"{name}_GBps"] = r(n / (t["ms"] * 1e-3) / 1e9, 2)
        data["h2d"] = {"bytes": n, **h2d}
        log(f"  host->device pinned {h2d['pinned_GBps']} GB/s, pageable {h2d['pageable_GBps']} GB/s")
        del pageable, pinned, target
    else:
        data["h2d"] = "not applicable on a CPU"
    sec.write()
    n = plan["matmul_n"]
    dtype = torch.bfloat16
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = timed(lambda: a @ b, device, 3, plan["matmul_reps"])
    key = "event_ms" if "event_ms" in t else "ms"
    data["matmul"] = {"n": n, "dtype": "bfloat16", "ms": t[key], "TFLOPs": r(2 * n**3 / (t[key] * 1e-3) / 1e12, 1)}
    log(f"  bf16 matmul {n}^3: {data['matmul']['TFLOPs']} TFLOP/s")


def floor_ms(weight_bytes: int, kv_bytes: int, bandwidth: dict) -> float:
    return (weight_bytes + kv_bytes) / (bandwidth["d2d_copy_GBps"] * 1e9) * 1e3


FLOOR_FORMULA = ("floor_ms = (weight_bytes_read + sessions * (context + new_tokens) * kv_bytes_per_token) / "
                 "(environment.bandwidth.d2d_copy_GBps * 1e9) * 1e3; weight_bytes_read = every parameter's bytes "
                 "except an untied input embedding's (a pass reads only its tokens' rows); kv_bytes_per_token = "
                 "layers * 2 * kv_heads * head_dim * element size; ratio = measured ms / floor_ms (wall ms, device "
                 "synced before and after: what the service's clock bills a pass)")


def ensure_bandwidth(ctx: dict) -> dict:
    if "bandwidth" not in ctx:
        ctx["bandwidth"] = measure_bandwidth(ctx["device"], ctx["plan"]["copy_mib"])
    return ctx["bandwidth"]


def section_verify(sec: Section, ctx: dict) -> None:
    import torch

    device, plan, dtype, data = ctx["device"], ctx["plan"], ctx["dtype"], sec.data
    cfg = plan["target"]
    t0 = time.perf_counter()
    model = build_llama(cfg, device, dtype, seed=1, structured=True)
    data["build_s"] = r(time.perf_counter() - t0, 2)
    data["config"] = {**cfg, "dtype": str(dtype).removeprefix("torch."), "weights": "random (structured)"}
    slot_tokens = plan["slot_tokens"]
    runtime, how = serving_runtime(model, device, plan["verify_slots"], slot_tokens)
    data["runtime"], data["runtime_choice"] = runtime.name, how
    data["capabilities"] = vars(runtime.capabilities) if hasattr(runtime.capabilities, "__dict__") else str(runtime.capabilities)
    element = torch.empty((), dtype=dtype).element_size()
    weights = weight_read_bytes(model)
    per_token = kv_bytes_per_token(cfg, element)
    bandwidth = ensure_bandwidth(ctx)
    data.update(weight_bytes_read=weights, kv_bytes_per_token=per_token, floor_formula=FLOOR_FORMULA,
                floor_bandwidth_GBps=bandwidth["d2d_copy_GBps"],
                num_parameters=sum(p.numel() for p in model.parameters()))
    log(f"  target built in {data['build_s']} s; runtime {how}; weights read per pass {weights / 1e9:.2f} GB, "
        f"floor at 1 session {floor_ms(weights, 0, bandwidth):.3f} ms")
    sec.write()
    rows = data["rows"] = []
    rng = random.Random(0)
    vocab = cfg["vocab_size"]
    for context in plan["contexts"]:
        caches: list = []
        for sessions in plan["sessions"]:
            if sec.over(f"context {context}, {sessions} sessions"):
                break
            try:
                while len(caches) < sessions:
                    cache = runtime.new_cache()
                    prefill(runtime, [cache], context, vocab, rng)
                    caches.append(cache)
            except Exception as error:  # noqa: BLE001 - a pool too small, say: recorded, the next context goes on
                rows.append({"context": context, "sessions": sessions, "error": f"prefill: {type(error).__name__}: {error}"})
                sec.write()
                break
            for n in plan["new_tokens"]:
                if sec.over(f"context {context}, {sessions} sessions, {n} tokens"):
                    break
                row = {"context": context, "sessions": sessions, "new_tokens": n}
                try:
                    live = caches[:sessions]
                    tokens = [[rng.randrange(1, vocab) for _ in range(n)] for _ in live]

                    def crop(live=live, context=context):
                        for c in live:
                            c.crop(context)

                    t = timed(lambda live=live, tokens=tokens, n=n: runtime.extend_batch(live, tokens, [n] * len(live)),
                              device, plan["warmup"], plan["reps"], setup=crop)
                    crop()
                    floor = floor_ms(weights, sessions * (context + n) * per_token, bandwidth)
                    row.update(t, floor_ms=r(floor, 4), ratio_to_floor=r(t["ms"] / floor, 3),
                               tokens_per_s=r(sessions * n / (t["ms"] * 1e-3), 1))
                    log(f"  verify ctx {context:5d} sessions {sessions:2d} tokens {n}: {t['ms']:8.3f} ms "
                        f"(events {t.get('event_ms', '-')}) floor {floor:.3f} ms -> {row['ratio_to_floor']}x")
                except Exception as error:  # noqa: BLE001
                    row["error"] = f"{type(error).__name__}: {error}"
                    log(f"  verify ctx {context} sessions {sessions} tokens {n}: ERROR {row['error']}")
                rows.append(row)
                sec.write()
        release(caches)  # now: the timing closures above still hold the last context's caches
        del caches
        free_device(device)
    first = plan["contexts"][0]
    done = next((x for x in rows if x.get("context") == first and x.get("sessions") == 1
                 and x.get("new_tokens") == 5 and "ratio_to_floor" in x), None)
    data["done_when"] = {"criterion": f"5 new tokens, 1 session, context {first}: ms <= 1.3 x floor_ms",
                         "ratio": done and done["ratio_to_floor"],
                         "met": None if done is None else done["ratio_to_floor"] <= 1.3}
    data["runtime_stats"] = runtime_stats(runtime)
    log(f"  done-when (5 tokens, 1 session <= 1.3x floor): {data['done_when']['ratio']} -> {data['done_when']['met']}")
    if not sec.over("kernel profile of a verify pass", 5):
        try:
            data["kernel_profile_5_tokens_1_session"] = profile_verify(runtime, device, first, vocab)
            log(f"  kernels per verify pass (5 tokens, 1 session): {data['kernel_profile_5_tokens_1_session']}")
        except Exception as error:  # noqa: BLE001
            data["kernel_profile_5_tokens_1_session"] = {"error": f"{type(error).__name__}: {error}"}
        sec.write()
    if getattr(runtime, "use_graphs", False) and not sec.over("the same pass without graphs", 5):
        # The same weights without graphs (the fusion is shared, not copied): what the graphs are worth here.
        try:
            eager, why = build_static(model, False, slots=2, slot_tokens=slot_tokens)
            cache = eager.new_cache()
            prefill(eager, [cache], first, vocab, rng)
            tokens = [[rng.randrange(1, vocab) for _ in range(5)]]
            t = timed(lambda: eager.extend_batch([cache], tokens, [5]), device, plan["warmup"], plan["reps"],
                      setup=lambda: cache.crop(first))
            data["eager_5_tokens_1_session"] = {**t, "ratio_to_floor": r(t["ms"] / done["floor_ms"], 3) if done else None}
            log(f"  without graphs (5 tokens, 1 session, context {first}): {t['ms']:.3f} ms")
            release([cache])
            del eager
        except Exception as error:  # noqa: BLE001
            data["eager_5_tokens_1_session"] = {"error": f"{type(error).__name__}: {error}"}
        sec.write()


def time_decode(runtime, device, sessions: int, context: int, steps: int, reps: int, vocab: int) -> dict:
    """ms per decode_step at `sessions` sessions of `context` tokens: `steps` steps in a row, each fed the
    previous step's argmax on the device (the draft's inner loop), synced once at the end."""
    import torch

    rng = random.Random(1)
    caches = [runtime.new_cache() for _ in range(sessions)]
    try:
        prefill(runtime, caches, context, vocab, rng)
        first = torch.tensor([rng.randrange(1, vocab) for _ in range(sessions)], device=device)

        def run():
            tokens = first
            for _ in range(steps):
                tokens = runtime.decode_step(caches, tokens).argmax(-1)
            return tokens

        def crop():
            for c in caches:
                c.crop(context)

        t = timed(run, device, 1, reps, setup=crop)
        return {"ms_per_step": r(t["ms"] / steps, 4), "ms_per_step_min": r(t["ms_min"] / steps, 4),
                "event_ms_per_step": r(t["event_ms"] / steps, 4) if "event_ms" in t else None, "steps": steps,
                "reps": reps}
    finally:
        release(caches)


def profile_decode(runtime, device, context: int, vocab: int, steps: int = 4) -> dict:
    """What one decode step at 1 session is made of on the device: kernels per step, their summed device time, and
    the most expensive kind (torch.profiler; kernels inside a replayed graph are recorded too). The gap between
    the summed kernel time and the weight-read floor is kernel count times each small kernel's minimum."""
    import torch

    rng = random.Random(2)
    caches = [runtime.new_cache()]
    try:
        prefill(runtime, caches, context, vocab, rng)
        state = {"tokens": torch.tensor([rng.randrange(1, vocab)], device=device)}

        def step():
            state["tokens"] = runtime.decode_step(caches, state["tokens"]).argmax(-1)

        return profile_kernels(step, device, steps)
    finally:
        release(caches)


def profile_verify(runtime, device, context: int, vocab: int, new_tokens: int = 5, passes: int = 4) -> dict:
    """The same for one verify pass of `new_tokens` at 1 session (rolled back after each, so every pass is alike)."""
    rng = random.Random(3)
    caches = [runtime.new_cache()]
    try:
        prefill(runtime, caches, context, vocab, rng)
        tokens = [[rng.randrange(1, vocab) for _ in range(new_tokens)]]

        def step():
            runtime.extend_batch(caches, tokens, [new_tokens])
            caches[0].crop(context)

        return profile_kernels(step, device, passes)
    finally:
        release(caches)


def profile_kernels(step, device, repeats: int) -> dict:
    """Kernels per call of `step` on the device (after two warm-up calls), their device time, the costliest kinds."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            step()
        sync(device)
    kernels = [e for e in prof.events() if getattr(e, "device_type", None) is not None
               and str(e.device_type).endswith("CUDA")]
    by_name: dict[str, float] = {}
    for e in kernels:
        us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        by_name[e.name] = by_name.get(e.name, 0.0) + us
    total_us = sum(by_name.values())
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:6]
    return {"kernels_per_step": r(len(kernels) / repeats, 1), "kernel_ms_per_step": r(total_us / repeats / 1000, 4),
            "top": [[name[:60], r(us / repeats, 1)] for name, us in top]}


def section_draft(sec: Section, ctx: dict) -> None:
    from serving.runtimes import make_runtime

    device, plan, dtype, data = ctx["device"], ctx["plan"], ctx["dtype"], sec.data
    cfg = plan["draft"]
    t0 = time.perf_counter()
    model = build_llama(cfg, device, dtype, seed=2)
    data["build_s"] = r(time.perf_counter() - t0, 2)
    data["config"] = {**cfg, "dtype": str(dtype).removeprefix("torch."), "weights": "random"}
    bandwidth = ensure_bandwidth(ctx)
    data["floor_ms_1_session"] = r(floor_ms(weight_read_bytes(model), 0, bandwidth), 4)
    sizes = {"slots": max(plan["draft_sessions"]) + 2, "slot_tokens": plan["slot_tokens"]}
    variants: dict[str, object] = {}
    if device.type == "cuda":
        graphs, why = build_static(model, True, **sizes)
        if graphs is not None and getattr(graphs, "use_graphs", graphs.capabilities.graphs):
            variants["static_graphs"] = graphs
        else:
            data["graphs"] = f"unavailable: {why or 'the static runtime did not turn graphs on'}"
            if graphs is not None:
                variants["static_no_graphs"] = graphs
    else:
        data["graphs"] = "unavailable: CUDA graphs need a CUDA device"
    eager, why = build_static(model, False, **sizes)
    if eager is not None:
        variants["static_eager"] = eager
    else:
        data["static_eager"] = f"unavailable: {why}"
    try:
        lean = make_runtime(model, device, "lean")
        variants["lean_eager"] = lean
    except Exception as error:  # noqa: BLE001
        data["lean"] = f"unavailable: {type(error).__name__}: {error}"
    if not variants:
        variants["auto"] = make_runtime(model, device, "auto")
    data["variants"] = {name: getattr(rt, "name", "?") for name, rt in variants.items()}
    results = data["results"] = {}
    for sessions in plan["draft_sessions"]:
        for name, runtime in variants.items():
            if sec.over(f"{name} at {sessions} sessions"):
                continue
            try:
                row = time_decode(runtime, device, sessions, plan["draft_context"], plan["draft_steps"],
                                  plan["draft_reps"], cfg["vocab_size"])
            except Exception as error:  # noqa: BLE001
                row = {"error": f"{type(error).__name__}: {error}", "traceback": tail(traceback.format_exc(), 8)}
            results.setdefault(str(sessions), {})[name] = row
            log(f"  draft decode step, {sessions} session(s), {name}: {row.get('ms_per_step', row.get('error'))} ms")
            sec.write()
    data["runtime_stats"] = {name: runtime_stats(rt) for name, rt in variants.items()}
    for name in ("static_graphs", "static_eager"):
        if name in variants and not sec.over(f"kernel profile of {name}", 3):
            try:
                data.setdefault("kernel_profile", {})[name] = profile_decode(
                    variants[name], device, plan["draft_context"], cfg["vocab_size"])
                log(f"  kernels per decode step, {name}: {data['kernel_profile'][name]}")
            except Exception as error:  # noqa: BLE001
                data.setdefault("kernel_profile", {})[name] = {"error": f"{type(error).__name__}: {error}"}
            sec.write()
    one = results.get(str(plan["draft_sessions"][0]), {})
    graphs_ms = one.get("static_graphs", {}).get("ms_per_step")
    eager_ms = (one.get("static_eager") or {}).get("ms_per_step") or (one.get("lean_eager") or {}).get("ms_per_step")
    speedup = r(eager_ms / graphs_ms, 3) if graphs_ms and eager_ms else None
    data["done_when"] = {"criterion": "1 session: eager ms per decode step >= 2 x graphs' (static graphs=False vs "
                                      "graphs=True)", "speedup": speedup,
                         "met": None if speedup is None else speedup >= 2.0}
    log(f"  done-when (graphs >= 2x eager): {speedup} -> {data['done_when']['met']}")


def spec_greedy(target_rt, draft_rt, prompt: list[int], gamma: int, max_new: int, eos: set[int]) -> list[int]:
    """Greedy speculative decoding straight on two runtimes (no services): draft gamma, verify gamma + 1,
    keep the agreeing prefix and the target's own next token, roll both caches back."""
    import torch

    tc, dc = target_rt.new_cache(), draft_rt.new_cache()
    device = getattr(draft_rt, "device", None)
    seq = list(prompt)
    out: list[int] = []
    nxt = int(target_rt.extend(tc, seq, 1)[-1].argmax())
    seq.append(nxt)
    out.append(nxt)
    while len(out) < max_new and nxt not in eos:
        logits = draft_rt.extend(dc, seq[dc.length:], 1)
        base = len(seq)
        drafts = []
        for j in range(gamma):
            token = int(logits[-1].argmax())
            drafts.append(token)
            if j < gamma - 1:  # the draft's inner loop: decode_step (a CUDA graph on the static runtime)
                logits = draft_rt.decode_step([dc], torch.tensor([token], device=device))
        scores = target_rt.extend(tc, [seq[-1]] + drafts, gamma + 1).argmax(-1).tolist()
        outcome = greedy_accept(drafts, scores)
        accepted = outcome.accepted
        for token in outcome.tokens(drafts):
            out.append(token)
            seq.append(token)
            if token in eos or len(out) >= max_new:
                break
        nxt = out[-1]
        tc.crop(len(seq) - 1)
        dc.crop(min(dc.length, base + min(accepted, gamma - 1)))
    return out[:max_new]


def section_exactness(sec: Section, ctx: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import draft_service.server as draft_server
    import orchestrator.server as orchestrator_server
    import verify_service.server as verify_server
    from local_stack.paths import DEFAULT_DRAFT, DEFAULT_TARGET, load_prompts
    from serving.model_server import ModelServerSettings
    from serving.runtimes import RUNTIMES
    from specdec_client import Client

    device, plan, data = ctx["device"], ctx["plan"], sec.data
    # (a) the shipped pair in float32 on the device
    pair = data["shipped_pair"] = {"target": str(DEFAULT_TARGET.relative_to(REPO_ROOT)),
                                   "draft": str(DEFAULT_DRAFT.relative_to(REPO_ROOT)), "dtype": "float32"}
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_TARGET)
    target = AutoModelForCausalLM.from_pretrained(DEFAULT_TARGET, dtype=torch.float32).to(device).eval()
    draft = AutoModelForCausalLM.from_pretrained(DEFAULT_DRAFT, dtype=torch.float32).to(device).eval()
    eos = target.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else (eos or []))
    prompts = load_prompts(limit=plan["exact_prompts"])
    max_new = plan["exact_new"]
    reference = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
            out = target.generate(ids, do_sample=False, max_new_tokens=max_new)
            reference.append((ids[0].tolist(), out[0, ids.shape[1]:].tolist()))
    pair["prompts"], pair["max_new_tokens"], pair["gammas"] = len(prompts), max_new, plan["gammas_exact"]
    pair["generate_s"] = r(time.perf_counter() - t0, 2)
    checks = pair["checks"] = []
    for name in [name for name in RUNTIMES if name != "auto"]:
        if sec.over(f"exactness through runtime {name}", 3):
            break
        try:
            t_rt = make_rt(target, device, name, 4, 1024)
            d_rt = make_rt(draft, device, name, 4, 1024)
        except Exception as error:  # noqa: BLE001 - a runtime that cannot serve the pair here
            checks.append({"runtime": name, "skipped": f"{type(error).__name__}: {error}"})
            continue
        for gamma in plan["gammas_exact"]:
            t0 = time.perf_counter()
            mismatches = [i for i, (ids, ref) in enumerate(reference)
                          if spec_greedy(t_rt, d_rt, ids, gamma, max_new, eos) != ref]
            checks.append({"runtime": name, "via": "runtimes", "gamma": gamma, "equal": not mismatches,
                           "mismatched_prompts": mismatches, "wall_s": r(time.perf_counter() - t0, 2)})
            log(f"  exactness runtime {name} gamma {gamma}: {'equal' if not mismatches else f'MISMATCH {mismatches}'}")
        sec.write()
        del t_rt, d_rt
    # ... and through the services (in this process; their auto runtimes, the orchestrator's acceptance)
    if not sec.over("exactness through the services", 5):
        # A pooled runtime (static, auto's choice on CUDA) sized for a few sessions, not 90 % of the GPU.
        settings = dict(device=str(device), dtype="float32", host="localhost", max_sessions=16,
                        gpu_memory_fraction=0.2, slot_tokens=1024)
        verify = drafter = orchestrator = None
        t0 = time.perf_counter()
        try:
            verify = verify_server.start(ModelServerSettings(str(DEFAULT_TARGET), **settings))
            drafter = draft_server.start(ModelServerSettings(str(DEFAULT_DRAFT), **settings))
            orchestrator = orchestrator_server.start(orchestrator_server.OrchestratorSettings(
                verify=f"localhost:{verify.port}", draft=f"localhost:{drafter.port}", host="localhost"))
            pair["services_startup_s"] = r(time.perf_counter() - t0, 2)
            with Client(f"localhost:{orchestrator.port}", timeout=120) as client:
                for gamma in plan["gammas_exact"]:
                    mismatches = [i for i, (prompt, (_, ref)) in enumerate(zip(prompts, reference))
                                  if client.generate(prompt, max_new_tokens=max_new, num_draft_tokens=gamma).token_ids != ref]
                    checks.append({"runtime": "auto (services)", "via": "services", "gamma": gamma,
                                   "equal": not mismatches, "mismatched_prompts": mismatches})
                    log(f"  exactness services gamma {gamma}: {'equal' if not mismatches else f'MISMATCH {mismatches}'}")
        finally:
            for server in (orchestrator, drafter, verify):
                if server is not None:
                    server.stop(grace=None)
    pair["services_s"] = r(time.perf_counter() - t0, 2)
    ran = [c for c in checks if "equal" in c]
    pair["equal"] = bool(ran) and all(c["equal"] for c in ran)
    pair["runs"] = len(ran)
    sec.write()
    del target, draft
    free_device(device)  # before the drift model is built
    # (b) bf16 drift on a random model: greedy argmax of bf16 vs float32 over N teacher-forced positions
    if sec.over("bf16 drift"):
        return
    cfg = plan[plan["drift_cfg"]]
    n = plan["drift_positions"]
    model = build_llama(cfg, device, torch.float32, seed=3)
    ids = torch.randint(1, cfg["vocab_size"], (1, n), generator=torch.Generator().manual_seed(5)).to(device)
    with torch.inference_mode():
        logits32 = model(ids).logits[0].float()
        model.to(torch.bfloat16)
        logits16 = model(ids).logits[0].float()
    top2 = logits32.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1])
    differ = int((logits32.argmax(-1) != logits16.argmax(-1)).sum())
    data["bf16_drift"] = {"model": f"random {plan['drift_cfg']} config ({cfg['hidden_size']} hidden, "
                                   f"{cfg['num_hidden_layers']} layers), plain random weights",
                          "positions": n, "argmax_differs": differ, "rate": r(differ / n, 4),
                          "fp32_top2_margin_median": r(float(margin.median()), 5),
                          "max_abs_logit_diff": r(float((logits32 - logits16).abs().max()), 4),
                          "note": "expected: random weights give near-tied logits; a number, not a failure"}
    log(f"  bf16 drift: {differ}/{n} positions' argmax differ from fp32 ({data['bf16_drift']['rate']})")


# -- section 5: the services as processes -----------------------------------------------------------------


class Child:
    """A service in its own process (`python -m benchmarking.gpu_check --child ROLE`), stderr to a shared log."""

    def __init__(self, role: str, spec: dict, log_path: Path):
        env = dict(os.environ)
        paths = [str(REPO_ROOT), str(REPO_ROOT / "client_sdk")]
        env["PYTHONPATH"] = os.pathsep.join([p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p] + paths)
        env.setdefault("GRPC_VERBOSITY", "ERROR")
        env["PYTHONUNBUFFERED"] = "1"
        self.role = role
        self.log = open(log_path, "a")
        self.process = subprocess.Popen([sys.executable, "-m", "benchmarking.gpu_check", "--child", role,
                                         "--child-spec", json.dumps(spec)], cwd=REPO_ROOT, env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def ready(self, timeout_s: float) -> dict:
        end = time.monotonic() + timeout_s
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the {self.role} service did not start in {timeout_s:.0f} s")
            try:
                line = self.lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"the {self.role} service exited with code {self.process.wait()} before it was "
                                   "ready (its stderr is in services.log)")
            if line.startswith("{"):
                message = json.loads(line)
                if "ready" in message:
                    return message

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.close()
                self.process.wait(timeout=10)
            except Exception:  # noqa: BLE001
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()


CHILDREN: list[Child] = []


def kill_children() -> None:
    for child in CHILDREN:
        if child.process.poll() is None:
            child.process.kill()


def build_tokenizer(out: Path, vocab: int) -> None:
    """A word-level tokenizer of exactly `vocab` ids ("t0" ... ), t0 the EOS: what the services pair and
    detokenize by (prompts are sent as token ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token=f"t{EOS}"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token=f"t{EOS}", unk_token=f"t{EOS}",
                            pad_token=f"t{EOS}").save_pretrained(out)


def child_identity(model, spec: dict, runtime):
    import torch

    from serving.model_loading import LoadedModel, tokenizer_fingerprint

    max_context = min(int(model.config.max_position_embeddings), int(getattr(runtime, "max_context", 1 << 30)))
    return LoadedModel(name_or_path=spec["tokenizer"], model=model, device=torch.device(spec["device"]),
                       dtype=model.dtype, vocab_size=int(model.lm_head.weight.shape[0]), max_context=max_context,
                       eos_token_ids=[EOS], tokenizer_fingerprint=tokenizer_fingerprint(spec["tokenizer"]),
                       num_parameters=sum(p.numel() for p in model.parameters()))


def child_main(role: str, spec: dict) -> None:
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING, format=f"[{role}] %(levelname)s %(name)s: %(message)s")
    device = torch.device(spec["device"])
    if device.type == "cpu":
        torch.set_num_threads(1)
    if role == "orchestrator":
        import orchestrator.server as orchestrator_server

        running = orchestrator_server.start(orchestrator_server.OrchestratorSettings(
            verify=spec["verify"], draft=spec["draft"], host="localhost", tokenizer=spec["tokenizer"],
            num_draft_tokens=4, max_draft_tokens=16, ready_timeout_s=60.0, overlap=spec.get("overlap", True)))
        print(json.dumps({"ready": running.port}), flush=True)
    else:
        from serving.model_server import Hosted, ModelServerSettings, start_model_server

        dtype = getattr(torch, spec["dtype"])
        t0 = time.perf_counter()
        if role == "verify":
            model = build_llama(spec["target"], device, dtype, seed=1, structured=True)
        else:
            model = build_llama(spec["draft"], device, dtype, seed=2)
        runtime, how = serving_runtime(model, device, spec["slots"], spec["slot_tokens"])
        identity = child_identity(model, spec, runtime)
        settings = ModelServerSettings(model=spec["tokenizer"], host="localhost", device=spec["device"],
                                       session_memory_mb=1 << 20,
                                       # the store may admit a quarter more than max_sessions, and one more:
                                       # within the static pool's slots
                                       max_sessions=max(8, spec["slots"] // 2 - 1))
        if role == "verify":
            from specdec_api import verify_pb2_grpc
            from specdec_api.method_paths import VERIFY_SERVICE
            from verify_service.servicer import VerifyServicer

            hosted = Hosted(identity, runtime, runtime.new_cache, runtime)
            running = start_model_server(settings, VerifyServicer, verify_pb2_grpc.add_VerifyServiceServicer_to_server,
                                         VERIFY_SERVICE, host=lambda _settings: hosted)
        else:
            from benchmarking.oracle_drafter import OracleDrafter
            from draft_service.servicer import DraftServicer
            from specdec_api import draft_pb2_grpc
            from specdec_api.method_paths import DRAFT_SERVICE

            drafter = OracleDrafter(identity, runtime, spec["control"])
            hosted = Hosted(identity, drafter, drafter.new_cache, runtime)
            running = start_model_server(settings, DraftServicer, draft_pb2_grpc.add_DraftServiceServicer_to_server,
                                         DRAFT_SERVICE, host=lambda _settings: hosted)
        print(json.dumps({"ready": running.port, "runtime": runtime.name, "runtime_choice": how,
                          "build_s": round(time.perf_counter() - t0, 2)}), flush=True)
    sys.stdin.read()  # until the parent closes it (or dies)
    running.stop(grace=None)
    os._exit(0)


def stream_one(client, prompt: list[int], max_new: int, gamma: int) -> dict:
    ids, rounds, stats = [], [], {}
    started = time.perf_counter()
    first = None
    for chunk in client.stream(prompt, max_new, num_draft_tokens=gamma):
        if chunk.token_ids and first is None:
            first = time.perf_counter() - started
        ids.extend(chunk.token_ids)
        if chunk.round:
            rounds.append(chunk.round)
        if chunk.stats is not None:
            stats = chunk.stats
    return {"token_ids": ids, "wall_s": time.perf_counter() - started, "rounds": rounds, "stats": stats,
            "first_token_s": first}


ROUND_FIELDS = ("round_ms", "draft_ms", "verify_ms", "draft_compute_ms", "verify_compute_ms", "queue_ms",
                "network_ms", "orchestrator_ms", "draft_hidden_ms", "draft_critical_compute_ms", "draft_step_ms",
                "verify_batch_size", "bytes")


def run_streams(address: str, prompts: list[list[int]], max_new: int, gamma: int, concurrency: int) -> dict:
    """The prompts through the orchestrator, `concurrency` at a time; tokens/s over the whole wall time."""
    from specdec_client import Client

    with Client(address, timeout=300) as client:
        started = time.perf_counter()
        if concurrency <= 1:
            results = [stream_one(client, p, max_new, gamma) for p in prompts]
        else:
            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                results = list(pool.map(lambda p: stream_one(client, p, max_new, gamma), prompts))
        wall = time.perf_counter() - started
    tokens = sum(len(x["token_ids"]) for x in results)
    rounds = [rd for x in results for rd in x["rounds"]]
    drafted = sum(int(x["stats"].get("drafted_tokens", 0)) for x in results)
    accepted = sum(int(x["stats"].get("accepted_tokens", 0)) for x in results)
    summary = {"gamma": gamma, "streams": concurrency, "prompts": len(prompts), "max_new_tokens": max_new,
               "tokens": tokens, "wall_s": r(wall, 3), "tokens_per_s": r(tokens / wall, 2) if wall else None,
               "per_stream_tokens_per_s_median": r(statistics.median(len(x["token_ids"]) / x["wall_s"] for x in results), 2),
               "first_token_s_median": r(statistics.median(x["first_token_s"] or 0 for x in results), 4),
               "rounds": len(rounds), "tokens_per_round": r(tokens / len(rounds), 3) if rounds else None,
               "drafted_tokens": drafted, "accepted_tokens": accepted,
               "acceptance_rate": r(accepted / drafted, 4) if drafted else None}
    if rounds:
        summary["round_p50"] = {k: r(statistics.median(float(rd.get(k, 0)) for rd in rounds), 4)
                                for k in ROUND_FIELDS if k in rounds[0]}
    summary["stats_example"] = dict(results[0]["stats"]) if results else {}
    summary["_outputs"] = [x["token_ids"] for x in results]
    return summary


def write_control(path: Path, alpha: float, sequences: list[list[int]], seed: int = 11) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"alpha": alpha, "seed": seed, "sequences": sequences}))
    os.replace(tmp, path)


def section_services(sec: Section, ctx: dict) -> None:
    device, plan, dtype, data = ctx["device"], ctx["plan"], ctx["dtype"], sec.data
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    tok_dir = work / "tokenizer"
    vocab = plan["target"]["vocab_size"]
    build_tokenizer(tok_dir, vocab)
    control = work / "oracle.json"
    write_control(control, 0.0, [])
    log_path = ctx["out"] / "services.log"
    spec = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "tokenizer": str(tok_dir),
            "target": plan["target"], "draft": plan["draft"], "control": str(control),
            "slots": plan["service_slots"], "slot_tokens": plan["service_slot_tokens"]}
    data["setup"] = {"target": "8B-config random structured" if plan["target"] is TARGET_8B else "tiny target",
                     "draft": "1B-config random" if plan["draft"] is DRAFT_1B else "tiny draft",
                     "placement": f"verify and draft services as separate processes on the one {device}; orchestrator "
                                  "a third process; the client in this one",
                     "drafter": "benchmarking/oracle_drafter.py (BENCHMARK-ONLY: real draft forwards, proposals "
                                "right with probability alpha)", "log": log_path.name}
    t0 = time.perf_counter()
    verify = Child("verify", spec, log_path)
    CHILDREN.append(verify)
    draft = Child("draft", spec, log_path)
    CHILDREN.append(draft)
    try:
        timeout = min(plan["child_ready_s"], max(sec.left(), 10))
        verify_ready = verify.ready(timeout)
        draft_ready = draft.ready(max(timeout - (time.perf_counter() - t0), 10))
        data["verify_service"], data["draft_service"] = verify_ready, draft_ready
        orchestrator = Child("orchestrator", {"verify": f"localhost:{verify_ready['ready']}",
                                              "draft": f"localhost:{draft_ready['ready']}",
                                              "tokenizer": str(tok_dir), "device": "cpu"}, log_path)
        CHILDREN.append(orchestrator)
        # A second orchestrator without overlap: co-located, drafting ahead shares the one GPU with the verify
        # it should hide behind (speculation/placement.py predicts it adds instead); both are measured.
        serial = Child("orchestrator", {"verify": f"localhost:{verify_ready['ready']}",
                                        "draft": f"localhost:{draft_ready['ready']}", "overlap": False,
                                        "tokenizer": str(tok_dir), "device": "cpu"}, log_path)
        CHILDREN.append(serial)
        address = f"localhost:{orchestrator.ready(max(sec.left(), 10))['ready']}"
        ctx["no_overlap_address"] = f"localhost:{serial.ready(max(sec.left(), 10))['ready']}"
        data["startup_s"] = r(time.perf_counter() - t0, 2)
        log(f"  services up in {data['startup_s']} s: verify {verify_ready.get('runtime_choice')}, draft "
            f"{draft_ready.get('runtime_choice')}")
        sec.write()
        services_measure(sec, plan, {True: address, False: ctx["no_overlap_address"]}, control, vocab)
    except Exception:
        data["services_log_tail"] = tail(log_path.read_text(errors="replace"), 40) if log_path.exists() else ""
        raise
    finally:
        for child in reversed(CHILDREN):
            child.stop()
        CHILDREN.clear()


def services_measure(sec: Section, plan: dict, addresses: dict, control: Path, vocab: int) -> None:
    """`addresses`: the orchestrator with overlap (True) and without (False)."""
    data = sec.data
    address = addresses[True]
    rng = random.Random(3)
    streams = plan["streams"]
    prompts = [[rng.randrange(1, vocab) for _ in range(plan["prompt_len"])] for _ in range(streams)]
    single = prompts[:plan["single_prompts"]]
    max_new = plan["max_new"]
    warm = [rng.randrange(1, vocab) for _ in range(plan["prompt_len"])]
    run_streams(address, [warm], 8, 0, 1)  # warm-up: target-only, then speculative (graphs, pools)
    run_streams(address, [warm], 8, plan["gammas"][0], 1)
    runs = data["runs"] = []
    outputs: dict[int, list[int]] = {}

    def record(label: str, summary: dict, alpha: float | None) -> dict:
        got = summary.pop("_outputs")
        summary["label"], summary["alpha"] = label, alpha
        if alpha is not None:
            known = [outputs.get(i) for i in range(len(got))]
            summary["outputs_equal_target_only"] = all(k is None or k == g for k, g in zip(known, got))
        runs.append(summary)
        sec.write()
        extra = f" accept {summary['acceptance_rate']} tokens/round {summary['tokens_per_round']}" if alpha is not None else ""
        log(f"  services {label}: {summary['tokens_per_s']} tokens/s ({summary['tokens']} tokens, "
            f"{summary['wall_s']} s){extra}")
        return got

    got = record("target-only, 1 stream", run_streams(address, single, max_new, 0, 1), None)
    outputs.update(enumerate(got))
    base_single = runs[-1]["tokens_per_s"]

    def sequences():
        return [prompts[i] + outputs[i] for i in sorted(outputs)]

    jobs = []  # (alpha, gamma, concurrency[, overlap]), in priority order: the done-when first
    first_gamma = plan["gammas"][0]
    jobs.append((plan["alphas"][0], first_gamma, 1))
    jobs.append((plan["alphas"][0], first_gamma, 1, False))
    jobs.append(("target", 0, streams))
    jobs.append((plan["alphas"][0], first_gamma, streams))
    for alpha in plan["alphas"][1:]:
        jobs.append((alpha, first_gamma, 1))
    for gamma in plan["gammas"][1:]:
        for alpha in plan["alphas"]:
            jobs.append((alpha, gamma, 1))
    for alpha in plan["alphas"][1:]:
        jobs.append((alpha, first_gamma, streams))
    base_multi = None
    for alpha, gamma, concurrency, *rest in jobs:
        overlap = rest[0] if rest else True
        label = (f"target-only, {concurrency} streams" if alpha == "target"
                 else f"alpha {alpha}, gamma {gamma}, {concurrency} stream{'s' if concurrency > 1 else ''}"
                      f"{'' if overlap else ', no overlap'}")
        if sec.over(label, 5):
            continue
        batch = single if concurrency == 1 else prompts
        if alpha == "target":
            got = record(label, run_streams(address, batch, max_new, 0, concurrency), None)
            for i, ids in enumerate(got):
                if i in outputs and outputs[i] != ids:
                    runs[-1].setdefault("differs_from_1_stream", []).append(i)
                outputs.setdefault(i, ids)
            base_multi = runs[-1]["tokens_per_s"]
            continue
        if concurrency > 1 and len(outputs) < len(batch):
            sec.data.setdefault("skipped", []).append(f"{label}: no target-only continuation for every prompt")
            continue
        write_control(control, alpha, sequences())
        summary = run_streams(addresses[overlap], batch, max_new, gamma, concurrency)
        summary["overlap"] = overlap
        base = base_single if concurrency == 1 else base_multi
        summary["speedup_vs_target_only"] = r(summary["tokens_per_s"] / base, 3) if base else None
        record(label, summary, alpha)
    best = [x for x in runs if x.get("alpha") == plan["alphas"][0] and x["streams"] == 1]
    top = max(best, key=lambda x: x["tokens_per_s"], default=None)
    data["done_when"] = {"criterion": f"alpha {plan['alphas'][0]}, 1 stream, draft co-located: speculative tokens/s "
                                      ">= 2 x target-only tokens/s through the services",
                         "target_only_tokens_per_s": base_single, "gamma": top and top["gamma"],
                         "speculative_tokens_per_s": top and top["tokens_per_s"],
                         "speedup": top and top["speedup_vs_target_only"],
                         "met": None if top is None or top["speedup_vs_target_only"] is None
                         else top["speedup_vs_target_only"] >= 2.0}
    log(f"  done-when (alpha 0.8 >= 2x target-only): {data['done_when']['speedup']} at gamma "
        f"{data['done_when']['gamma']} -> {data['done_when']['met']}")


SECTION_FUNCTIONS = {"environment": section_environment, "verify": section_verify, "draft": section_draft,
                     "exactness": section_exactness, "services": section_services}


# -- the run ------------------------------------------------------------------------------------------------


def run_section(name: str, report: Report, budget: Budget, plan: dict, ctx: dict, only: set[str] | None) -> None:
    data = report.data["sections"][name] = {"status": "running"}
    if only is not None and name not in only:
        data["status"] = "skipped"
        data["reason"] = "not in --sections"
        report.write()
        return
    later = sum(plan["reserves"][s] for s in SECTIONS[SECTIONS.index(name) + 1:])
    deadline = min(time.monotonic() + plan["budgets"][name], budget.deadline - later)
    if deadline - time.monotonic() < 3:
        data["status"] = "skipped"
        data["reason"] = f"global budget: {budget.left():.0f} s left, {later} s reserved for later sections"
        report.write()
        log(f"[{name}] skipped: {data['reason']}")
        return
    data["budget_s"] = r(deadline - time.monotonic(), 1)
    report.current = name
    log(f"[{name}] (budget {data['budget_s']} s, {budget.elapsed():.0f} s into the run)")
    report.write()
    started = time.perf_counter()
    try:
        SECTION_FUNCTIONS[name](Section(name, data, deadline, report), ctx)
        data["status"] = "ok"
    except Exception as error:  # noqa: BLE001 - recorded; the next section runs
        data["status"] = "error"
        data["error"] = {"type": type(error).__name__, "message": str(error)[:2000],
                         "traceback": tail(traceback.format_exc(), 25)}
        log(f"[{name}] ERROR {type(error).__name__}: {str(error)[:500]}")
        log(tail(traceback.format_exc(), 8))
    finally:
        free_device(ctx["device"])  # the section's models and caches went with its frame
        data["wall_s"] = r(time.perf_counter() - started, 2)
        report.current = None
        report.write()
        log(f"[{name}] {data['status']} in {data['wall_s']} s")


def start_watchdog(report: Report, budget: Budget, grace_s: float) -> None:
    """Past the deadline plus grace, a hung section is recorded, the services are killed and the run exits."""
    def watch():
        while budget.left() > -grace_s:
            time.sleep(1.0)
        report.data["watchdog"] = {"fired": True, "section": report.current,
                                   "note": f"the run was past --budget-s by {grace_s:.0f} s; stopped"}
        if report.current:
            report.data["sections"][report.current]["status"] = "error"
            report.data["sections"][report.current]["error"] = {"type": "Watchdog", "message": "section hung past the deadline"}
        report.write()
        log(f"WATCHDOG: past the deadline in section {report.current}; exiting")
        kill_children()
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--tiny", action="store_true", help="tiny configs (a CPU smoke run of every section)")
    parser.add_argument("--sections", default="", help="comma-separated subset of " + ",".join(SECTIONS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-spec", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(args.child, json.loads(args.child_spec))
        return 0
    if args.out is None:
        parser.error("--out DIR is required")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    budget = Budget(args.budget_s)
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    plan = dict(PLANS["tiny" if args.tiny else "full"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report = Report(args.out, {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "device": str(device),
                               "plan": "tiny" if args.tiny else "full", "budget_s": args.budget_s,
                               "dtype": str(dtype).removeprefix("torch."), "argv": sys.argv[1:],
                               "host": platform.node()})
    report.write()
    start_watchdog(report, budget, grace_s=45.0)
    signal.signal(signal.SIGTERM, lambda *_: (report.data.setdefault("terminated", True), report.write(),
                                              kill_children(), os._exit(143)))
    only = {s.strip() for s in args.sections.split(",") if s.strip()} or None
    ctx = {"device": device, "plan": plan, "dtype": dtype, "out": args.out}
    log(f"gpu_check: device {device}, plan {'tiny' if args.tiny else 'full'}, dtype {dtype}, budget {args.budget_s} s")
    for name in SECTIONS:
        run_section(name, report, budget, plan, ctx, only)
    report.data["meta"]["wall_s"] = r(budget.elapsed(), 1)
    report.write()
    summary = {name: report.data["sections"][name].get("status") for name in SECTIONS}
    dones = {name: report.data["sections"][name].get("done_when", {}).get("met") for name in SECTIONS
             if "done_when" in report.data["sections"][name]}
    log(f"gpu_check done in {budget.elapsed():.0f} s: {summary}; done-when: {dones}; wrote {report.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
