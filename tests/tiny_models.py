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


# -- real architectures, shrunk ---------------------------------------------------------------------------------
# Each published config's fields that change the computation (RoPE type and its parameters, biases, GQA ratio,
# tied embeddings, head_dim, sliding window, norm epsilon), at a size the CPU runs in milliseconds: hidden 64,
# 2 layers, 4 heads. Where RoPE scaling has an original_max_position_embeddings it is cut from thousands to
# 16-32, so that positions past it, where the scaled frequencies are what the model was trained for, are a few
# dozen tokens in. Weights are drawn 5x wider than HF's default (initializer_range 0.1): at 0.02 attention is
# nearly uniform, so positions (RoPE scaling, windows) barely move the logits and a runtime ignoring them passes.
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
             max_position_embeddings=128, initializer_range=0.1)
REAL_ARCHITECTURES = {
    # meta-llama/Llama-2-7b-hf: default RoPE, MHA, no biases
    "llama-2": ("llama", dict(num_key_value_heads=4, rms_norm_eps=1e-5,
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # meta-llama/Llama-3.1-8B: llama3 RoPE (factor 8, low 1, high 4, original 8192), GQA 4:1
    "llama-3.1": ("llama", dict(num_key_value_heads=1, rms_norm_eps=1e-5, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    # meta-llama/Llama-3.2-1B: llama3 RoPE (factor 32), tied embeddings
    "llama-3.2": ("llama", dict(num_key_value_heads=1, rms_norm_eps=1e-5, tie_word_embeddings=True,
                                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 24})),
    # A linearly interpolated Llama (e.g. LongChat, Vicuna-16k: factor 4) with attention biases
    "llama-linear": ("llama", dict(num_key_value_heads=2, attention_bias=True,
                                   rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    # A YaRN-extended Llama (e.g. Yarn-Llama-2: factor 4); its attention_scaling multiplies cos and sin
    "llama-yarn": ("llama", dict(num_key_value_heads=2, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32})),
    # Qwen/Qwen2.5-0.5B: q/k/v biases (no o bias), tied embeddings, theta 1e6, GQA, sliding window off
    "qwen2.5": ("qwen2", dict(num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True,
                              use_sliding_window=False, sliding_window=32768, max_window_layers=21,
                              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # Qwen2 with the sliding window on from layer 1 (max_window_layers 1), an 8-token window that binds
    "qwen2-window": ("qwen2", dict(num_key_value_heads=2, rms_norm_eps=1e-6, use_sliding_window=True,
                                   sliding_window=8, max_window_layers=1,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # mistralai/Mistral-7B-v0.1: GQA 4:1, a sliding window on every layer (4096 of 32768; here 8 of 128)
    "mistral-7b-v0.1": ("mistral", dict(num_key_value_heads=1, rms_norm_eps=1e-5, sliding_window=8,
                                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # mistralai/Mistral-7B-v0.3: no sliding window, theta 1e6
    "mistral-7b-v0.3": ("mistral", dict(num_key_value_heads=1, rms_norm_eps=1e-5, sliding_window=None,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    # Qwen/Qwen3-0.6B: per-head q/k RMSNorm, head_dim 128 != hidden / heads (here 32 != 16), tied
    "qwen3": ("qwen3", dict(num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6, tie_word_embeddings=True,
                            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
}


def real_config(name: str, vocab_size: int = 300, **overrides):
    """The shrunk config of REAL_ARCHITECTURES[name], as its own config class builds it."""
    from transformers import AutoConfig

    model_type, fields = REAL_ARCHITECTURES[name]
    return AutoConfig.for_model(model_type, **{**SMALL, "vocab_size": vocab_size, **fields, **overrides})


def real_model(config, seed: int = 0, spread: float = 0.5):
    """Random weights for `config`, with every bias and norm weight drawn too: HF starts biases at 0 and norm
    weights at 1, which would hide a runtime that leaves one out."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0, spread)
            elif parameter.dim() == 1:  # RMSNorm weights
                parameter.uniform_(0.5, 1.5)
    return model


def save_real_model(out: Path, tokenizer, name: str, seed: int, sharpen: float = 1.0, **overrides) -> Path:
    """A checkpoint of REAL_ARCHITECTURES[name] on the tokenizer, with generation settings as build_llama's."""
    config = real_config(name, len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                         max_position_embeddings=CONTEXT, **overrides)
    model = real_model(config, seed)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(sharpen)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                     bos_token_id=tokenizer.eos_token_id).save_pretrained(out)
    return out


def save_noisy_copy(source: Path, out: Path, tokenizer, scale: float = 0.35, seed: int = 3) -> Path:
    """A draft that mostly agrees with its target: the target's weights plus Gaussian noise of `scale` times each
    tensor's spread (the tests need drafts that both accept and reject)."""
    from transformers import AutoModelForCausalLM

    noisy = AutoModelForCausalLM.from_pretrained(source)
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in noisy.parameters():
            parameter.add_(scale * parameter.std() * torch.randn_like(parameter))
    noisy.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
