"""Routing over replicas (issue 19): how sessions spread over the replicas of a role and how many move when one
joins or leaves, first in a pure simulation of the routing choice, then on a live local deployment.

    python -m benchmarking.routing simulate [--replicas 100] [--sessions 10000] [--seed 0]
    python -m benchmarking.routing live [--verify-replicas 1 2] [--streams 8 32] [--max-new-tokens 32]

simulate (no servers, a few seconds) calls orchestrator/replica_routing.py's choose_replica itself:
  (a) the choice alone at equal loads: the fraction of sessions whose replica changes when one replica joins
      or leaves N (ideal 1/(N+1) and 1/N), against `hash(session) % N`, which moves ~N/(N+1) of them;
  (b) the system with session affinity: sessions arrive one by one and are bound by the load-aware choice
      (each replica's load is the count of sessions bound to it; in the simulation sessions never end), then
      a replica joins or leaves. Bound sessions move only when their replica left; the newcomer takes the
      next arrivals until it has caught up;
  (c) how evenly sessions spread: pure hash at equal loads against load-aware binding;
  (d) replicas of unequal speed: 4 draft replicas, one 3x slower (service_ms), each one's share.

live starts K verify replicas, D draft replicas (2 by default, for every K) and one orchestrator given them
all (`--verify a,b --draft c,d`) as processes on free loopback ports, pinned as `specdec bench` pins (every
verify replica on core 1, the rest on core 0), runs S concurrent greedy streams (a closed loop) over the
prompt set with the SDK, and prints per configuration: tokens/s, p50/p99 generation latency, re-prefills
and rebinds per generation (GenerationStats), and how the sessions spread over the verify replicas: each
replica's live_sessions (the ReplicaLoad its GetModelInfo reports) sampled every 50 ms during the level,
as a time-averaged share, with each replica's CPU seconds beside it. It checks that the greedy outputs are
the same in every configuration. On 2 cores K verify replicas share one core: tokens/s is not expected to
grow with K.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence

import grpc

from benchmarking.tracing_overhead import cpu_seconds
from local_stack.paths import DEFAULT_DRAFT, DEFAULT_PROMPTS, DEFAULT_TARGET, load_prompts
from local_stack.processes import spawn, stop_processes, wait_healthy
from orchestrator.replica_routing import DEFAULT_TOLERANCE, ReplicaView, choose_replica
from specdec_api import common_pb2, verify_pb2_grpc
from specdec_client import Client
from trace_analysis.breakdown import percentile
from transport import free_port

Choose = Callable[[str, Sequence[str]], str]


# -- the simulation: pure, no servers ------------------------------------------------------------------------
def session_keys(count: int, seed: int = 0) -> list[str]:
    """Session ids as the orchestrator makes them: random and unrelated to the replicas."""
    rng = random.Random(seed)
    return [f"{rng.getrandbits(64):016x}" for _ in range(count)]


def replica_addresses(count: int, first: int = 0) -> list[str]:
    return [f"10.0.{i // 250}.{i % 250 + 1}:50052" for i in range(first, first + count)]


def rendezvous_choice(key: str, addresses: Sequence[str]) -> str:
    """The routing function alone: choose_replica with every replica equally loaded (so only the hash decides)."""
    return choose_replica(key, [ReplicaView(address) for address in addresses])


def modulo_choice(key: str, addresses: Sequence[str]) -> str:
    """The naive baseline: a stable hash of the session modulo the number of replicas."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return addresses[int.from_bytes(digest, "big") % len(addresses)]


def _route_all(keys: Sequence[str], addresses: Sequence[str], choose: Choose) -> dict[str, str]:
    if choose is rendezvous_choice:  # the same choice, with the views built once rather than per session
        views = [ReplicaView(address) for address in addresses]
        return {key: choose_replica(key, views) for key in keys}
    return {key: choose(key, addresses) for key in keys}


def moved_on_churn(keys: Sequence[str], addresses: Sequence[str], choose: Choose) -> dict:
    """The fraction of sessions whose choice changes when one replica joins the set, and when one (the last)
    leaves it, the choice re-made from scratch for every session (no affinity)."""
    newcomer = replica_addresses(1, first=len(addresses) + 1000)[0]
    before = _route_all(keys, addresses, choose)
    joined = _route_all(keys, [*addresses, newcomer], choose)
    left = _route_all(keys, addresses[:-1], choose)
    n = len(addresses)
    return {"replicas": n, "sessions": len(keys),
            "join_moved": sum(joined[k] != before[k] for k in keys) / len(keys), "join_ideal": 1 / (n + 1),
            "leave_moved": sum(left[k] != before[k] for k in keys) / len(keys), "leave_ideal": 1 / n,
            "spread": spread(Counter(before.values()), addresses)}


def bind_arrivals(keys: Sequence[str], addresses: Sequence[str], bindings: dict[str, str] | None = None,
                  service_ms: dict[str, float] | None = None, tolerance: float = DEFAULT_TOLERANCE) -> dict[str, str]:
    """Sessions arriving one by one, each bound by the load-aware choice; the loads are the sessions bound so
    far (`bound`), as one orchestrator counts them before any replica reports. Adds to `bindings` (those
    already bound, whose replicas count them) and returns it."""
    bindings = {} if bindings is None else bindings
    counts = Counter(address for address in bindings.values())
    speeds = service_ms or {}
    for key in keys:
        views = [ReplicaView(a, bound=counts[a], service_ms=speeds.get(a)) for a in addresses]
        chosen = choose_replica(key, views, tolerance)
        bindings[key] = chosen
        counts[chosen] += 1
    return bindings


def spread(counts: Counter, addresses: Sequence[str]) -> dict:
    """Sessions per replica: max, min, mean and coefficient of variation (population sd / mean)."""
    values = [counts.get(a, 0) for a in addresses]
    mean = statistics.fmean(values)
    return {"max": max(values), "min": min(values), "mean": round(mean, 2),
            "cv": round(statistics.pstdev(values) / mean, 4) if mean else 0.0}


def affinity_churn(keys: Sequence[str], addresses: Sequence[str], next_arrivals: int, seed: int = 0) -> dict:
    """Sessions bound at arrival (load-aware), then one replica joins or the last leaves.

    Join: no bound session moves (they keep their replica); the next `next_arrivals` sessions are bound
    with the newcomer at 0 sessions: how many it takes, and how long it takes them all in a row.
    Leave: the sessions bound to the leaver (and only those) are re-bound, arriving one by one again."""
    bound = bind_arrivals(keys, addresses)
    newcomer = replica_addresses(1, first=len(addresses) + 1000)[0]
    arrivals = session_keys(next_arrivals, seed=seed + 1)
    joined = bind_arrivals(arrivals, [*addresses, newcomer], bindings=dict(bound))
    moved_on_join = sum(joined[k] != bound[k] for k in keys)
    to_newcomer = [joined[k] == newcomer for k in arrivals]
    in_a_row = next((i for i, went in enumerate(to_newcomer) if not went), len(to_newcomer))
    counts_after_join = Counter(joined.values())
    leaver = addresses[-1]
    stranded = [k for k in keys if bound[k] == leaver]
    kept = {k: a for k, a in bound.items() if a != leaver}
    left = bind_arrivals(stranded, addresses[:-1], bindings=kept)
    return {"replicas": len(addresses), "sessions": len(keys), "spread": spread(Counter(bound.values()), addresses),
            "join_moved": moved_on_join, "next_arrivals": next_arrivals, "newcomer_took": sum(to_newcomer),
            "newcomer_first_in_a_row": in_a_row, "newcomer_after": counts_after_join[newcomer],
            "others_mean_after": round(statistics.fmean(counts_after_join[a] for a in addresses), 2),
            "leave_moved": len(stranded), "leave_moved_fraction": len(stranded) / len(keys),
            "spread_after_leave": spread(Counter(left.values()), addresses[:-1])}


def heterogeneous(sessions: Sequence[int] = (32, 1000), replicas: int = 4, slow_factor: float = 3.0,
                  fast_ms: float = 10.0, seed: int = 0) -> dict:
    """Replicas of one role with one `slow_factor` times slower (its measured time per call): each one's share
    of `n` sessions bound one by one, for each n in `sessions`."""
    addresses = [f"draft-{i}:50053" for i in range(replicas)]
    speeds = dict.fromkeys(addresses, fast_ms)
    speeds[addresses[-1]] = fast_ms * slow_factor
    report = {"service_ms": speeds, "shares": {}}
    for n in sessions:
        counts = Counter(bind_arrivals(session_keys(n, seed + n), addresses, service_ms=speeds).values())
        report["shares"][n] = {a: counts[a] for a in addresses}
    return report


def simulate(replicas: int = 100, sessions: int = 10_000, seed: int = 0, next_arrivals: int = 1000) -> dict:
    keys = session_keys(sessions, seed)
    addresses = replica_addresses(replicas)
    return {"rendezvous": moved_on_churn(keys, addresses, rendezvous_choice),
            "modulo": moved_on_churn(keys, addresses, modulo_choice),
            "affinity": affinity_churn(keys, addresses, next_arrivals, seed),
            "heterogeneous": heterogeneous(seed=seed)}


def format_simulation(report: dict) -> str:
    r, m, a, h = report["rendezvous"], report["modulo"], report["affinity"], report["heterogeneous"]
    n, s = r["replicas"], r["sessions"]

    def pct(x: float) -> str:
        return f"{100 * x:.2f} %"

    def line(d: dict) -> str:
        return f"max {d['max']}, min {d['min']}, mean {d['mean']}, cv {d['cv']:.3f}"

    out = [f"(a) the routing function alone, equal loads, {s} sessions over {n} replicas (choice re-made for all)",
           f"    rendezvous (choose_replica): one joins: {pct(r['join_moved'])} moved (ideal {pct(r['join_ideal'])});"
           f" one leaves: {pct(r['leave_moved'])} moved (ideal {pct(r['leave_ideal'])})",
           f"    hash % N baseline:           one joins: {pct(m['join_moved'])} moved;"
           f" one leaves: {pct(m['leave_moved'])} moved",
           f"(b) session affinity: {s} sessions bound one by one, load-aware (loads = sessions bound), never ending",
           f"    one joins: {a['join_moved']} bound sessions moved; of the next {a['next_arrivals']} arrivals the "
           f"newcomer took {a['newcomer_took']} (the first {a['newcomer_first_in_a_row']} in a row), ending at "
           f"{a['newcomer_after']} sessions against {a['others_mean_after']} on the others on average",
           f"    one leaves: {a['leave_moved']} sessions moved ({pct(a['leave_moved_fraction'])}: exactly its own),"
           f" re-bound load-aware; after: {line(a['spread_after_leave'])}",
           f"(c) sessions per replica, {s} over {n}:",
           f"    pure hash, equal loads: {line(r['spread'])}",
           f"    load-aware binding:     {line(a['spread'])}",
           f"(d) {len(h['service_ms'])} draft replicas, service_ms {list(h['service_ms'].values())}: sessions each"]
    for count, shares in h["shares"].items():
        out.append(f"    {count} sessions: " + ", ".join(
            f"{addr.split(':')[0]} {c} ({100 * c / count:.0f} %)" for addr, c in shares.items()))
    return "\n".join(out)


# -- the live benchmark: replica processes on this machine ---------------------------------------------------
# As `specdec bench` pins them: every verify replica on core 1 (one torch thread each), the draft replicas, the
# orchestrator and this client on core 0. K verify replicas share core 1, so tokens/s is not expected to grow
# with K here; what this shows is that every replica serves and that no session is re-prefilled.
VERIFY_CPU, OTHERS_CPU = 1, 0
SAMPLE_EVERY_S = 0.05


class LoadSampler:
    """Asks each verify replica for its load (GetModelInfo's ReplicaLoad) every SAMPLE_EVERY_S on a thread
    and sums the live sessions it reports: how the held sessions spread over the replicas, time-averaged.
    GetModelInfo is answered on the replica's gRPC threads, never queued behind the model."""

    def __init__(self, addresses: Sequence[str]):
        self._request = common_pb2.GetModelInfoRequest()
        self._channels = {a: grpc.insecure_channel(a) for a in addresses}
        self._stubs = {a: verify_pb2_grpc.VerifyServiceStub(c) for a, c in self._channels.items()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.live = Counter()  # address -> sum of live_sessions over samples
        self.peak = Counter()
        self.samples = 0

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            for address, stub in self._stubs.items():
                live = stub.GetModelInfo(self._request, timeout=5).load.live_sessions
                self.live[address] += live
                self.peak[address] = max(self.peak[address], live)
            self.samples += 1

    def __enter__(self) -> LoadSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for channel in self._channels.values():
            channel.close()

    def means(self) -> dict[str, float]:
        return {a: round(self.live[a] / self.samples, 2) if self.samples else 0.0 for a in self._stubs}

    def shares(self) -> dict[str, float]:
        total = sum(self.live.values())
        return {a: round(self.live[a] / total, 3) if total else 0.0 for a in self._stubs}


def start_replicas(target: str, draft: str, verify_replicas: int, draft_replicas: int, pinned: bool,
                   log_dir=None, timeout_s: float = 180.0) -> tuple[str, list[str], list[str], dict]:
    """Verify and draft replica processes and one orchestrator given them all; (orchestrator, verify
    addresses, draft addresses, {role name: process}). The caller stops the processes."""
    cpu = (lambda c: c) if pinned else (lambda c: None)
    processes: dict = {}

    def start(name: str, args: list[str], on: int) -> str:
        port = free_port()
        log = (log_dir / f"{name}.log") if log_dir else None
        processes[name] = spawn([*args, "--port", str(port)], cpu(on), log_path=log)
        return f"127.0.0.1:{port}"

    verify = [start(f"verify-{i}", ["serve", "verify", "--model", target, "--threads", "1"], VERIFY_CPU)
              for i in range(verify_replicas)]
    drafts = [start(f"draft-{i}", ["serve", "draft", "--model", draft, "--threads", "1"], OTHERS_CPU)
              for i in range(draft_replicas)]
    try:
        for name, address in zip([f"verify-{i}" for i in range(len(verify))] + [f"draft-{i}" for i in range(len(drafts))],
                                 verify + drafts):
            wait_healthy(address, timeout_s, processes[name])
        orchestrator = start("orchestrator", ["serve", "orchestrator", "--verify", ",".join(verify),
                                              "--draft", ",".join(drafts)], OTHERS_CPU)
        wait_healthy(orchestrator, timeout_s, processes["orchestrator"])
    except BaseException:
        stop_processes(list(processes.values()))
        raise
    return orchestrator, verify, drafts, processes


def run_streams(client, work: Sequence[str], streams: int, max_new_tokens: int) -> list[dict]:
    """Every prompt of `work` generated (greedy) as a closed loop of `streams` generations in flight; one row
    per generation, in `work`'s order: its tokens, its wall time and its stats."""
    rows: list[dict | None] = [None] * len(work)
    pending = list(range(len(work)))[::-1]
    lock = threading.Lock()

    def stream() -> None:
        while True:
            with lock:
                if not pending:
                    return
                i = pending.pop()
            started = time.perf_counter()
            result = client.generate(work[i], max_new_tokens=max_new_tokens)
            rows[i] = {"token_ids": result.token_ids, "wall_s": time.perf_counter() - started, "stats": result.stats}

    threads = [threading.Thread(target=stream) for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return rows  # type: ignore[return-value]


def measure_level(client, work: Sequence[str], streams: int, max_new_tokens: int, verify: Sequence[str],
                  verify_pids: dict[str, int]) -> tuple[dict, list[list[int]]]:
    cpu_before = {a: cpu_seconds([pid]) for a, pid in verify_pids.items()}
    with LoadSampler(verify) as sampler:
        started = time.perf_counter()
        rows = run_streams(client, work, streams, max_new_tokens)
        wall = time.perf_counter() - started
    tokens = sum(len(r["token_ids"]) for r in rows)
    latency_ms = [1000 * r["wall_s"] for r in rows]
    stats = [r["stats"] for r in rows]
    entry = {"streams": streams, "generations": len(rows), "tokens": tokens, "wall_s": round(wall, 2),
             "tokens_per_s": round(tokens / wall, 1),
             "p50_latency_ms": round(percentile(latency_ms, 50), 1),
             "p99_latency_ms": round(percentile(latency_ms, 99), 1),
             "reprefills_per_generation": round(sum(int(s.get("reprefills", 0)) for s in stats) / len(rows), 3),
             "verify_session_share": sampler.shares(),
             "verify_mean_live_sessions": sampler.means(),
             "verify_peak_live_sessions": {a: sampler.peak[a] for a in verify}, "load_samples": sampler.samples,
             "verify_cpu_s": {a: round(cpu_seconds([pid]) - cpu_before[a], 2) for a, pid in verify_pids.items()}}
    if any("rebinds" in s for s in stats):
        entry["rebinds_per_generation"] = round(sum(int(s.get("rebinds", 0)) for s in stats) / len(rows), 3)
    return entry, [r["token_ids"] for r in rows]


def live(verify_replicas: Sequence[int] = (1, 2), streams: Sequence[int] = (8, 32), draft_replicas: int = 2,
         max_new_tokens: int = 32, generations: int = 96, pinned: bool = True, log_dir=None) -> dict:
    prompts = load_prompts(DEFAULT_PROMPTS)
    work = [prompts[i % len(prompts)] for i in range(generations)]
    pinned = pinned and sys.platform.startswith("linux") and (os.cpu_count() or 1) > VERIFY_CPU
    report: dict = {"configurations": [], "max_new_tokens": max_new_tokens, "generations_per_level": generations,
                    "draft_replicas": draft_replicas, "pinned": pinned, "cpus": os.cpu_count(),
                    "load_1min_before": round(os.getloadavg()[0], 2)}
    outputs: dict[str, list[list[int]]] = {}
    before = os.sched_getaffinity(0) if pinned else None
    if pinned:
        os.sched_setaffinity(0, {OTHERS_CPU})  # the client with the drafts and the orchestrator
    try:
        for k in verify_replicas:
            orchestrator, verify, drafts, processes = start_replicas(
                str(DEFAULT_TARGET), str(DEFAULT_DRAFT), k, draft_replicas, pinned, log_dir)
            try:
                pids = {a: processes[f"verify-{i}"].pid for i, a in enumerate(verify)}
                with Client(orchestrator, timeout=600) as client:
                    run_streams(client, work[:max(streams)], max(streams), 8)  # warm-up: every replica, every path
                    for s in streams:
                        entry, tokens = measure_level(client, work, s, max_new_tokens, verify, pids)
                        entry["verify_replicas"] = k
                        report["configurations"].append(entry)
                        outputs[f"{k}x{s}"] = tokens
                        print(format_level(entry), file=sys.stderr, flush=True)
            finally:
                stop_processes(list(reversed(processes.values())))
    finally:
        if before is not None:
            os.sched_setaffinity(0, before)
    first = next(iter(outputs.values()))
    differing = {name: sum(a != b for a, b in zip(first, tokens)) for name, tokens in outputs.items()}
    report["greedy_outputs_identical"] = not any(differing.values())
    report["generations_differing_from_first"] = differing
    report["load_1min_after"] = round(os.getloadavg()[0], 2)
    return report


def format_level(entry: dict) -> str:
    shares = ", ".join(f"{100 * v:.0f} % ({m:.1f})" for v, m in zip(entry["verify_session_share"].values(),
                                                                    entry["verify_mean_live_sessions"].values()))
    cpu = ", ".join(f"{v:.1f}" for v in entry["verify_cpu_s"].values())
    line = (f"{entry['verify_replicas']} verify x {entry['streams']:>2} streams: {entry['tokens_per_s']:7.1f} tok/s, "
            f"latency p50 {entry['p50_latency_ms']:.0f} / p99 {entry['p99_latency_ms']:.0f} ms, "
            f"re-prefills/gen {entry['reprefills_per_generation']}")
    if "rebinds_per_generation" in entry:
        line += f", rebinds/gen {entry['rebinds_per_generation']}"
    return line + f", held sessions per verify replica, share (mean) [{shares}], verify CPU s [{cpu}]"


def format_live(report: dict) -> str:
    lines = [format_level(entry) for entry in report["configurations"]]
    same = report["greedy_outputs_identical"]
    lines.append(f"greedy outputs identical across {len(report['configurations'])} configurations: "
                 + ("yes" if same else f"NO ({report['generations_differing_from_first']})"))
    lines.append(f"1-minute load average: {report['load_1min_before']} before, {report['load_1min_after']} after")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarking.routing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser("simulate", help="the routing choice alone and with affinity, no servers")
    sim.add_argument("--replicas", type=int, default=100)
    sim.add_argument("--sessions", type=int, default=10_000)
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--next-arrivals", type=int, default=1000, help="(b): arrivals after a replica joins")
    run = commands.add_parser("live", help="replica processes on this machine, concurrent streams through them")
    run.add_argument("--verify-replicas", type=int, nargs="+", default=[1, 2])
    run.add_argument("--draft-replicas", type=int, default=2)
    run.add_argument("--streams", type=int, nargs="+", default=[8, 32])
    run.add_argument("--max-new-tokens", type=int, default=32)
    run.add_argument("--generations", type=int, default=96, help="generations per configuration")
    run.add_argument("--no-pinned", action="store_true")
    run.add_argument("--out", help="write the JSON report here too")
    for sub in (sim, run):
        sub.add_argument("--json", action="store_true", help="print the JSON report instead of the summary")
    args = parser.parse_args(argv)
    if args.command == "simulate":
        report = simulate(args.replicas, args.sessions, args.seed, args.next_arrivals)
        print(json.dumps(report, indent=1) if args.json else format_simulation(report))
        return
    report = live(args.verify_replicas, args.streams, args.draft_replicas, args.max_new_tokens, args.generations,
                  pinned=not args.no_pinned)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1) if args.json else format_live(report))


if __name__ == "__main__":
    main()
