"""The routing simulation (benchmarking/routing.py simulate): few sessions move when a replica joins or
leaves, unlike hash % N, and with session affinity none move but the leaver's."""

from __future__ import annotations

from benchmarking.routing import (affinity_churn, format_simulation, heterogeneous, modulo_choice, moved_on_churn,
                                  rendezvous_choice, replica_addresses, session_keys, simulate)


def test_one_replica_joining_or_leaving_among_100_moves_at_most_two_percent_of_sessions():
    keys, replicas = session_keys(3000), replica_addresses(100)
    churn = moved_on_churn(keys, replicas, rendezvous_choice)
    assert churn["join_moved"] <= 0.02 and churn["leave_moved"] <= 0.02, churn


def test_hash_modulo_n_moves_nearly_every_session_instead():
    churn = moved_on_churn(session_keys(3000), replica_addresses(100), modulo_choice)
    assert churn["join_moved"] >= 0.9 and churn["leave_moved"] >= 0.9, churn


def test_with_affinity_a_join_moves_no_session_and_a_leave_only_the_leavers():
    report = affinity_churn(session_keys(1000), replica_addresses(10), next_arrivals=200)
    assert report["join_moved"] == 0
    assert 0 < report["leave_moved"] <= 0.2 * 1000  # its own sessions, about a tenth
    # The newcomer, at 0 sessions, is the cheapest: it takes the next arrivals until it is nearly caught up.
    assert report["newcomer_first_in_a_row"] >= 50 and report["newcomer_took"] > 200 / 11, report
    # Load-aware binding keeps every replica within the tolerance band of the others.
    assert report["spread"]["max"] <= 1.3 * (report["spread"]["min"] + 1), report["spread"]


def test_a_three_times_slower_replica_gets_about_a_third_of_a_fast_ones_share():
    shares = heterogeneous(sessions=(400,))["shares"][400]
    *fast, slow = shares.values()
    assert all(slow < 0.5 * f for f in fast), shares
    assert slow >= 0.2 * min(fast), shares


def test_the_report_prints():
    text = format_simulation(simulate(replicas=5, sessions=200, next_arrivals=50))
    assert "hash % N baseline" in text and "(d)" in text
