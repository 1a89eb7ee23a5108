"""A Chrome / Perfetto trace-event JSON with each round on a timeline: one process per generation, tracks for
the round, draft, verify, the network legs of each, and the orchestrator (open it at https://ui.perfetto.dev or chrome://tracing).

The orchestrator's clock places each round and each call (its client span when there is one, else the calls
laid end to end from the round's start); overlapping calls of one side share its track, nested. Server-side pieces have no comparable clock, so they are placed by
duration alone: the network time of a call split evenly into a request leg at its start and a response leg
at its end, the server's time between them, queue wait then forward pass at its start (the durations the
service reports on its SERVER span). The accept step starts where the round's last call ended: it waits
for every call of the round, and only its duration is recorded (specdec.accept_ms).

Knows Round objects and the trace-event format, not how spans were gathered.
"""

from __future__ import annotations

import json
from pathlib import Path

from trace_analysis.breakdown import Call, Round

# Network has a track per side: an overlapped round's draft and verify legs would otherwise collide.
TRACKS = {"round": 1, "draft": 2, "network (draft)": 3, "verify": 4, "network (verify)": 5, "orchestrator": 6}


def _slice(name: str, pid: int, track: str, start_us: float, dur_us: float, args: dict | None = None) -> dict:
    event = {"name": name, "ph": "X", "pid": pid, "tid": TRACKS[track], "ts": round(start_us, 3),
             "dur": round(max(0.0, dur_us), 3)}
    if args:
        event["args"] = args
    return event


def _call_events(call: Call, start_us: float, pid: int) -> list[dict]:
    side = call.side
    observed_us = call.observed_ms * 1000
    leg_us = call.network_ms * 1000 / 2
    server_us = observed_us - 2 * leg_us
    server_start = start_us + leg_us
    return [
        _slice(f"{side} request", pid, f"network ({side})", start_us, leg_us),
        _slice(f"{side} server", pid, side, server_start, server_us,
               {"server_ms": call.server_ms, "compute_ms": call.compute_ms, "queue_ms": call.queue_ms,
                "on_critical_path": round(call.on_path, 3)}),
        _slice("queue wait", pid, side, server_start, call.queue_ms * 1000),
        _slice("forward", pid, side, server_start + call.queue_ms * 1000, call.compute_ms * 1000),
        _slice(f"{side} response", pid, f"network ({side})", start_us + observed_us - leg_us, leg_us),
    ]


def trace_events(rounds: list[Round]) -> dict:
    pids: dict[str, int] = {}
    events: list[dict] = []
    for r in rounds:
        if r.trace_id not in pids:
            pid = pids[r.trace_id] = len(pids) + 1
            session = r.attributes.get("specdec.session", r.trace_id[:8])
            events.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": f"generation {session}"}})
            events.extend({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": track}}
                          for track, tid in TRACKS.items())
        pid = pids[r.trace_id]
        start_us = r.start_ns / 1000
        events.append(_slice(f"round {r.index}", pid, "round", start_us, r.wall_ms * 1000, {
            "gamma": r.attributes.get("specdec.gamma"), "accepted": r.attributes.get("specdec.accepted"),
            "outcome": r.attributes.get("specdec.outcome"), "overlapped": r.overlapped,
            **{f"{name} ms": round(value, 3) for name, value in r.parts.items()}}))
        cursor = start_us
        for call in r.calls:
            call_start = call.start_ns / 1000 if call.start_ns is not None else cursor
            events.extend(_call_events(call, call_start, pid))
            cursor = call_start + call.observed_ms * 1000
        if r.accept_ms:
            accept_us = r.accept_start_ns / 1000 if r.accept_start_ns is not None else cursor
            events.append(_slice("accept", pid, "orchestrator", accept_us, r.accept_ms * 1000))
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_trace_events(rounds: list[Round], path: Path) -> Path:
    path.write_text(json.dumps(trace_events(rounds)))
    return path
