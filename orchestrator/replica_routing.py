"""Which replica of a role a new session goes to: a pure function of (session, replicas, loads).

A generation is bound to one draft and one verify replica for its whole life (its KV cache lives there);
this choice is made once per binding, when a session starts or when its replica went away.

The choice, in order:
1. Only replicas that can take a session: reachable, not draining, and serving what the role should
   (ReplicaView.usable). None are: no choice (the caller waits, retries or falls back).
2. Each usable replica gets a cost: the sessions it holds and the requests queued on it, plus one for the
   new session, times how slow it is against the fastest of them (its measured compute per model step
   and session; 1 within SPEED_BAND of the fastest, at most MAX_SLOWNESS), doubled when its session memory is nearly full (a session there would evict
   another's cache).
3. Every replica whose cost is within `tolerance` of the cheapest is "equally loaded"; among those the
   session goes to the one with the highest rendezvous hash of (session, replica) (Thaler & Ravishankar's
   highest random weight). Several orchestrators that see the same loads pick the same replicas for the
   same sessions, with no shared state; when a replica joins or leaves an equally loaded set, only the
   sessions that hash to it change replica (1/n of them), not a reshuffle.

The loads are what replicas report (ReplicaLoad in every reply and in GetModelInfo), never fresher than
the last reply, so the sessions this orchestrator bound since are counted from its own books (`bound`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

# Costs within this fraction of the cheapest count as equal: the stable hash decides among them.
DEFAULT_TOLERANCE = 0.25
# Session memory used beyond this fraction: a new session there would likely evict another's cache.
MEMORY_PRESSURE = 0.9
# A replica counts as at most this many times slower than the fastest: a measurement skewed by a burst
# must not starve a replica of the sessions that would measure it again.
MAX_SLOWNESS = 4.0
# Speeds within this factor of the fastest count as equal: identical replicas on shared or busy hosts
# measure up to ~2x apart from moment to moment (two on one 2-core CPU beside four other processes:
# 8-28 ms per step and session), while the pools this is for differ by more (an L4 against an H100:
# several times).
SPEED_BAND = 2.0


@dataclass(frozen=True)
class ReplicaView:
    """What the orchestrator knows of one replica when it chooses."""
    address: str  # the replica's identity (host:port)
    bound: int = 0  # sessions this orchestrator has bound to it now
    live_sessions: int = 0  # sessions it reported holding (all orchestrators), at its last reply
    queued: int = 0  # requests it reported waiting, at its last reply
    memory_used: float = 0.0  # session memory in use it reported, 0..1
    service_ms: float | None = None  # its measured compute per model step, None: not measured (lately)
    usable: bool = True  # reachable, serves this role's model, and not draining

    def sessions(self) -> int:
        # Its report counts our sessions as of its last reply; ours are counted since, so the larger
        # of the two is the better guess of what it holds now.
        return max(self.bound, self.live_sessions)


def rendezvous_weight(session_key: str, address: str) -> int:
    """A 64-bit weight that depends only on the pair: the same on every orchestrator and every run."""
    digest = hashlib.blake2b(f"{session_key}\x00{address}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def replica_costs(replicas: Sequence[ReplicaView]) -> dict[str, float]:
    """The cost of adding one session to each usable replica (see the module's docstring)."""
    usable = [r for r in replicas if r.usable]
    speeds = [r.service_ms for r in usable if r.service_ms is not None and r.service_ms > 0]
    fastest = min(speeds) if speeds else None
    costs = {}
    for r in usable:
        # Not measured yet: taken to be as fast as the fastest, so that it gets tried and measured.
        measured = fastest is not None and r.service_ms is not None and r.service_ms > 0
        ratio = r.service_ms / fastest if measured else 1.0
        slowness = min(MAX_SLOWNESS, ratio) if ratio >= SPEED_BAND else 1.0
        cost = (r.sessions() + r.queued + 1) * slowness
        if r.memory_used >= MEMORY_PRESSURE:
            cost *= 2.0
        costs[r.address] = cost
    return costs


def choose_replica(session_key: str, replicas: Sequence[ReplicaView],
                   tolerance: float = DEFAULT_TOLERANCE) -> str | None:
    """The address a new session `session_key` should bind to, or None when no replica is usable."""
    costs = replica_costs(replicas)
    if not costs:
        return None
    cheapest = min(costs.values())
    equal = [address for address, cost in costs.items() if cost <= cheapest * (1.0 + tolerance)]
    return max(equal, key=lambda address: (rendezvous_weight(session_key, address), address))
