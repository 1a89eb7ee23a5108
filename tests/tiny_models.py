"""Tiny Hugging Face models and a tokenizer, built on the spot (model hubs are unreachable).

Random weights are enough to prove exactness: greedy speculative output must equal the target's
`generate` whatever the models predict.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from reference_pair.corpus import source_files
from reference_pair.tokenizer_build import train_tokenizer

VOCAB = 384
CONTEXT = 256


def build_tokenizer(out: Path) -> PreTrainedTokenizerFast:
    texts = [text for _, text in source_files()[:40]]
    return train_tokenizer(texts, VOCAB, out)


def build_llama(out: Path, tokenizer, hidden: int, layers: int, seed: int, eos: int | None = None,
                zero_final_norm: bool = False, sharpen: float = 1.0) -> Path:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=4, intermediate_size=hidden * 2, max_position_embeddings=CONTEXT,
        tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
        if zero_final_norm:
            # Every hidden state becomes 0, so every logit is 0 and the argmax is always token 0.
            model.model.norm.weight.zero_()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    eos_id = tokenizer.eos_token_id if eos is None else eos
    GenerationConfig(eos_token_id=eos_id, pad_token_id=tokenizer.eos_token_id,
                     bos_token_id=tokenizer.eos_token_id).save_pretrained(out)
    return out
