"""The routing choice alone: a pure function of (session, replicas, loads), no gRPC."""

from __future__ import annotations

import random
from collections import Counter

from orchestrator.replica_routing import ReplicaView, choose_replica, replica_costs


def views(n: int, **fields) -> list[ReplicaView]:
    return [ReplicaView(f"10.0.0.{i}:50052", **fields) for i in range(n)]


def bind_sequentially(replicas: list[ReplicaView], sessions: int, seed: int = 0) -> Counter:
    """One orchestrator binding `sessions` new sessions one after another, counting its own bindings."""
    rng = random.Random(seed)
    counts: Counter = Counter()
    for _ in range(sessions):
        current = [ReplicaView(r.address, bound=counts[r.address], service_ms=r.service_ms, usable=r.usable,
                               memory_used=r.memory_used) for r in replicas]
        counts[choose_replica(f"{rng.getrandbits(64):016x}", current)] += 1
    return counts


def test_no_usable_replica_means_no_choice():
    assert choose_replica("s", []) is None
    assert choose_replica("s", views(3, usable=False)) is None


def test_the_choice_is_deterministic_and_independent_of_list_order():
    replicas = views(7)
    for key in (f"session-{i}" for i in range(200)):
        first = choose_replica(key, replicas)
        shuffled = replicas[:]
        random.Random(key).shuffle(shuffled)
        assert choose_replica(key, shuffled) == first


def test_equal_loads_spread_sessions_evenly_by_hash():
    replicas = views(4)
    counts = Counter(choose_replica(f"{i:x}", replicas) for i in range(8000))
    assert len(counts) == 4
    assert all(1700 <= c <= 2300 for c in counts.values()), counts  # 2000 each, binomial sd ~39


def test_one_replica_joining_or_leaving_among_100_moves_about_one_percent():
    replicas = views(100)
    keys = [f"{i:08x}" for i in range(10_000)]
    before = {k: choose_replica(k, replicas) for k in keys}
    joined = replicas + [ReplicaView("10.0.1.1:50052")]
    moved_join = sum(choose_replica(k, joined) != before[k] for k in keys)
    left = replicas[1:]
    moved_leave = sum(choose_replica(k, left) != before[k] for k in keys)
    # Ideal: 1/101 of the sessions go to the newcomer; exactly the leaver's sessions move.
    assert moved_join <= 200 and moved_leave <= 200, (moved_join, moved_leave)
    assert all(choose_replica(k, joined) in (before[k], "10.0.1.1:50052") for k in keys[:500])
    gone = replicas[0].address
    assert moved_leave == sum(1 for k in keys if before[k] == gone)


def test_sequential_sessions_alternate_over_two_equal_replicas():
    for seed in range(20):
        counts = bind_sequentially(views(2), 8, seed)
        # Costs (sessions + 1) within 25 % count as equal, so 4:3 may become 5:3, never worse.
        assert min(counts.values()) >= 3, counts
        counts = bind_sequentially(views(2), 33, seed)
        low, high = sorted(counts.values())
        assert high + 1 <= (low + 1) * 1.25 + 1, counts


def test_a_loaded_replica_gets_no_new_session_until_the_others_catch_up():
    busy = ReplicaView("a:1", live_sessions=10)
    idle = ReplicaView("b:1", live_sessions=2, queued=1)
    assert all(choose_replica(f"{i}", [busy, idle]) == "b:1" for i in range(100))
    # Its own bindings count even before the replica reports them.
    assert all(choose_replica(f"{i}", [ReplicaView("a:1", bound=10), ReplicaView("b:1")]) == "b:1"
               for i in range(100))


def test_draining_or_unreachable_replicas_take_no_session():
    replicas = [ReplicaView("a:1", usable=False), ReplicaView("b:1", live_sessions=50), ReplicaView("c:1", usable=False)]
    assert {choose_replica(f"{i}", replicas) for i in range(100)} == {"b:1"}


def test_a_slow_replica_gets_fewer_sessions_in_proportion_to_its_speed():
    fast, slow = ReplicaView("fast:1", service_ms=10.0), ReplicaView("slow:1", service_ms=30.0)
    counts = bind_sequentially([fast, slow], 40)
    # Costs balance when fast holds ~3x the sessions of slow: (f + 1) ~ 3 (s + 1).
    assert 26 <= counts["fast:1"] <= 33, counts
    assert replica_costs([fast, slow]) == {"fast:1": 1.0, "slow:1": 3.0}


def test_an_unmeasured_replica_is_assumed_fast_so_it_gets_tried():
    measured, new = ReplicaView("m:1", service_ms=20.0, bound=1), ReplicaView("n:1")
    assert replica_costs([measured, new]) == {"m:1": 2.0, "n:1": 1.0}


def test_a_replica_with_nearly_full_session_memory_costs_double():
    full, roomy = ReplicaView("full:1", memory_used=0.95), ReplicaView("roomy:1", bound=1, memory_used=0.5)
    assert replica_costs([full, roomy]) == {"full:1": 2.0, "roomy:1": 2.0}
    assert all(choose_replica(f"{i}", [full, ReplicaView("roomy:1", memory_used=0.5)]) == "roomy:1"
               for i in range(50))


def test_slowness_is_capped_so_no_replica_is_starved_by_one_skewed_measurement():
    measured_fast, skewed = ReplicaView("fast:1", service_ms=4.0), ReplicaView("skewed:1", service_ms=40.0)
    assert replica_costs([measured_fast, skewed]) == {"fast:1": 1.0, "skewed:1": 4.0}
    counts = bind_sequentially([measured_fast, skewed], 16)
    assert counts["skewed:1"] >= 3, counts  # (f + 1) ~ 4 (s + 1): ~3 of 16


def test_speeds_within_the_band_count_as_equal():
    a, b = ReplicaView("a:1", service_ms=10.0), ReplicaView("b:1", service_ms=19.0)
    assert replica_costs([a, b]) == {"a:1": 1.0, "b:1": 1.0}
    assert replica_costs([a, ReplicaView("b:1", service_ms=25.0)]) == {"a:1": 1.0, "b:1": 2.5}
