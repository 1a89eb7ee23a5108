"""Draft and target with the same tokenizer but different logits counts (padded embedding matrices, as in
model families whose small and large members pad to different sizes): served, exactly.

The drafts here are the target itself with padding rows added or removed, so every real draft token is
accepted and any failure to keep the vocabularies apart shows up as a crash or a wrong token.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from orchestrator.acceptance import over_target_ids
from speculation.rejection import rejection_sample
from tests.conftest import PROMPTS, start_stack
from tests.test_rejection_sampler import chi_square_p

MAX_NEW = 24


def _resized(source, out, rows: int, tokenizer, strong_padding: float = 0.0, seed: int = 0):
    """`source` with its lm_head / embeddings cut or padded to `rows`; new rows random (times
    `strong_padding` for the lm_head, so the padding ids win the argmax often) or zero."""
    model = AutoModelForCausalLM.from_pretrained(source)
    old = model.config.vocab_size
    model.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        if rows > old:
            generator = torch.Generator().manual_seed(seed)
            head = model.get_output_embeddings().weight
            head[old:] = strong_padding * torch.randn(rows - old, head.shape[1], generator=generator)
            model.get_input_embeddings().weight[old:] = 0.0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _reference(target_dir):
    """The target alone, loaded once: prompt -> its greedy `generate` continuation."""
    target = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(target_dir)

    def expected(prompt):
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
        return out[0, inputs["input_ids"].shape[1]:].tolist()
    return expected


def _serve_and_compare(target_dir, draft_dir, prompts):
    expected = _reference(target_dir)
    stack = start_stack(target_dir, draft_dir)
    results = []
    try:
        with stack.client() as client:
            for prompt in prompts:
                result = client.generate(prompt, max_new_tokens=MAX_NEW, num_draft_tokens=3)
                assert result.token_ids == expected(prompt), prompt
                results.append(result)
            sampled = [client.generate(prompt, max_new_tokens=MAX_NEW, num_draft_tokens=3, temperature=1.0, seed=7)
                       for prompt in prompts[:4]]
    finally:
        stack.stop()
    return results, sampled


def test_a_draft_with_more_padding_rows_than_the_target_proposes_only_the_targets_ids(tiny, tokenizer, tmp_path):
    vocab = len(tokenizer)
    draft_dir = _resized(tiny.target, tmp_path / "draft", vocab + 40, tokenizer, strong_padding=40.0, seed=1)
    # Without the limit this draft would propose padding ids, which the target cannot even embed:
    draft = AutoModelForCausalLM.from_pretrained(draft_dir).eval()
    with torch.inference_mode():
        argmax = [int(draft(**tokenizer(p, return_tensors="pt")).logits[0, -1].argmax()) for p in PROMPTS[:8]]
    assert any(token >= vocab for token in argmax), argmax
    results, sampled = _serve_and_compare(tiny.target, draft_dir, PROMPTS[:8])
    drafted = sum(r.stats["drafted_tokens"] for r in results)
    assert drafted > 0 and sum(r.stats["accepted_tokens"] for r in results) == drafted  # the target, limited
    for result in sampled:
        assert result.stats["drafted_tokens"] > 0 and result.stats["accepted_tokens"] > 0
        assert all(token < vocab for token in result.token_ids)


def test_a_target_with_more_padding_rows_than_the_draft_is_served_exactly(tiny, tokenizer, tmp_path):
    vocab = len(tokenizer)
    target_dir = _resized(tiny.target, tmp_path / "target", vocab + 24, tokenizer)
    results, sampled = _serve_and_compare(target_dir, tiny.target, PROMPTS[:8])
    drafted = sum(r.stats["drafted_tokens"] for r in results)
    assert drafted > 0 and sum(r.stats["accepted_tokens"] for r in results) == drafted
    assert all(r.stats["accepted_tokens"] > 0 for r in sampled)


def test_a_target_token_past_the_drafts_vocabulary_ends_speculation_for_that_generation(tiny, tokenizer, tmp_path):
    """The target emits a padding id the draft has no embedding for: the rest runs target-only, exactly."""
    vocab = len(tokenizer)
    prompt = PROMPTS[0]
    first = _reference(tiny.target)(prompt)[3]
    target_dir = _resized(tiny.target, tmp_path / "target", vocab + 8, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(target_dir)
    with torch.no_grad():  # padding id vocab + 3 outscores `first` wherever `first` would win
        head = model.get_output_embeddings().weight
        head[vocab + 3] = 1.5 * head[first]
        model.get_input_embeddings().weight[vocab + 3] = model.get_input_embeddings().weight[first]
    model.save_pretrained(target_dir)
    expected = _reference(target_dir)(prompt)
    assert vocab + 3 in expected, expected
    stack = start_stack(target_dir, tiny.target)
    try:
        with stack.client() as client:
            result = client.generate(prompt, max_new_tokens=MAX_NEW, num_draft_tokens=3)
    finally:
        stack.stop()
    assert result.token_ids == expected
    assert result.stats["drafted_tokens"] > 0 and result.stats["target_only_rounds"] > 0


@pytest.mark.parametrize("draft_vocab, target_vocab", [(5, 8), (8, 6)])
def test_rows_over_the_targets_ids_keep_the_target_distribution(draft_vocab, target_vocab):
    """Rejection sampling on draft rows widened or cut to the target's ids (a larger draft samples under
    the limit, so its mass past the target's ids is zero) commits tokens distributed as the target."""
    gamma, draws = 3, 6000
    torch.manual_seed(5)
    target_row = torch.randn(target_vocab).softmax(-1)
    draft_logits = torch.randn(draft_vocab) * 1.5
    draft_logits[target_vocab:] = float("-inf")  # the vocab_limit a larger draft proposes under
    draft_row = over_target_ids(draft_logits.softmax(-1)[None], target_vocab)[0]
    assert draft_row.shape == (target_vocab,) and draft_row.sum() == pytest.approx(1.0)
    generator = torch.Generator().manual_seed(11)
    first = torch.zeros(target_vocab)
    accepted = 0
    for _ in range(draws):
        drafts = torch.multinomial(draft_row.expand(gamma, -1), 1, generator=generator).squeeze(-1)
        outcome = rejection_sample(drafts, draft_row.expand(gamma, -1), target_row.expand(gamma + 1, -1), generator)
        accepted += outcome.accepted
        first[outcome.tokens(drafts.tolist())[0]] += 1
    assert 0 < accepted < draws * gamma
    assert chi_square_p(first, target_row) > 1e-3
