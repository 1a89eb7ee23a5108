"""`specdec bench --concurrency 1,4,16,32`: aggregate throughput at each level of concurrent streams,
ours against target-only decoding batched at the same level (HF generate on that many prompts).

Every level serves the same workload (by default as many prompts as the largest level): ours with
`level` generations in flight at any time, target-only in `generate` calls of `level` prompts. So the
levels compare on the same prompts: one stream is not one prompt's acceptance rate.

The whole deployment shares the machine's two cores. Pinned (the default, as in the batch-1 bench): the
verify service on core 1, the draft service, the orchestrator and the client on core 0, which is how the
services would sit on separate nodes, and the verify's prefill lane on core 0 (--prefill-cpus: prompts
prefilled beside the batched rounds; `--no-prefill-lane` leaves it out); unpinned, the scheduler places
them. The verify service batches across sessions (lean runtime), the orchestrator adapts gamma to the
load (--gamma-policy load, or fixed with `--gamma-policy fixed`). Target-only decoding runs unpinned, on
one and on two torch threads, and the faster counts: all of the machine, its best case. Each level runs
ours and then target-only, so that the VM's drift between levels weighs on both alike; `--repeats N` does
that N times per level and reports medians.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm

from benchmarking.tracing_overhead import cpu_seconds
from local_stack.processes import REPO_ROOT, local_stack
from specdec_client import Client
from trace_analysis.breakdown import percentile


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (benchmarking.tracing_overhead reads /proc); None where there is none."""
    try:
        return cpu_seconds([pid])
    except OSError:
        return None


def run_ours(client: Client, prompts: list[str], max_new_tokens: int, streams: int | None = None) -> dict:
    """All `prompts` through the orchestrator, `streams` generations in flight at any time (a closed loop:
    each stream takes the next prompt when its generation ends); all at once when `streams` is None."""
    per_token, batches, gammas, tokens = [], Counter(), Counter(), [0]
    lock = threading.Lock()
    pending = list(reversed(prompts))

    def one(prompt: str) -> None:
        last = time.perf_counter()
        for chunk in client.stream(prompt, max_new_tokens):
            now = time.perf_counter()
            with lock:
                if chunk.token_ids:
                    per_token.extend([(now - last) / len(chunk.token_ids)] * len(chunk.token_ids))
                    tokens[0] += len(chunk.token_ids)
                if chunk.round:
                    batches[int(chunk.round["verify_batch_size"])] += 1
                    gammas[int(chunk.round["num_draft_tokens"])] += 1
            last = now

    def stream() -> None:
        while True:
            with lock:
                if not pending:
                    return
                prompt = pending.pop()
            one(prompt)

    threads = [threading.Thread(target=stream) for _ in range(streams or len(prompts))]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    ms = [t * 1000 for t in per_token]
    return {"tokens": tokens[0], "wall_s": round(wall, 3), "tokens_per_s": round(tokens[0] / wall, 2),
            "p50_ms_per_token": round(percentile(ms, 50), 3), "p99_ms_per_token": round(percentile(ms, 99), 3),
            "verify_batch_size_histogram": {str(k): v for k, v in sorted(batches.items())},
            "gamma_histogram": {str(k): v for k, v in sorted(gammas.items())}}


def run_target_batched(target: str, prompts: list[str], max_new_tokens: int, threads: int,
                       batch_size: int | None = None) -> dict:
    command = [sys.executable, "-m", "benchmarking.hf_baselines", "--system", "target_batched", "--target", target,
               "--draft", target, "--prompts", json.dumps(prompts), "--max-new-tokens", str(max_new_tokens),
               "--threads", str(threads), "--batch-size", str(batch_size or len(prompts))]
    # All of the machine, whatever this process is pinned to.
    everywhere = ((lambda: os.sched_setaffinity(0, range(os.cpu_count() or 1)))
                  if hasattr(os, "sched_setaffinity") else None)
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, preexec_fn=everywhere)
    if done.returncode != 0:
        raise RuntimeError(f"target_batched failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ms = [t * 1000 for t in result["step_s"]]
    return {"tokens": result["tokens"], "tokens_per_s": round(result["tokens"] / result["wall_s"], 2),
            "p50_ms_per_token": round(percentile(ms, 50), 3), "p99_ms_per_token": round(percentile(ms, 99), 3)}


@contextmanager
def _affinity(cpus: set[int] | None) -> Iterator[None]:
    """This process (the client's threads) on `cpus` for the block; no-op where affinity is not offered."""
    if cpus is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _merge_runs(runs: list[dict]) -> dict:
    """One level's repeated runs of ours as one entry: medians of the rates and percentiles, summed
    histograms, each run's tokens/s kept."""
    entry = dict(runs[len(runs) // 2])
    for key in ("tokens_per_s", "p50_ms_per_token", "p99_ms_per_token", "wall_s"):
        entry[key] = round(statistics.median([run[key] for run in runs]), 3)
    for key in ("verify_batch_size_histogram", "gamma_histogram"):
        total: Counter = Counter()
        for run in runs:
            total.update(run[key])
        entry[key] = {k: total[k] for k in sorted(total, key=int)}
    entry["cpu_cores"] = {role: round(sum(run["cpu_cores"][role] for run in runs) / len(runs), 3)
                          for role in runs[0].get("cpu_cores", {})}
    entry["tokens"] = sum(run["tokens"] for run in runs)
    entry["tokens_per_s_runs"] = [run["tokens_per_s"] for run in runs]
    return entry


def run_concurrency(target: str, draft: str, prompts: list[str], levels: list[int], max_new_tokens: int,
                    num_draft_tokens: int, verify_threads: int = 1, gamma_policy: str = "load",
                    pinned: bool = True, verify_cpu: int = 1, draft_cpu: int = 0,
                    workload: int | None = None, repeats: int = 1, prefill_lane: bool = True) -> tuple[dict, dict]:
    """({level: results}, the protocol as run). Every level serves the same workload: `workload` prompts
    (default: as many as the largest level; the prompt file cycled), `level` at a time. With `repeats`
    > 1 each level runs ours and target-only in turn that many times and reports the medians: on a
    shared VM one run of a level moved by 20 % between identical runs."""
    report: dict = {}
    work = [prompts[i % len(prompts)] for i in range(workload or max(levels))]
    repeats = max(1, repeats)
    progress = tqdm(total=2 * len(levels) * repeats, desc="concurrency", unit="run", file=sys.stderr)
    pinned = pinned and sys.platform.startswith("linux") and (os.cpu_count() or 1) > max(verify_cpu, draft_cpu)
    cpu = (lambda c: c) if pinned else (lambda c: None)
    # One torch thread for the verify service: with two, verify, draft and orchestrator oversubscribe
    # the two cores and 32 streams fell from 222 to 79 tokens/s (docs/benchmarks.md). Its prefills run on
    # a second thread on the draft's core (--prefill-cpus), beside its batched rounds.
    # The client with the draft side: set before the client's channel starts its threads, which inherit it.
    lane = ("--prefill-cpus", str(draft_cpu)) if pinned and prefill_lane else ()
    with _affinity({draft_cpu} if pinned else None), \
            local_stack(target, draft, threads=1,
                        verify_args=("--runtime", "lean", "--threads", str(verify_threads), *lane),
                        orchestrator_args=("--gamma-policy", gamma_policy, "--num-draft-tokens", str(num_draft_tokens)),
                        draft_cpu=cpu(draft_cpu), orchestrator_cpu=cpu(draft_cpu), verify_cpu=cpu(verify_cpu),
                        ) as stack, Client(stack.orchestrator, timeout=1800) as client:
        client.generate(prompts[0], max_new_tokens=8)  # warm-up
        roles = {"draft": stack.processes[0].pid, "verify": stack.processes[1].pid,
                 "orchestrator": stack.processes[2].pid, "client": os.getpid()}
        for level in levels:
            ours_runs, target_runs = [], {1: [], 2: []}
            for _ in range(repeats):
                progress.set_postfix_str(f"specdec x{level}")
                before, started = {role: _cpu_seconds(pid) for role, pid in roles.items()}, time.perf_counter()
                ours = run_ours(client, work, max_new_tokens, streams=level)
                wall = time.perf_counter() - started
                # Where the two cores went: CPU seconds per second of each process while the level ran.
                ours["cpu_cores"] = {role: round((_cpu_seconds(pid) - before[role]) / wall, 3)
                                     for role, pid in roles.items() if before[role] is not None}
                ours_runs.append(ours)
                progress.update(1)
                progress.set_postfix_str(f"target batched x{level}")
                # Its best case: one torch thread is faster at small batches, two at large ones.
                for threads in target_runs:
                    target_runs[threads].append(run_target_batched(target, work, max_new_tokens, threads=threads,
                                                                   batch_size=level))
                progress.update(1)
            report[str(level)] = entry = _merge_runs(ours_runs)
            rates = {threads: statistics.median([r["tokens_per_s"] for r in runs]) for threads, runs in target_runs.items()}
            best_threads = max(rates, key=lambda t: rates[t])
            best = target_runs[best_threads]
            entry["target_only_threads"] = best_threads
            entry["target_only_tokens_per_s_by_threads"] = {str(t): round(r, 2) for t, r in rates.items()}
            entry["target_only_tokens_per_s"] = round(rates[best_threads], 2)
            entry["target_only_tokens_per_s_runs"] = [r["tokens_per_s"] for r in best]
            entry["target_only_p50_ms_per_token"] = round(statistics.median([r["p50_ms_per_token"] for r in best]), 3)
            entry["target_only_p99_ms_per_token"] = round(statistics.median([r["p99_ms_per_token"] for r in best]), 3)
            entry["vs_target_only"] = (round(entry["tokens_per_s"] / entry["target_only_tokens_per_s"], 3)
                                       if entry["target_only_tokens_per_s"] else 0)
    progress.close()
    first = report[str(levels[0])]["tokens_per_s"]
    for level in levels:
        report[str(level)]["vs_one_stream"] = round(report[str(level)]["tokens_per_s"] / first, 3) if first else 0
    protocol = {"pinned": pinned, "verify_cpu": verify_cpu if pinned else None,
                "verify_prefill_cpus": str(draft_cpu) if pinned and prefill_lane else None,
                "draft_orchestrator_client_cpu": draft_cpu if pinned else None, "verify_threads": verify_threads,
                "target_only_threads": "the faster of 1 and 2, per level", "max_new_tokens": max_new_tokens,
                "gamma_policy": gamma_policy, "num_draft_tokens": num_draft_tokens, "workload_prompts": len(work),
                "repeats": repeats, "statistic": "median over repeats" if repeats > 1 else "one run"}
    return report, protocol
