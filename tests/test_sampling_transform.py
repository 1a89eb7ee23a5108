"""logits_to_probs is the one transform every side uses; HF's own warpers are the reference."""

import pytest
import torch
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from speculation.sampling import Sampling, logits_to_probs


def hf_reference(logits, temperature, top_k, top_p):
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1)


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.9), (0.8, 12, 0.7), (1.0, 1, 1.0), (2.0, 0, 0.3),
])
def test_matches_transformers_warpers(temperature, top_k, top_p):
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    ours = logits_to_probs(logits, Sampling(temperature, top_k, top_p))
    torch.testing.assert_close(ours, hf_reference(logits, temperature, top_k, top_p), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.sum(-1), torch.ones(6))


def test_temperature_zero_is_one_hot_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [5.0, 4.9, 0.0]])
    probs = logits_to_probs(logits, Sampling(0.0))
    assert probs.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


def test_top_k_bounds_support():
    torch.manual_seed(1)
    probs = logits_to_probs(torch.randn(4, 100), Sampling(1.0, top_k=7))
    assert ((probs > 0).sum(-1) == 7).all()


def test_top_p_keeps_most_likely_token_even_when_it_exceeds_p():
    probs = logits_to_probs(torch.tensor([[10.0, 0.0, 0.0]]), Sampling(1.0, top_p=0.01))
    assert probs.tolist() == [[1.0, 0.0, 0.0]]


@pytest.mark.parametrize("sampling,fragment", [
    (Sampling(-0.1), "temperature"), (Sampling(float("nan")), "temperature"), (Sampling(1.0, top_k=-1), "top_k"),
    (Sampling(1.0, top_p=0.0), "top_p"), (Sampling(1.0, top_p=1.5), "top_p"),
])
def test_invalid_settings_are_explained(sampling, fragment):
    assert any(fragment in p for p in sampling.problems())


def test_valid_settings_have_no_problems():
    assert Sampling(0.0).problems() == [] and Sampling(1.0, 50, 0.95).problems() == []
