"""Sampled generations over real gRPC: reproducible by seed, and distributed like the target alone."""

import pytest
import torch

from speculation.sampling import Sampling, logits_to_probs
from tests.test_rejection_sampler import chi_square_p

PROMPT = "def main():\n"


def test_a_seed_reproduces_the_whole_generation(stacks):
    with stacks("noisy").client() as client:
        runs = [client.generate(PROMPT, max_new_tokens=30, temperature=1.0, seed=s, num_draft_tokens=3)
                for s in (11, 11, 12)]
    assert runs[0].token_ids == runs[1].token_ids and runs[0].text == runs[1].text
    assert runs[0].token_ids != runs[2].token_ids
    assert runs[0].stats["drafted_tokens"] > 0


@pytest.mark.parametrize("sampling", [Sampling(1.0), Sampling(0.7, top_k=8), Sampling(1.0, top_p=0.6)], ids=str)
def test_first_token_histogram_over_seeds_matches_the_target_distribution(stacks, target_model, tokenizer, sampling):
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        logits = target_model(**inputs).logits[:, -1]
    target_probs = logits_to_probs(logits, sampling)[0]
    counts = torch.zeros_like(target_probs)
    accepted_first = 0
    draws = 600
    with stacks("noisy").client() as client:
        for seed in range(draws):
            result = client.generate(PROMPT, max_new_tokens=2, num_draft_tokens=1, seed=seed,
                                     temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p)
            counts[result.token_ids[0]] += 1
            accepted_first += result.stats["accepted_tokens"]
    assert 0 < accepted_first < draws  # the first token came from both acceptance and the residual
    assert counts[target_probs == 0].sum() == 0
    assert chi_square_p(counts, target_probs) > 1e-3


def test_seeds_that_differ_only_above_bit_31_give_different_generations(stacks):
    """torch's CPU generator keeps 32 bits of a seed; the API's seed is 64-bit, so the high half counts."""
    with stacks("noisy").client() as client:
        runs = [client.generate(PROMPT, max_new_tokens=30, temperature=1.0, seed=s, num_draft_tokens=3)
                for s in (11, 11 + (1 << 32), 11 + (1 << 32))]
    assert runs[0].token_ids != runs[1].token_ids
    assert runs[1].token_ids == runs[2].token_ids
