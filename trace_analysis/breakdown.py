"""Where each round's wall time went, from exported spans: the parts of a round on its critical path, and
their median, p90 and share of the wall time over many rounds.

A round's calls are its Propose / Verify client spans (observed = their duration). Each call's server-side
split comes from the service's SERVER span when it is among the files (its duration = server-reported
time; its specdec.compute_ms and specdec.queue_ms attributes), else from the round's attributes
(specdec.<side>.observed / server / compute / queue ms, scaled to the call when a side made several
calls). Without client spans the attributes alone describe one call per side. Per call, network =
client-observed - server-reported (no clock sync between hosts), server other = server-reported minus
queue and compute.

The critical path: verify calls are on it; a draft call is on it only where it does not overlap a verify
call (an overlapped round drafts the next round while the target verifies), so its parts are scaled by
that share. Accept is the round's specdec.accept_ms attribute (or, in traces from before it, its "accept"
child span); orchestrator = specdec.round_ms - the calls on the path - accept. A round's wall time is its
span's own start..end, measured apart from the attributes, so `covers_wall_fraction` shows whether the
parts account for it.

Knows span names and attributes, not how they were measured.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field

from specdec_api.method_paths import PROPOSE, VERIFY

PARTS = ("draft compute", "draft queue", "draft server other", "draft network",
         "verify compute", "verify queue", "verify server other", "verify network",
         "accept", "orchestrator")
SIDES = {PROPOSE: "draft", VERIFY: "verify"}


def _ms(span: dict) -> float:
    return (span["end_time_unix_nano"] - span["start_time_unix_nano"]) / 1e6


@dataclass
class Call:
    side: str  # "draft" | "verify"
    observed_ms: float
    server_ms: float
    compute_ms: float
    queue_ms: float
    start_ns: int | None = None  # the client span's, when there is one
    end_ns: int | None = None
    on_path: float = 1.0  # share of the call on the round's critical path

    @property
    def network_ms(self) -> float:
        return max(0.0, self.observed_ms - self.server_ms)

    @property
    def server_other_ms(self) -> float:
        return max(0.0, self.server_ms - self.compute_ms - self.queue_ms)


@dataclass
class Round:
    trace_id: str
    span_id: str
    start_ns: int
    end_ns: int
    attributes: dict
    calls: list[Call]
    accept_ms: float
    accept_start_ns: int | None = None  # where the accept step began, when the spans tell
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def wall_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6

    @property
    def index(self) -> int:
        return int(self.attributes.get("specdec.round", 0))

    @property
    def overlapped(self) -> bool:
        return bool(self.attributes.get("specdec.overlapped", False)) or any(c.on_path < 1 for c in self.calls)


def _from_attributes(attributes: dict, side: str, observed_ms: float | None = None) -> Call | None:
    """The side's call as the round's attributes report it, scaled to `observed_ms` when given."""
    reported = attributes.get(f"specdec.{side}.observed_ms")
    if not reported:
        return None  # no call this round (target-only), or not recorded
    scale = 1.0 if observed_ms is None else observed_ms / reported
    observed = reported * scale
    server, compute, queue = (float(attributes.get(f"specdec.{side}.{k}_ms", 0.0)) * scale
                              for k in ("server", "compute", "queue"))
    # Nested as they are measured, whatever the attributes say (an overlapped round's draft attributes
    # may sum calls that were partly off the critical path): the parts never exceed the call.
    server = min(server, observed)
    compute = min(compute, server)
    return Call(side, observed, server, compute, min(queue, server - compute))


def _from_spans(client: dict, children: dict[str, list[dict]], attributes: dict) -> Call:
    side = SIDES[client["name"]]
    server = next((s for s in children.get(client["span_id"], ()) if s.get("kind") == "SERVER"), None)
    if server is not None:
        reported = server.get("attributes", {})
        call = Call(side, _ms(client), _ms(server), float(reported.get("specdec.compute_ms", 0.0)),
                    float(reported.get("specdec.queue_ms", 0.0)))
    else:
        call = _from_attributes(attributes, side, _ms(client)) or Call(side, _ms(client), 0.0, 0.0, 0.0)
    call.start_ns, call.end_ns = client["start_time_unix_nano"], client["end_time_unix_nano"]
    return call


def _mark_critical_path(calls: list[Call], overlapped: bool) -> None:
    verifies = [c for c in calls if c.side == "verify"]
    for call in calls:
        if call.side != "draft" or not verifies or call.observed_ms <= 0:
            continue
        if call.start_ns is not None and all(v.start_ns is not None for v in verifies):
            hidden = sum(max(0, min(call.end_ns, v.end_ns) - max(call.start_ns, v.start_ns)) for v in verifies)
            call.on_path = max(0.0, 1.0 - hidden / max(1, call.end_ns - call.start_ns))
        elif overlapped:  # attributes only: the draft hides behind the verify as far as it lasts
            call.on_path = max(0.0, call.observed_ms - sum(v.observed_ms for v in verifies)) / call.observed_ms


def _split(r: Round) -> dict[str, float]:
    parts = dict.fromkeys(PARTS, 0.0)
    on_path_ms = 0.0
    for call in r.calls:
        share = call.on_path
        parts[f"{call.side} compute"] += call.compute_ms * share
        parts[f"{call.side} queue"] += call.queue_ms * share
        parts[f"{call.side} server other"] += call.server_other_ms * share
        parts[f"{call.side} network"] += call.network_ms * share
        on_path_ms += call.observed_ms * share
    parts["accept"] = r.accept_ms
    round_ms = float(r.attributes.get("specdec.round_ms", r.wall_ms))
    parts["orchestrator"] = max(0.0, round_ms - on_path_ms - r.accept_ms)
    return parts


def _accept(attributes: dict, kids: list[dict], calls: list[Call]) -> tuple[float, int | None]:
    """The accept step's ms and start: the round's specdec.accept_ms, which begins as the last call ends
    (accept waits for every call of the round), or the "accept" child span older orchestrators emit."""
    span = next((k for k in kids if k["name"] == "accept"), None)
    if span is not None:
        return _ms(span), span["start_time_unix_nano"]
    ends = [c.end_ns for c in calls if c.end_ns is not None]
    return float(attributes.get("specdec.accept_ms", 0.0)), max(ends) if ends else None


def rounds_from_spans(spans: list[dict]) -> list[Round]:
    """Every "round" span with its calls and accept step, in start order."""
    children: dict[str, list[dict]] = defaultdict(list)
    for span in spans:
        if span.get("parent_span_id"):
            children[span["parent_span_id"]].append(span)
    rounds = []
    for span in spans:
        if span["name"] != "round":
            continue
        kids = sorted(children.get(span["span_id"], ()), key=lambda s: s["start_time_unix_nano"])
        attributes = span.get("attributes", {})
        clients = [k for k in kids if k["name"] in SIDES]
        if clients:
            calls = [_from_spans(k, children, attributes) for k in clients]
        else:
            calls = [c for c in (_from_attributes(attributes, side) for side in ("draft", "verify")) if c]
        _mark_critical_path(calls, bool(attributes.get("specdec.overlapped", False)))
        r = Round(span["trace_id"], span["span_id"], span["start_time_unix_nano"], span["end_time_unix_nano"],
                  attributes, calls, *_accept(attributes, kids, calls))
        r.parts = _split(r)
        rounds.append(r)
    rounds.sort(key=lambda r: r.start_ns)
    return rounds


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def one_way_samples(rounds: list[Round]) -> list[float]:
    """Per call: (client-observed - server-reported) / 2, the one-way network time with no clock sync."""
    return [call.network_ms / 2 for r in rounds for call in r.calls]


def summarize(rounds: list[Round]) -> dict:
    wall = sum(r.wall_ms for r in rounds)
    parts = {}
    for name in PARTS:
        values = [r.parts[name] for r in rounds]
        total = sum(values)
        parts[name] = {"median_ms": statistics.median(values) if values else 0.0,
                       "p90_ms": percentile(values, 90), "total_ms": total,
                       "share": total / wall if wall else 0.0}
    walls = [r.wall_ms for r in rounds]
    one_way = one_way_samples(rounds)
    compute = {side: [c.compute_ms for r in rounds for c in r.calls if c.side == side] for side in ("draft", "verify")}
    return {
        "rounds": len(rounds),
        "traces": len({r.trace_id for r in rounds}),
        "wall_ms": wall,
        "round_ms": {"median_ms": statistics.median(walls) if walls else 0.0, "p90_ms": percentile(walls, 90)},
        "parts": parts,
        "covers_wall_fraction": sum(p["total_ms"] for p in parts.values()) / wall if wall else 0.0,
        "one_way_ms_p50": statistics.median(one_way) if one_way else 0.0,
        "compute_ms_p50": {side: statistics.median(v) if v else 0.0 for side, v in compute.items()},
        "overlapped_rounds": sum(r.overlapped for r in rounds),
    }
