"""`specdec bench --concurrency 1,4,16,32`: aggregate throughput at each level of concurrent streams,
ours against target-only decoding batched at the same level (HF generate on that many prompts).

The whole deployment shares both cores (no pinning): the verify service batches across sessions (lean
runtime), the orchestrator adapts gamma to the load (--gamma-policy load, or fixed with `--gamma-policy fixed`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter

from tqdm import tqdm

from benchmarking.bench import percentile
from specdec_cli.local_stack import REPO_ROOT, local_stack
from specdec_client import Client
from telemetry.overhead import cpu_seconds


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (telemetry.overhead reads /proc); None where there is none."""
    try:
        return cpu_seconds([pid])
    except OSError:
        return None


def _prompts_for(prompts: list[str], level: int) -> list[str]:
    return [prompts[i % len(prompts)] for i in range(level)]


def run_ours(client: Client, prompts: list[str], max_new_tokens: int) -> dict:
    per_token, batches, gammas, tokens = [], Counter(), Counter(), [0]
    lock = threading.Lock()

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

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
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


def run_target_batched(target: str, prompts: list[str], max_new_tokens: int, threads: int) -> dict:
    command = [sys.executable, "-m", "benchmarking.hf_baselines", "--system", "target_batched", "--target", target,
               "--draft", target, "--prompts", json.dumps(prompts), "--max-new-tokens", str(max_new_tokens),
               "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    if done.returncode != 0:
        raise RuntimeError(f"target_batched failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ms = [t * 1000 for t in result["step_s"]]
    return {"tokens": result["tokens"], "tokens_per_s": round(result["tokens"] / result["wall_s"], 2),
            "p50_ms_per_token": round(percentile(ms, 50), 3), "p99_ms_per_token": round(percentile(ms, 99), 3)}


def run_concurrency(target: str, draft: str, prompts: list[str], levels: list[int], max_new_tokens: int,
                    num_draft_tokens: int, verify_threads: int = 1, gamma_policy: str = "load") -> dict:
    report: dict = {}
    progress = tqdm(total=2 * len(levels), desc="concurrency", unit="run", file=sys.stderr)
    # One torch thread for the verify service: with two, verify, draft and orchestrator oversubscribe
    # the two cores and 32 streams fell from 222 to 79 tokens/s (docs/benchmarks.md).
    with local_stack(target, draft, threads=1, verify_args=("--runtime", "lean", "--threads", str(verify_threads)),
                     orchestrator_args=("--gamma-policy", gamma_policy, "--num-draft-tokens", str(num_draft_tokens))
                     ) as stack, Client(stack.orchestrator, timeout=1800) as client:
        client.generate(prompts[0], max_new_tokens=8)  # warm-up
        roles = {"draft": stack.processes[0].pid, "verify": stack.processes[1].pid,
                 "orchestrator": stack.processes[2].pid, "client": os.getpid()}
        for level in levels:
            progress.set_postfix_str(f"specdec x{level}")
            before, started = {role: _cpu_seconds(pid) for role, pid in roles.items()}, time.perf_counter()
            ours = run_ours(client, _prompts_for(prompts, level), max_new_tokens)
            wall = time.perf_counter() - started
            # Where the two cores went: CPU seconds per second of each process while the level ran.
            ours["cpu_cores"] = {role: round((_cpu_seconds(pid) - before[role]) / wall, 3)
                                 for role, pid in roles.items() if before[role] is not None}
            progress.update(1)
            report[str(level)] = ours
    for level in levels:
        progress.set_postfix_str(f"target batched x{level}")
        base = run_target_batched(target, _prompts_for(prompts, level), max_new_tokens, threads=2)
        progress.update(1)
        entry = report[str(level)]
        entry["target_only_tokens_per_s"] = base["tokens_per_s"]
        entry["target_only_p50_ms_per_token"] = base["p50_ms_per_token"]
        entry["target_only_p99_ms_per_token"] = base["p99_ms_per_token"]
        entry["vs_target_only"] = round(entry["tokens_per_s"] / base["tokens_per_s"], 3) if base["tokens_per_s"] else 0
    progress.close()
    first = report[str(levels[0])]["tokens_per_s"]
    for level in levels:
        report[str(level)]["vs_one_stream"] = round(report[str(level)]["tokens_per_s"] / first, 3) if first else 0
    return report
