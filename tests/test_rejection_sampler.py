"""Rejection sampling, tested alone: forced cases, determinism, and convergence to the target."""

import pytest
import torch
from scipy.stats import chisquare

from speculation.rejection import greedy_accept, rejection_sample
from speculation.sampling import Sampling, logits_to_probs


def forced(rows):
    """Probabilities from +-100 logits: 1 where the row names the token, 0 elsewhere (vocab 4)."""
    logits = torch.full((len(rows), 4), -100.0)
    for i, token in enumerate(rows):
        logits[i, token] = 100.0
    return logits.softmax(-1)


def test_draft_tokens_the_target_is_sure_of_are_all_accepted_and_a_bonus_follows():
    outcome = rejection_sample(torch.tensor([1, 2]), forced([1, 2]), forced([1, 2, 3]), torch.Generator().manual_seed(0))
    assert (outcome.accepted, outcome.next_token, outcome.bonus) == (2, 3, True)


def test_a_token_the_target_rules_out_is_rejected_and_the_residual_picks_the_target_token():
    outcome = rejection_sample(torch.tensor([1, 2]), forced([1, 2]), forced([1, 3, 0]), torch.Generator().manual_seed(0))
    assert (outcome.accepted, outcome.next_token, outcome.bonus) == (1, 3, False)
    assert outcome.tokens([1, 2]) == [1, 3]


def test_first_position_rejection_draws_from_norm_of_p_minus_q():
    draft_probs = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    target_probs = torch.tensor([[0.0, 0.5, 0.5, 0.0], [0.25, 0.25, 0.25, 0.25]])
    # Draft token 0 has p = 0: always rejected; max(0, p - q) = [0, 0, 0.5, 0] -> token 2 always.
    for seed in range(20):
        outcome = rejection_sample(torch.tensor([0]), draft_probs, target_probs, torch.Generator().manual_seed(seed))
        assert (outcome.accepted, outcome.next_token) == (0, 2)


def test_zero_drafts_is_plain_sampling_from_the_target():
    outcome = rejection_sample(torch.tensor([], dtype=torch.long), torch.zeros(0, 4), forced([2]),
                               torch.Generator().manual_seed(0))
    assert (outcome.accepted, outcome.next_token, outcome.bonus) == (0, 2, True)


def test_same_seed_same_outcome_different_seeds_differ():
    torch.manual_seed(0)
    draft_probs = torch.randn(5, 30).softmax(-1)
    target_probs = torch.randn(6, 30).softmax(-1)
    drafts = torch.multinomial(draft_probs, 1).squeeze(-1)
    runs = [[rejection_sample(drafts, draft_probs, target_probs, torch.Generator().manual_seed(s)) for _ in range(2)]
            for s in range(30)]
    assert all(a == b for a, b in runs)
    assert len({(r[0].accepted, r[0].next_token) for r in runs}) > 1


def test_greedy_accept_keeps_the_matching_prefix_then_the_target_token():
    assert greedy_accept([5, 6, 7], [5, 6, 9, 1]).tokens([5, 6, 7]) == [5, 6, 9]
    assert greedy_accept([5, 6], [5, 6, 8]).bonus
    assert greedy_accept([4], [5, 6]).accepted == 0
    with pytest.raises(ValueError):
        greedy_accept([1, 2], [1, 2])


def chi_square_p(observed_counts, probs):
    """Chi-square goodness of fit, pooling bins whose expected count is under 5."""
    n = observed_counts.sum()
    expected = probs * n
    keep = expected >= 5
    obs = torch.cat([observed_counts[keep], observed_counts[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue


@pytest.mark.parametrize("sampling", [Sampling(1.0), Sampling(0.6), Sampling(1.0, top_k=4), Sampling(1.2, top_p=0.8),
                                      Sampling(0.9, top_k=6, top_p=0.9)], ids=str)
def test_committed_tokens_have_the_target_distribution(sampling):
    """A context-free target (same distribution at every position) makes every committed token an
    independent draw from it; the draft is a different distribution, so rejections happen."""
    vocab, gamma, draws = 8, 3, 6000
    torch.manual_seed(42)
    target_row = logits_to_probs(torch.randn(1, vocab) * 1.5, sampling)[0]
    draft_row = logits_to_probs(torch.randn(1, vocab) * 1.5, sampling)[0]
    generator = torch.Generator().manual_seed(7)
    first, later = torch.zeros(vocab), torch.zeros(vocab)
    accepted_total = 0
    for _ in range(draws):
        drafts = torch.multinomial(draft_row.expand(gamma, vocab), 1, generator=generator).squeeze(-1)
        outcome = rejection_sample(drafts, draft_row.expand(gamma, vocab), target_row.expand(gamma + 1, vocab), generator)
        tokens = outcome.tokens(drafts.tolist())
        accepted_total += outcome.accepted
        first[tokens[0]] += 1
        for token in tokens[1:]:
            later[token] += 1
    assert 0 < accepted_total < draws * gamma  # both branches were exercised
    assert first[target_row == 0].sum() == 0 and later[target_row == 0].sum() == 0
    assert chi_square_p(first, target_row) > 1e-3
    assert chi_square_p(later, target_row) > 1e-3


def test_a_wrong_distribution_is_detected_by_the_same_check():
    """The convergence check can fail: draws from the draft instead of the target are caught."""
    torch.manual_seed(42)
    target_row = torch.randn(8).softmax(-1)
    draft_row = torch.randn(8).softmax(-1)
    counts = torch.bincount(torch.multinomial(draft_row, 6000, replacement=True), minlength=8).float()
    assert chi_square_p(counts, target_row) < 1e-3


def test_a_coupled_draw_is_an_exact_sample_and_couples_close_distributions():
    from speculation.sampling import coupled_sample

    torch.manual_seed(3)
    p = (torch.randn(12) * 1.5).softmax(-1)
    q = (p.log() + 0.3 * torch.randn(12)).softmax(-1)  # a draft close to the target
    seeds = range(6000)
    draws_p = torch.tensor([coupled_sample(p, s) for s in seeds])
    draws_q = torch.tensor([coupled_sample(q, s) for s in seeds])
    assert chi_square_p(torch.bincount(draws_p, minlength=12).float(), p) > 1e-3
    assert chi_square_p(torch.bincount(draws_q, minlength=12).float(), q) > 1e-3
    assert all(coupled_sample(p, s) == coupled_sample(p.clone(), s) for s in range(50))  # equal: always agree
    coupled_agreement = (draws_p == draws_q).float().mean().item()
    independent_agreement = float((p * q).sum())
    assert coupled_agreement > independent_agreement + 0.3, (coupled_agreement, independent_agreement)
    assert coupled_agreement >= float(torch.minimum(p, q).sum()) - 0.25  # near the best any coupling can do


def test_a_bonus_drawn_with_a_shared_seed_keeps_the_target_distribution():
    """The same check as above, the bonus drawn by coupled_sample with a fresh seed each round."""
    vocab, gamma, draws = 8, 2, 6000
    torch.manual_seed(21)
    target_row = torch.randn(vocab).softmax(-1)
    draft_row = (target_row.log() + 0.5 * torch.randn(vocab)).softmax(-1)
    generator = torch.Generator().manual_seed(4)
    bonus_counts = torch.zeros(vocab)
    bonuses = 0
    for round_index in range(draws):
        drafts = torch.multinomial(draft_row.expand(gamma, vocab), 1, generator=generator).squeeze(-1)
        outcome = rejection_sample(drafts, draft_row.expand(gamma, vocab), target_row.expand(gamma + 1, vocab),
                                   generator, bonus_seed=1_000_003 * round_index + 17)
        if outcome.bonus:
            bonus_counts[outcome.next_token] += 1
            bonuses += 1
    assert bonuses > 1000
    assert chi_square_p(bonus_counts, target_row) > 1e-3


def test_sample_draws_each_row_from_its_distribution_and_never_a_zero_probability_id():
    from speculation.sampling import sample

    torch.manual_seed(8)
    rows = torch.randn(3, 10).softmax(-1)
    rows[:, [0, 4, 9]] = 0.0  # ids at both ends and inside the support
    rows = rows / rows.sum(-1, keepdim=True)
    generator = torch.Generator().manual_seed(2)
    draws = torch.stack([sample(rows, generator) for _ in range(4000)])  # [4000, 3]
    for r in range(3):
        counts = torch.bincount(draws[:, r], minlength=10).float()
        assert counts[[0, 4, 9]].sum() == 0
        assert chi_square_p(counts, rows[r]) > 1e-3
    with pytest.raises(ValueError, match="sum to"):
        sample(torch.zeros(1, 10), generator)


def test_the_race_is_an_exact_sample_of_each_row_over_seeds_and_never_draws_a_zero_probability_id():
    """The one sampler (speculation/sampling.py: race) alone: rows of any scale (a residual is not normalised),
    zero-probability ids at both ends and inside, each row keyed by (seed, stream, index) as the draft keys its
    steps; a chi-square test per row against the row's distribution."""
    from speculation.sampling import DRAFT_STREAM, race, race_key

    torch.manual_seed(5)
    rows = torch.randn(3, 12).softmax(-1) * torch.tensor([[1.0], [0.3], [7.0]])
    rows[:, [0, 5, 11]] = 0.0
    draws = torch.stack([race(rows, [race_key(seed, DRAFT_STREAM, step) for step in range(3)])
                         for seed in range(5000)])  # [5000, 3]
    for r in range(3):
        counts = torch.bincount(draws[:, r], minlength=12).float()
        assert counts[[0, 5, 11]].sum() == 0
        assert chi_square_p(counts, rows[r] / rows[r].sum()) > 1e-3
    spiky = torch.zeros(1, 50_000)
    spiky[0, 49_999], spiky[0, 3] = 1e-30, 1.0  # a tiny mass next to a huge one still only ever loses
    assert all(int(race(spiky, [race_key(s, 0, 0)])[0]) == 3 for s in range(200))


def test_equal_distributions_drawn_with_one_seed_always_agree_even_at_different_widths():
    """The coupling the bonus relies on: the noise of id v depends on (seed, v) only, so the draft's guess over its
    rows and the target's bonus over rows padded wider (or on another device) pick the same token whenever the
    distributions agree; with different seeds or streams they agree only by chance."""
    from speculation.sampling import COUPLED_STREAM, DRAFT_STREAM, coupled_sample, race, race_key

    torch.manual_seed(6)
    p = (torch.randn(40) * 2).softmax(-1)
    padded = torch.nn.functional.pad(p, (0, 24))  # a target with 24 padding ids
    seeds = range(2000)
    guesses = [int(race(p[None], [race_key(s, COUPLED_STREAM, 0)])[0]) for s in seeds]
    assert guesses == [coupled_sample(padded, s) for s in seeds]
    other_stream = [int(race(p[None], [race_key(s, DRAFT_STREAM, 0)])[0]) for s in seeds]
    chance = float((p * p).sum())
    agreement = sum(a == b for a, b in zip(guesses, other_stream)) / len(seeds)
    assert abs(agreement - chance) < 0.05, (agreement, chance)
