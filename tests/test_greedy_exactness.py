"""Greedy speculative output is token-identical to the target's own `generate`, over real gRPC."""

from __future__ import annotations

import functools

import pytest
import torch

from tests.conftest import PROMPTS

MAX_NEW = 24


@functools.cache
def _reference(model_id: int, prompt: str, max_new: int, stop: tuple[str, ...] = ()):
    model, tokenizer = _REFS[model_id]
    inputs = tokenizer(prompt, return_tensors="pt")
    kwargs = {"stop_strings": list(stop), "tokenizer": tokenizer} if stop else {}
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new, **kwargs)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


_REFS: dict[int, tuple] = {}


@pytest.fixture(scope="module")
def reference(target_model, tokenizer):
    _REFS[id(target_model)] = (target_model, tokenizer)
    return lambda prompt, max_new=MAX_NEW, stop=(): _reference(id(target_model), prompt, max_new, tuple(stop))


@pytest.mark.parametrize("gamma", [1, 3, 8])
@pytest.mark.parametrize("draft_kind", ["different", "self", "disagreeing", "noisy"])
def test_greedy_output_equals_target_generate(stacks, reference, draft_kind, gamma):
    stack = stacks(draft_kind)
    drafted = accepted = 0
    with stack.client() as client:
        for prompt in PROMPTS:
            result = client.generate(prompt, max_new_tokens=MAX_NEW, num_draft_tokens=gamma)
            assert result.token_ids == reference(prompt), f"prompt {prompt!r}, draft {draft_kind}, gamma {gamma}"
            drafted += result.stats["drafted_tokens"]
            accepted += result.stats["accepted_tokens"]
    assert drafted > 0
    if draft_kind == "self":  # every token accepted: each round ends on the bonus path
        assert accepted == drafted
    if draft_kind == "disagreeing":  # every round ends on a recovered token
        assert accepted == 0
    if draft_kind == "noisy":  # a partial-agreement draft exercises both branches
        assert 0 < accepted < drafted


def test_generation_that_ends_on_eos_matches_and_includes_the_eos_token(tiny, tokenizer, reference, tmp_path):
    """A copy of the target whose EOS is a token it often emits, so generations stop on it."""
    import shutil
    from collections import Counter

    from transformers import AutoModelForCausalLM, GenerationConfig

    from tests.conftest import start_stack

    counts = Counter(t for p in PROMPTS for t in set(reference(p)))  # prompts whose output has t
    eos = counts.most_common(1)[0][0]
    eos_target = tmp_path / "eos_target"
    shutil.copytree(tiny.target, eos_target)
    GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.eos_token_id).save_pretrained(eos_target)
    model = AutoModelForCausalLM.from_pretrained(eos_target)
    stack = start_stack(eos_target, tiny.noisy_draft)
    try:
        ended_on_eos = 0
        with stack.client() as client:
            for prompt in PROMPTS:
                inputs = tokenizer(prompt, return_tensors="pt")
                expected = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)[0, inputs["input_ids"].shape[1]:].tolist()
                result = client.generate(prompt, max_new_tokens=MAX_NEW, num_draft_tokens=3)
                assert result.token_ids == expected, prompt
                if result.finish_reason == "eos":
                    ended_on_eos += 1
                    assert result.token_ids[-1] == eos and eos not in result.token_ids[:-1]
        assert ended_on_eos >= 3
    finally:
        stack.stop()


def test_stop_strings_cut_where_generate_stops(stacks, reference, tokenizer):
    stopped = 0
    with stacks("noisy").client() as client:
        for prompt in PROMPTS:
            full = reference(prompt)
            text = tokenizer.decode(full, skip_special_tokens=True)
            if len(text) < 8:
                continue
            stop = text[len(text) // 2: len(text) // 2 + 2]
            if not stop.isprintable() or "\ufffd" in stop or not stop.strip():
                continue  # a random model's partial bytes; HF matches stop strings on token text
            expected = reference(prompt, MAX_NEW, (stop,))
            result = client.generate(prompt, max_new_tokens=MAX_NEW, num_draft_tokens=3, stop=[stop])
            assert result.token_ids == expected, (prompt, stop)
            assert result.finish_reason == "stop"
            full_text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
            assert result.text == full_text[: full_text.index(stop)]
            stopped += 1
    assert stopped >= 6


def test_prompt_as_token_ids_equals_prompt_as_text(stacks, tokenizer, reference):
    prompt = PROMPTS[0]
    with stacks("different").client() as client:
        result = client.generate(tokenizer(prompt)["input_ids"], max_new_tokens=MAX_NEW)
    assert result.token_ids == reference(prompt)


def test_streamed_chunks_add_up_to_the_final_text_and_stats(stacks, tokenizer):
    with stacks("noisy").client() as client:
        chunks = list(client.stream(PROMPTS[2], max_new_tokens=MAX_NEW, num_draft_tokens=3))
    tokens = [t for c in chunks for t in c.token_ids]
    assert len(chunks) > 1 and all(c.stats is None for c in chunks[:-1])
    assert "".join(c.text for c in chunks) == tokenizer.decode(tokens, skip_special_tokens=True)
    stats = chunks[-1].stats
    assert stats["new_tokens"] == len(tokens) == MAX_NEW
    assert stats["rounds"] == len(chunks)
    assert stats["mean_accepted_len"] == pytest.approx(len(tokens) / stats["rounds"])
    assert stats["acceptance_rate"] == pytest.approx(stats["accepted_tokens"] / stats["drafted_tokens"])
    assert stats["wall_ms"] > 0 and stats["tokens_per_s"] > 0
    assert stats["draft_ms"] + stats["verify_ms"] + stats["other_ms"] == pytest.approx(stats["wall_ms"], rel=1e-6)
    assert stats["bytes_per_round"] > 0


def _served_like_generate(target_dir, draft_dir, prompts, runtime: str = "hf") -> list:
    """Serve the pair, generate each prompt greedily through the orchestrator and assert it equals the
    target's own `generate` on the orchestrator's tokenization; returns (inputs, expected) per prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import start_stack

    target = AutoModelForCausalLM.from_pretrained(target_dir).eval()
    target_tokenizer = AutoTokenizer.from_pretrained(target_dir)  # what the orchestrator tokenizes with
    stack = start_stack(target_dir, draft_dir)
    served = []
    try:
        assert stack.verify.servicer.runner.name == runtime and stack.draft.servicer.runner.name == runtime
        with stack.client() as client:
            for prompt in prompts:
                inputs = target_tokenizer(prompt, return_tensors="pt")
                with torch.inference_mode():
                    expected = target.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
                result = client.generate(prompt, max_new_tokens=MAX_NEW, num_draft_tokens=3)
                assert result.token_ids == expected[0, inputs["input_ids"].shape[1]:].tolist(), prompt
                assert result.stats["drafted_tokens"] > 0
                served.append((inputs, expected))
    finally:
        stack.stop()
    return served


def test_a_gpt2_pair_is_served_exactly_too(tiny, tokenizer, tmp_path):
    """Not only Llama: GPT-2 target and draft run through the HF runtime (the lean one is Llama-only)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    for name, (width, layers, seed) in {"target": (64, 2, 1), "draft": (32, 1, 2)}.items():
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=width, n_layer=layers, n_head=4,
                                           n_positions=256, eos_token_id=tokenizer.eos_token_id,
                                           bos_token_id=tokenizer.eos_token_id))
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    _served_like_generate(tmp_path / "target", tmp_path / "draft", PROMPTS[:8])


def test_sliding_window_models_are_served_exactly(tokenizer, tmp_path):
    """Mistral (every layer windowed) as the target, a Qwen2 hybrid (full + sliding layers) as the draft,
    with a 4-token window so it fills in every generation: rollback past the window must not break either
    service's cache, and the output stays the target's `generate`. The lean runtime serves both (its windows
    are exact: serving/runtimes/lean.py)."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shared = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                  max_position_embeddings=256, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)

    def target_model(window):
        torch.manual_seed(1)
        return MistralForCausalLM(MistralConfig(hidden_size=64, num_hidden_layers=2, sliding_window=window, **shared))

    torch.manual_seed(2)
    draft = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, num_hidden_layers=2, use_sliding_window=True, sliding_window=4,
                                         max_window_layers=1, **shared))
    for name, model in {"target": target_model(4), "draft": draft}.items():
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    served = _served_like_generate(tmp_path / "target", tmp_path / "draft", PROMPTS[:8], runtime="lean")
    unwindowed = target_model(None).eval()
    with torch.inference_mode():
        window_mattered = any(
            not torch.equal(expected, unwindowed.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW))
            for inputs, expected in served)
    assert window_mattered, "the 4-token window never changed an output: this test would not see it ignored"
