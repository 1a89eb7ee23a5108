"""Loading a causal LM and describing it (the standard `from_pretrained(name_or_path)` path)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    name_or_path: str
    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    vocab_size: int
    max_context: int
    eos_token_ids: list[int]
    tokenizer_fingerprint: str
    num_parameters: int


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        # bf16/fp16 matmuls are slow on CPUs without native support; fp32 is the safe CPU default.
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def tokenizer_fingerprint(name_or_path: str) -> str:
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        log.warning("no tokenizer at %s (%s); vocabulary check falls back to vocab_size", name_or_path, error)
        return ""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()


def load_model(name_or_path: str, device: str = "cpu", dtype: str = "auto") -> LoadedModel:
    torch_dtype = resolve_dtype(dtype, device)
    if name_or_path.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(name_or_path)):
        # transformers would call it a malformed hub repo id; say what is actually wrong
        raise FileNotFoundError(f"no model directory at {name_or_path}")
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype)
    model.to(device).eval()
    config = model.config
    eos: list[int] = []
    try:
        generation = GenerationConfig.from_pretrained(name_or_path)
        eos_value = generation.eos_token_id
    except OSError:
        eos_value = None
    if eos_value is None:
        eos_value = getattr(config, "eos_token_id", None)
    if eos_value is not None:
        eos = [eos_value] if isinstance(eos_value, int) else list(eos_value)
    max_context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048)
    vocab_size = model.get_output_embeddings().weight.shape[0]
    return LoadedModel(
        name_or_path=name_or_path, model=model, device=torch.device(device), dtype=torch_dtype,
        vocab_size=int(vocab_size), max_context=int(max_context), eos_token_ids=eos,
        tokenizer_fingerprint=tokenizer_fingerprint(name_or_path),
        num_parameters=sum(p.numel() for p in model.parameters()),
    )
