"""The shipped reference pair, as a user loads it: the plain `from_pretrained(dir)` is the target alone,
and the services' greedy output equals its `generate`."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from local_stack.paths import DEFAULT_DRAFT, DEFAULT_PROMPTS, DEFAULT_TARGET, load_prompts
from tests.conftest import start_stack


def test_the_shipped_pair_loads_in_float32_by_default():
    # Stored in bf16, declared float32 (models/README.md): a plain load computes as the services do.
    for path in (DEFAULT_TARGET, DEFAULT_DRAFT):
        assert AutoModelForCausalLM.from_pretrained(path).dtype == torch.float32, path


def test_greedy_output_equals_the_default_loaded_targets_generate():
    target = AutoModelForCausalLM.from_pretrained(DEFAULT_TARGET).eval()  # no dtype: what a user gets
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_TARGET)
    prompts = load_prompts(DEFAULT_PROMPTS)[-3:]
    stack = start_stack(DEFAULT_TARGET, DEFAULT_DRAFT)
    try:
        with stack.client() as client:
            for prompt in prompts:
                inputs = tokenizer(prompt, return_tensors="pt")
                with torch.inference_mode():
                    expected = target.generate(**inputs, do_sample=False, max_new_tokens=48)
                result = client.generate(prompt, max_new_tokens=48)
                assert result.token_ids == expected[0, inputs["input_ids"].shape[1]:].tolist(), prompt[:60]
                assert result.stats["accepted_tokens"] > 0
    finally:
        stack.stop()
