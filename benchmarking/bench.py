"""Runs target_only, hf_assisted and specdec side by side on the same prompts and summarises them.

Protocol (the deployment we sell, emulated on one machine by pinning): everything that runs on the
target's hardware -- target_only, hf_assisted (both models share one accelerator in-process) and the
verify service -- on core `target_cpu` with one torch thread; the draft service and the orchestrator on
core `draft_cpu`. `pinned=False` runs the same with no pinning (labelled as such). `tls=True` runs the
three specdec processes with mTLS between every pair (a throwaway CA in a temporary directory), the
bench's client included; the baselines run in-process and are not affected.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from local_stack.processes import REPO_ROOT, local_stack
from specdec_client import Client
from specdec_client.results import GenerationResult
from speculation.gamma_policy import expected_speedup
from trace_analysis.breakdown import percentile


@dataclass
class BenchSettings:
    target: str
    draft: str
    prompts: list[str]
    max_new_tokens: int = 128
    num_draft_tokens: int = 4
    pinned: bool = True
    target_cpu: int = 1
    draft_cpu: int = 0
    seed: int = 0
    modes: tuple[str, ...] = ("greedy", "temperature_1")
    orchestrator_args: tuple[str, ...] = ()
    tls: bool = False  # mTLS between client, orchestrator, draft and verify


def _summary(rows: list[dict]) -> dict:
    tokens = sum(len(r["token_ids"]) for r in rows)
    wall = sum(r["wall_s"] for r in rows)
    per_token_ms = [t * 1000 for r in rows for t in r["per_token_s"]]
    return {"tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2) if wall else 0.0,
            "p50_ms_per_token": round(percentile(per_token_ms, 50), 3),
            "p99_ms_per_token": round(percentile(per_token_ms, 99), 3)}


class BaselineWorker:
    """A long-lived benchmarking.hf_baselines process (pinned like the target), one prompt at a time."""

    def __init__(self, system: str, settings: BenchSettings):
        command = [sys.executable, "-m", "benchmarking.hf_baselines", "--serve", "--system", system,
                   "--target", settings.target, "--draft", settings.draft, "--threads", "1"]
        if settings.pinned:
            command = ["taskset", "-c", str(settings.target_cpu), *command]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
        self.system = system
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO_ROOT)
        if "ready" not in self._read():
            raise RuntimeError(f"{system} worker did not start")

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.system} worker exited with code {self.process.wait()}")
        return json.loads(line)

    def generate(self, prompt: str, max_new_tokens: int, sample: bool, seed: int) -> dict:
        self.process.stdin.write(json.dumps({"prompt": prompt, "max_new_tokens": max_new_tokens,
                                             "sample": sample, "seed": seed}) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def specdec_generate(client: Client, prompt: str, max_new_tokens: int, options: dict) -> tuple[dict, list, dict]:
    result, per_token, rounds = GenerationResult(), [], []
    started = last = time.perf_counter()
    for chunk in client.stream(prompt, max_new_tokens, **options):
        now = time.perf_counter()
        if chunk.token_ids:
            per_token.extend([(now - last) / len(chunk.token_ids)] * len(chunk.token_ids))
        last = now
        result.add(chunk)
        if chunk.round:
            rounds.append(chunk.round)
    row = {"token_ids": result.token_ids, "wall_s": time.perf_counter() - started, "per_token_s": per_token}
    return row, rounds, result.stats


def summarise_specdec(rows: list[dict], rounds: list[dict], stats: list[dict], gamma: int) -> dict:
    drafted = sum(s["drafted_tokens"] for s in stats)
    accepted = sum(s["accepted_tokens"] for s in stats)
    rejections = sum(1 for r in rounds if int(r["num_draft_tokens"]) > int(r["accepted"]))

    def median(key):
        return round(statistics.median(float(r[key]) for r in rounds), 3) if rounds else 0.0

    # Non-compute time on the critical path: the draft compute hidden behind verify is not subtracted.
    overheads = [float(r["round_ms"]) - float(r["draft_critical_compute_ms"]) - float(r["verify_compute_ms"])
                 for r in rounds]
    steps = [float(r["draft_step_ms"]) for r in rounds if float(r["draft_step_ms"]) > 0]
    return {
        **_summary(rows), "token_ids": [r["token_ids"] for r in rows],
        # Leviathan's per-token alpha (accepted / (accepted + rejections)); acceptance_rate is per draft.
        "alpha": round(accepted / (accepted + rejections), 4) if accepted + rejections else 0.0,
        "acceptance_rate": round(accepted / drafted, 4) if drafted else 0.0,
        "draft_step_ms_p50": round(statistics.median(steps), 3) if steps else 0.0,
        "overlapped_rounds": sum(s.get("overlapped_rounds", 0) for s in stats),
        "mean_accepted_len": round(sum(len(r["token_ids"]) for r in rows) / max(1, len(rounds)), 3),
        "num_draft_tokens": gamma, "rounds": len(rounds),
        "round_ms_p50": median("round_ms"),
        "overhead_ms_p50": round(percentile(overheads, 50), 3),
        "round_split_ms_p50": {k: median(k) for k in ("draft_ms", "verify_ms", "draft_critical_compute_ms",
                                                        "draft_hidden_ms", "verify_compute_ms", "network_ms",
                                                        "orchestrator_ms")},
        "bytes_per_round": round(statistics.mean(int(r["bytes"]) for r in rounds), 1) if rounds else 0.0,
    }


SYSTEMS = ("target_only", "hf_assisted", "specdec")


def run_bench(settings: BenchSettings) -> dict:
    """Systems interleaved prompt by prompt, in rotating order, so the machine's drifting speed (a
    shared VM) weighs on all of them alike."""
    report: dict = {"protocol": {
        "pinned": settings.pinned, "target_cpu": settings.target_cpu if settings.pinned else None,
        "draft_cpu": settings.draft_cpu if settings.pinned else None, "threads_per_process": 1,
        "prompts": len(settings.prompts), "max_new_tokens": settings.max_new_tokens,
        "num_draft_tokens": settings.num_draft_tokens, "target": settings.target, "draft": settings.draft,
        "order": "interleaved per prompt, rotating", "tls": "mTLS" if settings.tls else "plaintext"}}
    cpu = (lambda c: c) if settings.pinned else (lambda c: None)
    workers = {s: BaselineWorker(s, settings) for s in ("target_only", "hf_assisted")}
    progress = tqdm(total=len(settings.modes) * len(settings.prompts), desc="bench", unit="prompt", file=sys.stderr)
    tls_dir = tempfile.TemporaryDirectory(prefix="specdec-bench-tls-") if settings.tls else None
    try:
        with local_stack(settings.target, settings.draft, draft_cpu=cpu(settings.draft_cpu),
                         verify_cpu=cpu(settings.target_cpu), orchestrator_cpu=cpu(settings.draft_cpu), threads=1,
                         orchestrator_args=settings.orchestrator_args,
                         tls_dir=Path(tls_dir.name) if tls_dir else None) as stack, \
                Client(stack.orchestrator, **stack.client_tls) as client:
            for worker in workers.values():  # warm-up
                worker.generate(settings.prompts[0], 8, False, 0)
            client.generate(settings.prompts[0], max_new_tokens=8)
            for mode in settings.modes:
                sample = mode != "greedy"
                rows = {s: [] for s in SYSTEMS}
                rounds, stats = [], []
                for i, prompt in enumerate(settings.prompts):
                    seed = settings.seed + i
                    order = SYSTEMS[i % 3:] + SYSTEMS[:i % 3]
                    for system in order:
                        if system == "specdec":
                            options = {"num_draft_tokens": settings.num_draft_tokens}
                            if sample:
                                options.update(temperature=1.0, seed=seed)
                            row, r, st = specdec_generate(client, prompt, settings.max_new_tokens, options)
                            rows[system].append(row)
                            rounds.extend(r)
                            stats.append(st)
                        else:
                            rows[system].append(workers[system].generate(prompt, settings.max_new_tokens, sample, seed))
                    progress.update(1)
                report[mode] = {s: {**_summary(rows[s]), "token_ids": [r["token_ids"] for r in rows[s]]}
                                for s in ("target_only", "hf_assisted")}
                report[mode]["specdec"] = summarise_specdec(rows["specdec"], rounds, stats, settings.num_draft_tokens)
    finally:
        for worker in workers.values():
            worker.close()
        progress.close()
        if tls_dir is not None:
            tls_dir.cleanup()
    for mode in settings.modes:
        base = report[mode]["target_only"]["tokens_per_s"]
        for result in report[mode].values():
            result["speedup_vs_target_only"] = round(result["tokens_per_s"] / base, 3) if base else 0.0
    greedy = report.get("greedy")
    if greedy:
        ids = [greedy[s]["token_ids"] for s in SYSTEMS]
        report["greedy_outputs_identical"] = ids[0] == ids[1] == ids[2]
        # Top-level entries per system are the greedy results (the headline numbers).
        for system, result in greedy.items():
            report[system] = {k: v for k, v in result.items() if k != "token_ids"}
    for mode in settings.modes:
        for result in report[mode].values():
            result.pop("token_ids", None)
    return report


def add_leviathan_bound(report: dict, cost_ratio: float) -> None:
    """Leviathan's predicted speedup at the measured alpha, the given c and the gamma used."""
    ours = report.get("specdec")
    if not ours:
        return
    gamma = ours["num_draft_tokens"]
    bound = expected_speedup(min(ours["alpha"], 0.999), gamma, cost_ratio)
    ours["cost_ratio_c"] = round(cost_ratio, 4)
    ours["leviathan_predicted_speedup"] = round(bound, 3)
    ours["fraction_of_leviathan_bound"] = round(ours["speedup_vs_target_only"] / bound, 3) if bound else 0.0


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("greedy", "temperature_1") if m in report]
    systems = ["target_only", "hf_assisted", "specdec"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.25
    for i, system in enumerate(systems):
        values = [report[m][system]["tokens_per_s"] for m in modes]
        axes[0].bar([x + i * width for x in range(len(modes))], values, width, label=system)
    axes[0].set_xticks([x + width for x in range(len(modes))], modes)
    axes[0].set_ylabel("tokens / s")
    axes[0].set_title("throughput, batch 1" + (" (pinned)" if report["protocol"]["pinned"] else " (unpinned)"))
    axes[0].legend()
    split = report.get("specdec", {}).get("round_split_ms_p50", {})
    parts = ["draft_critical_compute_ms", "verify_compute_ms", "network_ms", "orchestrator_ms"]
    bottom = 0.0
    for part in parts:
        value = split.get(part, 0.0)
        axes[1].bar(["specdec round (p50)"], [value], bottom=bottom, label=part.removesuffix("_ms"))
        bottom += value
    axes[1].set_ylabel("ms")
    axes[1].set_title("where a round's time goes")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
