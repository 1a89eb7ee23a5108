"""`specdec study --delay-ms D`: a latency study. Draft and verify run in network namespaces of their own
(netlab.delay_path; loopback when namespaces cannot be made, and the output says so), the orchestrator in the
root namespace reaches them through a one-way delay of D ms on each link (netem, else the delay relay), and a
traced client drives a few generations per delay level. From the spans it reports, per level, the round
breakdown and the one-way network time measured as (client-observed - server-reported) / 2.

Every run starts with a 0 ms calibration level on the same path: its one-way time is what the gRPC stack and
the relay cost by themselves, so `recovered_one_way_ms` (measured minus calibration) is the delay the
traces recover, comparable with `injected_one_way_ms`.

The calibration cannot take out what the delay itself causes: while a call waits out D ms, the cores
go idle, and waking an idle core (on a VM, the host rescheduling a halted vCPU) adds its latency to
every leg. On this project's 2-vCPU VM that read 2.64-2.81 ms recovered at 2 ms injected and
10.7-11.4 at 10, and 2.10 / 10.15 with the cores kept busy. So by default (`hold_cores_awake`) a
spinner per core at the idle scheduling class (SCHED_IDLE: it runs only when nothing else wants the
core) keeps the cores from idling for the run, as latency benchmarks disable deep idle states; the
output says so (`cores_held_awake`). It costs the machine's idle time, nothing the services wanted.

Knows processes, levels and span files; the arithmetic is trace_analysis.breakdown's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from netlab.delay_path import DelayPath, delay_path
from local_stack.processes import stop_processes, wait_healthy
from transport import free_port
from local_stack.paths import REPO_ROOT
from trace_analysis.breakdown import PARTS, Round, rounds_from_spans, summarize
from trace_analysis.span_reader import read_spans

SERVICES = ["draft", "verify"]
CALIBRATION = "calibration"


@dataclass
class StudyPlan:
    target: str
    draft: str
    prompts: list[str]
    delays_ms: list[float]
    out_dir: Path
    max_new_tokens: int = 16
    gamma: int = 4
    warmup: int = 1  # generations per level not counted: the first calls of the stack
    threads: int = 1
    isolation: str = "auto"  # auto | netns | loopback
    timeout_s: float = 180.0
    hold_cores_awake: bool = True  # see the module docstring


@dataclass
class Level:
    name: str
    delay_ms: float
    traces: set[str] = field(default_factory=set)
    new_tokens: int = 0
    wall_s: float = 0.0


def _spawn(args: list[str], prefix: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    environment = {**os.environ, **env,
                   "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log_path, "w") as log:
        return subprocess.Popen([*prefix, sys.executable, "-m", "specdec_cli", *args], cwd=REPO_ROOT,
                                env=environment, stdout=log, stderr=subprocess.STDOUT)


def _client_tracing(path: Path):
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from telemetry.span_file import JsonlSpanExporter
    from telemetry.tracing import span_processors_from_env

    # A provider of the study's own (tracing stays off process-wide): the client's spans go to the run's
    # file, and to a collector too when OTEL_* asks for one, like the services' spans.
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: "specdec-study-client"}))
    for processor in [*span_processors_from_env("specdec-study-client"), BatchSpanProcessor(JsonlSpanExporter(path))]:
        provider.add_span_processor(processor)
    return provider


def _drive(plan: StudyPlan, orchestrator: str, path: DelayPath, levels: list[Level], provider) -> None:
    """Generations take turns between the levels (the order rotating), so a background load that comes and
    goes weighs on every level alike; the delay changes between generations, with nothing in flight."""
    from specdec_client import Client
    from telemetry.client_spans import traced_channel

    tracer = provider.get_tracer("specdec.study")
    channel = traced_channel(grpc.insecure_channel(orchestrator), tracer_provider=provider)

    def generate(client, level: Level, prompt: str, warmup: bool) -> None:
        path.set_delay(level.delay_ms)
        with tracer.start_as_current_span("study.generation", attributes={
                "specdec.study.level": level.name, "specdec.study.delay_ms": level.delay_ms,
                "specdec.study.warmup": warmup}) as span:
            started = time.perf_counter()
            result = client.generate(prompt, plan.max_new_tokens, num_draft_tokens=plan.gamma)
            elapsed = time.perf_counter() - started
        if not warmup:
            level.traces.add(f"{span.get_span_context().trace_id:032x}")
            level.new_tokens += len(result.token_ids)
            level.wall_s += elapsed

    with Client(orchestrator, timeout=plan.timeout_s, channel=channel) as client:
        for _ in range(plan.warmup):
            for level in levels:
                generate(client, level, plan.prompts[0], warmup=True)
        for turn, prompt in enumerate(plan.prompts):
            shift = turn % len(levels)
            for level in levels[shift:] + levels[:shift]:
                generate(client, level, prompt, warmup=False)


_SPIN_AT_IDLE_PRIORITY = ("import os\nos.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))\n"
                          "while True:\n    pass\n")


def _hold_cores_awake() -> list[subprocess.Popen]:
    """One spinner per core at SCHED_IDLE (Linux); none where that class is not offered."""
    if not hasattr(os, "SCHED_IDLE"):
        return []
    return [subprocess.Popen([sys.executable, "-c", _SPIN_AT_IDLE_PRIORITY], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for _ in range(os.cpu_count() or 1)]


def _level_result(level: Level, rounds: list[Round], calibration: dict, path: DelayPath,
                  cores_held_awake: bool) -> dict:
    summary = summarize(rounds)
    measured = summary["one_way_ms_p50"]
    return {
        "level": level.name,
        "injected_one_way_ms": level.delay_ms,
        "delay_method": path.method,
        "isolation": path.isolation,
        "isolation_note": path.note,
        "cores_held_awake": cores_held_awake,
        "generations": summary["traces"],
        "rounds": summary["rounds"],
        "new_tokens": level.new_tokens,
        "tokens_per_s": level.new_tokens / level.wall_s if level.wall_s else 0.0,
        "measured_one_way_ms_p50": measured,
        "stack_one_way_ms_p50": calibration["one_way_ms_p50"],
        "recovered_one_way_ms": measured - calibration["one_way_ms_p50"],
        "draft_compute_ms_p50": summary["compute_ms_p50"]["draft"],
        "verify_compute_ms_p50": summary["compute_ms_p50"]["verify"],
        "round_ms_p50": summary["round_ms"]["median_ms"],
        "round_ms_p90": summary["round_ms"]["p90_ms"],
        "breakdown": {name: {k: summary["parts"][name][k] for k in ("median_ms", "p90_ms", "share")}
                      for name in PARTS},
        "breakdown_covers_wall_fraction": summary["covers_wall_fraction"],
    }


def run_study(plan: StudyPlan) -> list[dict]:
    """One result per requested delay level (the calibration level is in each as stack_one_way_ms_p50)."""
    from trace_analysis.chart import groups_chart
    from trace_analysis.perfetto import write_trace_events

    out = plan.out_dir
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.jsonl"):
        old.unlink()  # span files append: a rerun into the same directory must not mix runs
    levels = [Level(CALIBRATION, 0.0)] + [Level(f"{d:g} ms", d) for d in plan.delays_ms]
    env = {"SPECDEC_TRACE_FILE": str(out / "{service}.jsonl")}
    provider = _client_tracing(out / "client.jsonl")
    with delay_path(SERVICES, plan.isolation) as path:
        processes: list[subprocess.Popen] = []
        spinners: list[subprocess.Popen] = []
        try:
            for service, model in zip(SERVICES, (plan.draft, plan.target)):
                host, port = path.bind[service]
                processes.append(_spawn(["serve", service, "--model", model, "--host", host, "--port", str(port),
                                         "--threads", str(plan.threads)], path.prefix[service], env,
                                        out / f"{service}.log"))
            for service, process in zip(SERVICES, processes):
                wait_healthy(path.reach[service], plan.timeout_s, process)
            port = free_port()
            processes.insert(0, _spawn(["serve", "orchestrator", "--host", "127.0.0.1", "--port", str(port),
                                        "--draft", path.reach["draft"], "--verify", path.reach["verify"],
                                        "--num-draft-tokens", str(plan.gamma)], [], env, out / "orchestrator.log"))
            wait_healthy(f"127.0.0.1:{port}", plan.timeout_s, processes[0])
            spinners = _hold_cores_awake() if plan.hold_cores_awake else []
            try:
                _drive(plan, f"127.0.0.1:{port}", path, levels, provider)
            finally:
                for spinner in spinners:
                    spinner.kill()
                    spinner.wait()
        finally:
            provider.shutdown()
            stop_processes(processes)
        rounds = rounds_from_spans(read_spans(sorted(out.glob("*.jsonl"))))
        by_level = {level.name: [r for r in rounds if r.trace_id in level.traces] for level in levels}
        if not any(by_level.values()):
            raise RuntimeError(f"no `round` spans from the orchestrator in {out}: is tracing wired into "
                               "`specdec serve` (SPECDEC_TRACE_FILE)? See orchestrator.log")
        calibration = summarize(by_level[CALIBRATION])
        results = [_level_result(level, by_level[level.name], calibration, path, bool(spinners))
                   for level in levels[1:]]
    groups_chart(by_level, out / "breakdown.png", "mean round breakdown by injected one-way delay")
    write_trace_events([r for rs in by_level.values() for r in rs], out / "rounds.perfetto.json")
    for result in results:
        result.update(run_dir=str(out), chart=str(out / "breakdown.png"),
                      perfetto=str(out / "rounds.perfetto.json"))
    (out / "study.json").write_text(json.dumps(results, indent=1))
    return results


def format_level(result: dict) -> str:
    lines = [f"== injected {result['injected_one_way_ms']:g} ms one way ({result['delay_method']}, "
             f"{result['isolation']}{', cores held awake' if result['cores_held_awake'] else ''}) ==",
             f"one-way network p50: measured {result['measured_one_way_ms_p50']:.3f} ms, stack alone "
             f"{result['stack_one_way_ms_p50']:.3f} ms, recovered delay {result['recovered_one_way_ms']:.3f} ms",
             f"compute p50: draft {result['draft_compute_ms_p50']:.3f} ms, verify {result['verify_compute_ms_p50']:.3f} ms;"
             f" round p50 {result['round_ms_p50']:.3f} ms, p90 {result['round_ms_p90']:.3f} ms; "
             f"{result['tokens_per_s']:.1f} tokens/s over {result['generations']} generations, {result['rounds']} rounds",
             f"{'part':<22}{'median ms':>10}{'p90 ms':>10}{'share':>9}"]
    for name, part in result["breakdown"].items():
        lines.append(f"{name:<22}{part['median_ms']:>10.3f}{part['p90_ms']:>10.3f}{part['share']:>9.1%}")
    lines.append(f"{'sum of parts / round wall':<42}{result['breakdown_covers_wall_fraction']:>9.1%}")
    return "\n".join(lines)


def print_study(results: list[dict], as_json: bool) -> None:
    if as_json:
        for result in results:  # one JSON object per delay level, one per line
            print(json.dumps(result))
        return
    print(f"network: {results[0]['isolation_note']}")
    for result in results:
        print(format_level(result))
    print(f"spans, logs, chart and Perfetto timeline in {results[0]['run_dir']}")
