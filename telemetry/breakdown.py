"""Where each round's wall time went, from exported spans: the parts of a round on its critical path, and
their median, p90 and share of the wall time over many rounds.

Reads the "round" spans' measured split (specdec.draft.* / specdec.verify.* observed, server, compute and
queue ms; specdec.round_ms) and the round's "accept" child. Per call, network = client-observed - server-
reported (no clock sync between hosts); server other = server-reported - queue - compute; orchestrator =
round_ms - the calls on the critical path - accept. When a round ran draft and verify at once
(specdec.overlapped), draft time hidden behind verify is off the critical path: the draft parts are scaled
by the share of the draft call that did not overlap the verify call (from their client spans, else from the
observed times). The wall time of a round is its span's own start..end, measured apart from the attributes,
so `covers_wall_fraction` shows whether the parts account for it.

Knows span names and attributes, not how they were measured.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field

PARTS = ("draft compute", "draft queue", "draft server other", "draft network",
         "verify compute", "verify queue", "verify server other", "verify network",
         "accept", "orchestrator")
DRAFT_METHOD = "/specdec.v1.DraftService/Propose"
VERIFY_METHOD = "/specdec.v1.VerifyService/Verify"


@dataclass
class Call:
    observed_ms: float
    server_ms: float
    compute_ms: float
    queue_ms: float
    start_ns: int | None = None  # the client span's, when there is one
    end_ns: int | None = None

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
    draft: Call | None
    verify: Call | None
    accept_ms: float
    accept_span: tuple[int, int] | None = None
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def wall_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6

    @property
    def index(self) -> int:
        return int(self.attributes.get("specdec.round", 0))

    @property
    def overlapped(self) -> bool:
        return bool(self.attributes.get("specdec.overlapped", False))

    def draft_on_path(self) -> float:
        """The share of the draft call on the critical path: 1 unless it overlapped the verify call."""
        d, v = self.draft, self.verify
        if not self.overlapped or d is None or v is None or d.observed_ms <= 0:
            return 1.0
        if None not in (d.start_ns, d.end_ns, v.start_ns, v.end_ns) and d.end_ns > d.start_ns:
            hidden = max(0, min(d.end_ns, v.end_ns) - max(d.start_ns, v.start_ns))
            return 1.0 - hidden / (d.end_ns - d.start_ns)
        return max(0.0, d.observed_ms - v.observed_ms) / d.observed_ms


def _call(attributes: dict, side: str, span: dict | None) -> Call | None:
    observed = attributes.get(f"specdec.{side}.observed_ms")
    if not observed:
        return None  # no call this round (target-only), or not recorded
    call = Call(float(observed), float(attributes.get(f"specdec.{side}.server_ms", 0.0)),
                float(attributes.get(f"specdec.{side}.compute_ms", 0.0)),
                float(attributes.get(f"specdec.{side}.queue_ms", 0.0)))
    if span is not None:
        call.start_ns, call.end_ns = span["start_time_unix_nano"], span["end_time_unix_nano"]
    return call


def _split(r: Round) -> dict[str, float]:
    parts = dict.fromkeys(PARTS, 0.0)
    on_path_ms = 0.0
    for side, call, share in (("draft", r.draft, r.draft_on_path()), ("verify", r.verify, 1.0)):
        if call is None:
            continue
        parts[f"{side} compute"] = call.compute_ms * share
        parts[f"{side} queue"] = call.queue_ms * share
        parts[f"{side} server other"] = call.server_other_ms * share
        parts[f"{side} network"] = call.network_ms * share
        on_path_ms += call.observed_ms * share
    parts["accept"] = r.accept_ms
    round_ms = float(r.attributes.get("specdec.round_ms", r.wall_ms))
    parts["orchestrator"] = max(0.0, round_ms - on_path_ms - r.accept_ms)
    return parts


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
        kids = {k["name"]: k for k in children.get(span["span_id"], ())}
        attributes = span.get("attributes", {})
        accept = kids.get("accept")
        r = Round(span["trace_id"], span["span_id"], span["start_time_unix_nano"], span["end_time_unix_nano"],
                  attributes, _call(attributes, "draft", kids.get(DRAFT_METHOD)),
                  _call(attributes, "verify", kids.get(VERIFY_METHOD)),
                  (accept["end_time_unix_nano"] - accept["start_time_unix_nano"]) / 1e6 if accept else 0.0,
                  (accept["start_time_unix_nano"], accept["end_time_unix_nano"]) if accept else None)
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
    return [call.network_ms / 2 for r in rounds for call in (r.draft, r.verify) if call is not None]


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
    calls = {side: [c for c in (getattr(r, side) for r in rounds) if c is not None] for side in ("draft", "verify")}
    return {
        "rounds": len(rounds),
        "traces": len({r.trace_id for r in rounds}),
        "wall_ms": wall,
        "round_ms": {"median_ms": statistics.median(walls) if walls else 0.0, "p90_ms": percentile(walls, 90)},
        "parts": parts,
        "covers_wall_fraction": sum(p["total_ms"] for p in parts.values()) / wall if wall else 0.0,
        "one_way_ms_p50": statistics.median(one_way) if one_way else 0.0,
        "compute_ms_p50": {side: statistics.median([c.compute_ms for c in cs]) if cs else 0.0
                           for side, cs in calls.items()},
        "overlapped_rounds": sum(r.overlapped for r in rounds),
    }
