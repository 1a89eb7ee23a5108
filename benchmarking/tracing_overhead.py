"""What tracing costs: tokens/s and CPU time per token of the same generations on stacks with tracing off,
on (spans to the local JSONL file from all three processes and the client, or with `--exporter otlp` over
OTLP/gRPC to a counting sink in a process of its own) and on with 10% of generations sampled, generations
taking turns between them; and the per-round cost of the tracing calls the orchestrator makes while
tracing is off.

    python -m benchmarking.tracing_overhead --target models/target --draft models/draft --repeats 3

Knows how to start a stack and time generations, not what the spans hold.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import grpc

from local_stack.processes import local_stack
from local_stack.paths import DEFAULT_DRAFT, DEFAULT_PROMPTS, DEFAULT_TARGET, load_prompts


# mode -> the share of generations traced (None: tracing off in every process).
MODES = {"off": None, "on": 1.0, "sampled": 0.1}  # sampled: on, 10% of generations traced


@contextmanager
def _client(target: str, draft: str, ratio: float | None, trace_dir: Path, otlp_endpoint: str | None = None):
    """A stack, a client to it and the stack's pids; traced: spans from all three processes and the client
    to JSONL files, or over OTLP/gRPC to `otlp_endpoint`, `ratio` of the generations sampled at the client
    (the services follow its decision)."""
    from specdec_client import Client
    from telemetry.client_spans import traced_channel

    env, provider = {}, None
    if ratio is not None:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        env = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": str(ratio)}
        if otlp_endpoint is None:
            from telemetry.span_file import JsonlSpanExporter

            env["SPECDEC_TRACE_FILE"] = str(trace_dir / "{service}-{pid}.jsonl")
            exporter = JsonlSpanExporter(trace_dir / "client.jsonl")
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            env.update(OTEL_EXPORTER_OTLP_ENDPOINT=otlp_endpoint, OTEL_EXPORTER_OTLP_PROTOCOL="grpc")
            exporter = OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)  # as the services
        provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
        provider.add_span_processor(BatchSpanProcessor(exporter))
    with local_stack(target, draft, env_extra=env) as stack:
        channel = grpc.insecure_channel(stack.orchestrator)
        if provider is not None:
            channel = traced_channel(channel, tracer_provider=provider)
        with Client(stack.orchestrator, timeout=600, channel=channel) as client:
            yield client, [process.pid for process in stack.processes]
    if provider is not None:
        provider.shutdown()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of the processes so far (Linux /proc)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def compare(target: str, draft: str, prompts: list[str], max_new_tokens: int, gamma: int, repeats: int,
            modes: list[str] = tuple(MODES), otlp_endpoint: str | None = None) -> dict:
    """All stacks up at once, each prompt generated on each in turn (the order rotating), so a background
    load that comes and goes weighs on every mode alike; each generation still runs alone.

    Besides tokens/s it counts the CPU time the stack's three processes and the client spend per token:
    on a shared machine wall time swings with other people's work, CPU time much less."""
    modes = ["off", *(m for m in modes if m != "off")]
    totals = {mode: {"tokens": 0, "wall_s": 0.0, "cpu_s": 0.0} for mode in modes}
    ratios: dict[str, list[float]] = {mode: [] for mode in modes if mode != "off"}
    cpu_ratios: dict[str, list[float]] = {mode: [] for mode in ratios}
    turns: list[dict] = []  # tokens/s of each generation, by mode, in the order run
    with tempfile.TemporaryDirectory() as trace_dir, contextlib.ExitStack() as stacks:
        clients = {mode: stacks.enter_context(_client(target, draft, MODES[mode], Path(trace_dir), otlp_endpoint))
                   for mode in modes}
        for client, _ in clients.values():
            client.generate(prompts[0], max_new_tokens, num_draft_tokens=gamma)  # warm-up
        order = list(modes)
        for turn, prompt in enumerate(prompts * repeats):
            rates, cpu = {}, {}
            for mode in order[turn % len(order):] + order[:turn % len(order)]:
                client, pids = clients[mode]
                cpu_before, client_before = cpu_seconds(pids), time.process_time()
                started = time.perf_counter()
                tokens = len(client.generate(prompt, max_new_tokens, num_draft_tokens=gamma).token_ids)
                elapsed = time.perf_counter() - started
                total = totals[mode]
                total["tokens"] += tokens
                total["wall_s"] += elapsed
                cpu[mode] = cpu_seconds(pids) - cpu_before + time.process_time() - client_before
                total["cpu_s"] += cpu[mode]
                rates[mode] = tokens / elapsed
            for mode in ratios:
                ratios[mode].append(rates[mode] / rates["off"])
                cpu_ratios[mode].append(cpu[mode] / cpu["off"])  # same prompt, same tokens
            turns.append({mode: round(rate, 2) for mode, rate in rates.items()})
    result = {"generations_per_mode": len(prompts) * repeats, "max_new_tokens": max_new_tokens, "modes": {},
              "turns": turns}
    off = totals["off"]
    for mode, total in totals.items():
        entry = {"tokens_per_s": total["tokens"] / total["wall_s"],
                 "cpu_ms_per_token": 1000 * total["cpu_s"] / total["tokens"]}
        if mode in ratios:
            q1, _, q3 = statistics.quantiles(ratios[mode], n=4)
            entry.update(overhead=1 - entry["tokens_per_s"] / (off["tokens"] / off["wall_s"]),
                         overhead_per_prompt_median=1 - statistics.median(ratios[mode]),
                         overhead_per_prompt_median_ci95=[1 - high for high in reversed(median_ci95(ratios[mode]))],
                         overhead_per_prompt_iqr=[1 - q3, 1 - q1],
                         cpu_overhead=entry["cpu_ms_per_token"] / (1000 * off["cpu_s"] / off["tokens"]) - 1,
                         cpu_overhead_per_prompt_median=statistics.median(cpu_ratios[mode]) - 1,
                         cpu_overhead_per_prompt_median_ci95=[r - 1 for r in median_ci95(cpu_ratios[mode])])
        result["modes"][mode] = entry
    return result


def median_ci95(values: list[float], resamples: int = 2000) -> list[float]:
    """A 95% bootstrap interval of the median (percentile method, fixed seed): how far the noise of this
    many generations leaves the per-prompt median uncertain."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return [medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]]


def off_cost_us_per_round(iterations: int = 20000) -> float:
    """The tracing and metrics calls one round makes, timed with nothing configured (this process)."""
    from telemetry.metrics import record_round
    from telemetry.tracing import get_tracer, tracing_enabled

    assert not tracing_enabled()
    tracer = get_tracer()
    started = time.perf_counter()
    for _ in range(iterations):
        with tracer.start_as_current_span("round") as span:
            record_round(4, 2, "recovered", 10.0, 3.0, 4.0, 2.0, 1.0)
            span.is_recording()
    return (time.perf_counter() - started) / iterations * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=str(DEFAULT_TARGET))
    parser.add_argument("--draft", default=str(DEFAULT_DRAFT))
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    parser.add_argument("--count", type=int, default=8, help="generations per stack")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--num-draft-tokens", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="passes over the prompts")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--exporter", choices=("jsonl", "otlp"), default="jsonl",
                        help="jsonl: the local span files; otlp: OTLP/gRPC to a counting sink in its own process")
    args = parser.parse_args(argv)
    for name in [k for k in os.environ if k.startswith("OTEL_") or k == "SPECDEC_TRACE_FILE"]:
        del os.environ[name]  # "off" must mean off in every child process
    prompts = load_prompts(args.prompts, args.count)
    with contextlib.ExitStack() as sink:
        endpoint = None
        if args.exporter == "otlp":
            from benchmarking.otlp_sink import otlp_sink_process

            endpoint = sink.enter_context(otlp_sink_process())
        result = compare(args.target, args.draft, prompts, args.max_new_tokens, args.num_draft_tokens, args.repeats,
                         args.modes.split(","), endpoint)
    result["exporter"] = args.exporter
    result["off_cost_us_per_round"] = off_cost_us_per_round()
    print(json.dumps(result))

if __name__ == "__main__":
    main()
