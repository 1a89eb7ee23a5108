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
    fixed, per_token = model.coefficients()
    assert fixed == pytest.approx(3.0, rel=1e-6) and per_token == pytest.approx(0.25, rel=1e-6)


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
