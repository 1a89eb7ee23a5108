"""What the OpenAI-compatible HTTP front costs: the reference pair as local processes (pinned as `specdec
bench` pins: draft and orchestrator on core 0, verify on core 1) and `specdec serve openai` as a process
(unpinned, like the benchmark's own clients; --front-cpu pins it), the same greedy streamed generations through the gRPC SDK (AsyncClient)
and through the official openai client (AsyncOpenAI, stream=True), taking turns batch by batch in
alternating order, so that the machine's drift weighs on both alike. At each concurrency level a batch is
`streams` generations at once (one prompt each, cycling through the held-out prompts).

Prints one JSON object: per level the pooled tokens/s of each path, the HTTP path's cost in % (pooled,
and the median of the per-batch ratios with a 95 % bootstrap interval), whether the two paths gave the
same text for every generation, and CPU per 1000 tokens of the front and of the benchmark's client on each
path; the 1-minute load average before and after (the host's other work moves tokens/s by more than the
5 % this measures: read the interval, and rerun on a quiet machine).

    python -m benchmarking.openai_overhead [--streams 1,16] [--passes 4] [--max-new-tokens 128] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from pathlib import Path

import httpx
from openai import AsyncOpenAI

from benchmarking.tls_overhead import bootstrap_median
from local_stack.paths import DEFAULT_DRAFT, DEFAULT_PROMPTS, DEFAULT_TARGET, load_prompts
from local_stack.processes import local_stack, spawn, stop_processes
from specdec_client import AsyncClient
from transport import free_port

PINNING = dict(draft_cpu=0, verify_cpu=1, orchestrator_cpu=0, threads=1)


def wait_http(url: str, process, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"`specdec serve openai` exited with code {process.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not up after {timeout_s:.0f}s")


async def through_grpc(client: AsyncClient, prompt: str, max_new_tokens: int) -> tuple[int, str]:
    parts, tokens = [], 0
    async for chunk in client.stream(prompt, max_new_tokens, temperature=0):
        parts.append(chunk.text)
        if chunk.stats is not None:
            tokens = int(chunk.stats["new_tokens"])
    return tokens, "".join(parts)


async def through_http(client: AsyncOpenAI, model: str, prompt: str, max_new_tokens: int) -> tuple[int, str]:
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_new_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    parts, tokens = [], 0
    async for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].text)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens, "".join(parts)


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of this process (pid None) or of another one (from /proc)."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(orchestrator: str, base_url: str, prompts: list[str], levels: list[int], passes: int,
                  max_new_tokens: int, front_pid: int) -> dict:
    grpc_client = AsyncClient(orchestrator, timeout=600)
    http_client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    model = (await http_client.models.list()).data[0].id
    paths = {"grpc": lambda p: through_grpc(grpc_client, p, max_new_tokens),
             "http": lambda p: through_http(http_client, model, p, max_new_tokens)}

    cpu = {"client": {"grpc": 0.0, "http": 0.0}, "front": 0.0}

    async def batch(path: str, batch_prompts: list[str]) -> tuple[int, float, list[str]]:
        client_cpu, front_cpu, started = cpu_seconds(), cpu_seconds(front_pid), time.perf_counter()
        results = await asyncio.gather(*(paths[path](p) for p in batch_prompts))
        wall = time.perf_counter() - started
        cpu["client"][path] += cpu_seconds() - client_cpu
        if path == "http":
            cpu["front"] += cpu_seconds(front_pid) - front_cpu
        return sum(n for n, _ in results), wall, [t for _, t in results]

    for path in paths:  # warm both paths (connections, the front's first request)
        await batch(path, prompts[:2])
    report = {}
    for streams in levels:
        cpu["client"], cpu["front"] = {"grpc": 0.0, "http": 0.0}, 0.0
        rows: dict[str, list[tuple[int, float, list[str]]]] = {"grpc": [], "http": []}
        batches = max(10, passes * len(prompts) // streams)  # about as many tokens per level, 10 pairs at least
        for b in range(batches):
            batch_prompts = [prompts[(b * streams + i) % len(prompts)] for i in range(streams)]
            for path in (("grpc", "http") if b % 2 == 0 else ("http", "grpc")):
                rows[path].append(await batch(path, batch_prompts))
        tokens = sum(n for n, _, _ in rows["grpc"])
        speed = {path: sum(n for n, _, _ in r) / sum(w for _, w, _ in r) for path, r in rows.items()}
        ratios = [(h[0] / h[1]) / (g[0] / g[1]) for g, h in zip(rows["grpc"], rows["http"])]
        low, high = bootstrap_median(ratios, random.Random(0))
        report[f"streams_{streams}"] = {
            "grpc_tokens_per_s": round(speed["grpc"], 2), "http_tokens_per_s": round(speed["http"], 2),
            "http_cost_pct_pooled": round(100 * (1 - speed["http"] / speed["grpc"]), 2),
            "http_cost_pct_median_batch": round(100 * (1 - statistics.median(ratios)), 2),
            "http_cost_pct_95ci": [round(100 * (1 - high), 2), round(100 * (1 - low), 2)],
            "batches": len(ratios), "tokens_per_path": tokens,
            "same_text": all(g[2] == h[2] for g, h in zip(rows["grpc"], rows["http"])),
            # CPU per 1000 tokens, which the machine's load moves less than tokens/s: the front's, and the
            # benchmark's own client process on each path (the openai client parses JSON, the SDK protobuf).
            "front_cpu_ms_per_1k_tokens": round(1e6 * cpu["front"] / tokens, 1),
            "client_cpu_ms_per_1k_tokens": {path: round(1e6 * c / tokens, 1) for path, c in cpu["client"].items()},
        }
    await grpc_client.close()
    await http_client.close()
    return report


def run(levels: list[int], passes: int, prompts: int, max_new_tokens: int, front_cpu: int | None = None) -> dict:
    texts = load_prompts(DEFAULT_PROMPTS, prompts)
    load_before = os.getloadavg()[0]
    with local_stack(str(DEFAULT_TARGET), str(DEFAULT_DRAFT), **PINNING) as stack:
        port = free_port()
        front = spawn(["serve", "openai", "--orchestrator", stack.orchestrator, "--host", "127.0.0.1", "--port",
                       str(port), "--log-level", "WARNING"], front_cpu)
        try:
            wait_http(f"http://127.0.0.1:{port}/health", front)
            report = asyncio.run(measure(stack.orchestrator, f"http://127.0.0.1:{port}/v1", texts, levels, passes,
                                         max_new_tokens, front.pid))
        finally:
            stop_processes([front])
    return {**report, "max_new_tokens": max_new_tokens, "prompts": len(texts), "passes": passes,
            "pinning": {**PINNING, "openai_front_cpu": front_cpu}, "cpus": os.cpu_count(),
            "load_1min_before": round(load_before, 2), "load_1min_after": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="1,16", help="concurrency levels, comma-separated")
    parser.add_argument("--passes", type=int, default=4, help="passes over the prompts at 1 stream; higher levels "
                                                              "run about as many tokens")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--front-cpu", type=int, help="pin `serve openai` to this core (default: unpinned, like the "
                                                        "benchmark's clients)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = run([int(s) for s in args.streams.split(",")], args.passes, args.prompts, args.max_new_tokens,
                 args.front_cpu)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
