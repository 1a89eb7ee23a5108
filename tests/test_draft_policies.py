"""Draft-side policies that change what is proposed, never what is committed."""

from tests.conftest import PROMPTS, start_stack


def test_confidence_early_stop_drafts_fewer_tokens_and_changes_no_output(tiny, stacks):
    stack = start_stack(tiny.target, tiny.noisy_draft, draft_confidence=0.9)
    try:
        with stacks("noisy").client() as full, stack.client() as early:
            drafted_full = drafted_early = 0
            for prompt in PROMPTS[:8]:
                expected = full.generate(prompt, max_new_tokens=24, num_draft_tokens=6)
                result = early.generate(prompt, max_new_tokens=24, num_draft_tokens=6)
                assert result.token_ids == expected.token_ids
                drafted_full += expected.stats["drafted_tokens"]
                drafted_early += result.stats["drafted_tokens"]
            sampled = [early.generate(PROMPTS[0], max_new_tokens=24, num_draft_tokens=6, temperature=1.0, seed=4)
                       for _ in range(2)]
        assert drafted_early < drafted_full
        assert sampled[0].token_ids == sampled[1].token_ids
    finally:
        stack.stop()
