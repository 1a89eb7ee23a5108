"""Leviathan's speedup formula and the gamma choices made from it."""

import pytest

from speculation.gamma_policy import AdaptiveGamma, best_gamma, expected_speedup, expected_tokens_per_round


def test_formula_matches_the_paper_values():
    # (1 - a^(g+1)) / ((1 - a)(g c + 1)); e.g. alpha 0.8, gamma 4, c 0.05 -> 3.3616 / 1.2
    assert expected_speedup(0.8, 4, 0.05) == pytest.approx((1 - 0.8 ** 5) / (0.2 * 1.2))
    assert expected_tokens_per_round(1.0, 5) == 6
    assert expected_speedup(0.0, 3, 0.1) == pytest.approx(1 / 1.3)


def test_best_gamma_grows_with_alpha_and_shrinks_with_cost():
    assert best_gamma(0.9, 0.05, 16) > best_gamma(0.6, 0.05, 16) > 0
    assert best_gamma(0.8, 0.02, 16) >= best_gamma(0.8, 0.2, 16)
    assert best_gamma(0.05, 0.5, 16) == 0  # speculation does not pay


def test_adaptive_gamma_follows_measured_acceptance():
    policy = AdaptiveGamma(max_gamma=12, gamma=4, cost_ratio=0.05)
    for _ in range(30):
        policy.update(drafted=policy.gamma, accepted=policy.gamma)  # everything accepted
    high = policy.gamma
    for _ in range(30):
        policy.update(drafted=policy.gamma, accepted=0)  # nothing accepted
    assert high >= 8 and policy.gamma == 1 and policy.alpha < 0.1


def test_verify_cost_model_recovers_fixed_and_per_token_cost():
    from speculation.gamma_policy import VerifyCostModel

    model = VerifyCostModel()
    for tokens in (5, 10, 20, 40, 80, 5, 40):
        model.update(tokens, 3.0 + 0.25 * tokens)
    fixed, per_session, per_token = model.coefficients()
    assert fixed == pytest.approx(3.0, rel=1e-6) and per_token == pytest.approx(0.25, rel=1e-6)
    assert per_session == 0.0  # one session throughout: nothing to tell a session's cost apart by


def test_verify_cost_model_tells_per_session_from_per_token_cost():
    """Passes of different sessions and gammas: the fit separates the two slopes. Sessions drafting alike
    (tokens proportional to sessions) cannot separate them, and the fit says so by one slope."""
    from speculation.gamma_policy import VerifyCostModel

    def truth(sessions, tokens):  # the reference target's pass
        return 12.0 + 1.3 * sessions + 0.73 * tokens

    model = VerifyCostModel()
    for sessions, gammas in ((1, [4]), (4, [1, 2, 4, 4]), (16, [1] * 8 + [4] * 8), (32, [2] * 32), (8, [0] * 8),
                             (16, [4] * 16), (2, [6, 1])):
        tokens = sum(g + 1 for g in gammas)
        model.update(tokens, truth(sessions, tokens), sessions=sessions)
    fixed, per_session, per_token = model.coefficients()
    assert (fixed, per_session, per_token) == (pytest.approx(12.0, rel=1e-3), pytest.approx(1.3, rel=1e-3),
                                               pytest.approx(0.73, rel=1e-3))

    alike = VerifyCostModel()
    for sessions in (1, 4, 16, 32, 8):
        alike.update(5 * sessions, truth(sessions, 5 * sessions), sessions=sessions)
    fixed, per_session, per_token = alike.coefficients()
    assert per_session == 0.0 and per_token == pytest.approx(0.73 + 1.3 / 5, rel=1e-3)


def test_a_per_session_cost_favours_longer_drafts_under_load():
    """What a session costs a pass whatever its gamma is paid once per round: counted apart from the
    per-token cost, the longer draft wins where one slope for both would have shrunk it."""
    from speculation.gamma_policy import best_gamma_under_load, expected_tokens_per_round

    args = dict(alpha=0.84, draft_step_ms=1.5, fixed_ms=12.0, batch=16, max_gamma=12)
    apart = best_gamma_under_load(**args, per_token_ms=0.73, per_session_ms=1.3)
    folded = best_gamma_under_load(**args, per_token_ms=0.73 + 1.3 / 2)  # a slope fitted where gamma was 1
    assert apart > folded

    def rate(g):
        return expected_tokens_per_round(0.84, g) / (g * 1.5 + 12.0 + 1.3 * 16 + 0.73 * 16 * (g + 1))
    assert rate(apart) == max(rate(g) for g in range(13))


def test_gamma_shrinks_to_plain_decoding_as_the_batch_grows():
    from speculation.gamma_policy import best_gamma_under_load

    memory_bound = best_gamma_under_load(0.75, draft_step_ms=0.5, fixed_ms=10.0, per_token_ms=0.05, batch=1,
                                         max_gamma=12)
    loaded = best_gamma_under_load(0.75, 0.5, 10.0, 0.05, batch=32, max_gamma=12)
    saturated = best_gamma_under_load(0.75, 0.5, 10.0, 0.5, batch=64, max_gamma=12)
    assert memory_bound > loaded > saturated == 0


def test_a_per_round_overhead_favours_longer_drafts():
    from speculation.gamma_policy import best_gamma_under_load, expected_tokens_per_round

    args = dict(alpha=0.8, draft_step_ms=1.0, fixed_ms=5.0, per_token_ms=1.0, batch=8, max_gamma=12)
    bare = best_gamma_under_load(**args)
    with_overhead = best_gamma_under_load(**args, round_overhead_ms=30.0)
    assert with_overhead > bare

    def rate(g, overhead):  # the objective, written out: the chosen gamma must be its maximum
        return expected_tokens_per_round(0.8, g) / (g * 1.0 + 5.0 + 8 * (g + 1) + overhead)
    assert rate(with_overhead, 30.0) == max(rate(g, 30.0) for g in range(13))


def test_new_sessions_start_from_the_deployments_measured_acceptance():
    from orchestrator.load_gamma import LoadAwareGamma, LoadModel

    load = LoadModel()
    first = LoadAwareGamma(load, max_gamma=8, gamma=4)
    assert first.alpha == 0.7  # nothing measured yet: the prior
    for _ in range(60):  # a draft that gets 9 of every 10 tokens accepted
        first.update(drafted=10, accepted=9)
    later = LoadAwareGamma(load, max_gamma=8, gamma=4)
    assert later.alpha == load.acceptance.alpha and 0.85 < later.alpha < 0.91


def test_acceptance_is_the_pooled_rate_not_the_mean_of_round_ratios():
    from speculation.gamma_policy import AcceptanceEstimate

    # Draws from a draft whose every token is accepted with probability 0.8, in rounds of 4: the
    # estimate must find 0.8. The mean of per-round ratios (accepted / trials) would read ~0.7.
    import random

    rng = random.Random(0)
    estimate = AcceptanceEstimate(prior=0.3, decay=0.999)
    ratios = []
    for _ in range(4000):
        accepted = 0
        while accepted < 4 and rng.random() < 0.8:
            accepted += 1
        estimate.update(drafted=4, accepted=accepted)
        ratios.append(accepted / (accepted + (accepted < 4)))
    assert estimate.alpha == pytest.approx(0.8, abs=0.02)
    assert sum(ratios) / len(ratios) < 0.75  # the estimator it replaced, biased low


def test_once_the_verify_is_saturated_drafting_time_no_longer_shrinks_gamma():
    """16 sessions on a verify that serves them in turn: a slow batched draft step is hidden behind the
    other sessions' passes, so gamma is chosen by the verify compute it adds, not by the draft's time."""
    from speculation.gamma_policy import best_gamma_under_load, expected_tokens_per_round

    args = dict(alpha=0.84, draft_step_ms=11.0, fixed_ms=12.0, per_token_ms=0.73, per_session_ms=1.3, batch=8,
                max_gamma=12, round_overhead_ms=3.0)
    alone = best_gamma_under_load(**args)  # the orchestrator's own generations do not fill the verify
    shared = best_gamma_under_load(**args, sessions=16)
    assert shared > alone

    def rate(g):  # the objective written out
        serial = g * 11.0 + 12.0 + 1.3 * 8 + 0.73 * 8 * (g + 1) + 3.0
        cycle = 2 * 12.0 + 16 * (1.3 + 0.73 * (g + 1))
        return expected_tokens_per_round(0.84, g) / max(serial, cycle)
    assert rate(shared) == max(rate(g) for g in range(13))
    # with no other sessions the cycle never binds: the same choice as before
    assert best_gamma_under_load(**args, sessions=1) == alone


def test_a_session_driven_to_plain_decoding_probes_and_returns_to_drafting():
    """gamma = 0 rounds draft nothing, so they cannot show that the draft has become good again: the
    policy must probe with a one-token draft, back off while probes keep failing, and return to
    drafting once they succeed."""
    from orchestrator.load_gamma import LoadAwareGamma, LoadModel

    load = LoadModel()
    for tokens, sessions in [(1, 1), (3, 1), (5, 1), (2, 2), (6, 2), (10, 2)] * 3:  # verify: 10 ms + 0.5 ms/token
        load.observe(gamma=max(1, tokens // sessions - 1), batch_size=sessions, verify_compute_ms=10.0 + 0.5 * tokens,
                     draft_compute_ms=4.0 * max(1, tokens // sessions - 1), batch_tokens=tokens)
    policy = LoadAwareGamma(load, max_gamma=6, gamma=4)

    def run(rounds, draft_is_right):
        gammas = []
        for _ in range(rounds):
            drafted = policy.gamma
            gammas.append(drafted)
            policy.update(drafted, drafted if draft_is_right else 0)
        return gammas

    bad = run(200, draft_is_right=False)
    assert bad[-1] == 0 and bad.count(0) > 150  # every draft token rejected: plain decoding
    probes = [i for i, g in enumerate(bad) if g > 0 and i > bad.index(0)]
    assert len(probes) >= 3  # it kept probing...
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0]  # ...less often while the probes failed
    good = run(80, draft_is_right=True)
    assert good[-1] > 1 and sum(g > 0 for g in good[-20:]) == 20  # back to drafting once a probe lands


def test_gamma_grows_by_at_most_doubling_after_a_streak_of_accepted_rounds():
    """A short streak of fully accepted rounds puts the acceptance estimate near 1, where the formula's
    best gamma is the largest allowed. The policies grow towards it (at most 2 gamma + 1 per round)
    instead of betting a 32-token draft on a few rounds' evidence; shrinking stays immediate."""
    from orchestrator.load_gamma import LoadAwareGamma, LoadModel

    load = LoadModel()
    for tokens, sessions in [(1, 1), (3, 1), (5, 1), (2, 2), (6, 2), (10, 2)] * 3:  # 10 ms + 0.5 ms/token
        load.observe(gamma=max(1, tokens // sessions - 1), batch_size=sessions, verify_compute_ms=10.0 + 0.5 * tokens,
                     draft_compute_ms=0.2 * max(1, tokens // sessions - 1), batch_tokens=tokens)
    for policy in (LoadAwareGamma(load, max_gamma=32, gamma=4), AdaptiveGamma(max_gamma=32, gamma=4, cost_ratio=0.01)):
        gammas = [policy.gamma]
        for _ in range(8):
            gammas.append(policy.update(drafted=gammas[-1], accepted=gammas[-1]))
        assert gammas[-1] == 32, gammas  # the streak does earn the longest draft...
        assert all(b <= 2 * a + 1 for a, b in zip(gammas, gammas[1:])), gammas  # ...over rounds
        assert gammas[1] < 32
        shrinking = []
        for _ in range(30):
            shrinking.append(policy.update(drafted=max(1, policy.gamma), accepted=0))
        assert shrinking[-1] <= 1, shrinking  # rejections bring it down
    from speculation.gamma_policy import grown_at_most_doubled
    assert grown_at_most_doubled(4, 32) == 9 and grown_at_most_doubled(0, 5) == 1
    assert grown_at_most_doubled(32, 1) == 1  # shrinking is not limited


def test_gamma_is_learned_per_drafter_and_the_last_proposer_sets_the_next_round():
    from speculation.gamma_policy import PerDrafterGamma

    policy = PerDrafterGamma(lambda: AdaptiveGamma(max_gamma=16, gamma=4, cost_ratio=0.05))
    for _ in range(6):  # the n-gram drafter: whole runs accepted (text being copied)
        policy.update(drafted=policy.gamma, accepted=policy.gamma, drafter="ngram")
    ngram_gamma = policy.gamma
    for _ in range(6):  # the model drafter: mostly rejected at its first token
        policy.update(drafted=policy.gamma, accepted=0, drafter="model")
    model_gamma = policy.gamma
    assert ngram_gamma > 8 and model_gamma < 4
    assert set(policy.drafters) == {"", "ngram", "model"}
    # Back to the n-gram drafter: its own estimate, not the model's, sets the next gamma.
    policy.update(drafted=model_gamma, accepted=model_gamma, drafter="ngram")
    assert policy.gamma >= ngram_gamma
    # An n-gram drafter that found no match proposed nothing: that says nothing about gamma.
    before = policy.gamma
    assert policy.update(drafted=0, accepted=0, drafter="ngram") == before
    assert policy.drafters["ngram"].acceptance.alpha > policy.drafters["model"].acceptance.alpha


def test_a_plain_round_nobody_proposed_in_teaches_the_current_drafters_policy():
    from orchestrator.load_gamma import LoadAwareGamma, LoadModel
    from speculation.gamma_policy import PerDrafterGamma

    policy = PerDrafterGamma(lambda: LoadAwareGamma(LoadModel(), max_gamma=8, gamma=4))
    policy.update(drafted=4, accepted=1, drafter="model")
    model = policy.drafters["model"]
    model.gamma = 0  # the load-aware policy chose plain decoding
    for _ in range(model.probe_after):
        policy.update(drafted=0, accepted=0)  # NO_DRAFTS: no drafter named
    assert policy.current is model and policy.gamma == 1  # its probe, not a fresh policy's gamma
