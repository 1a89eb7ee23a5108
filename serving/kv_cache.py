"""A session's KV cache: small verbs over transformers' DynamicCache, plus running the model on it.

Rollback is cropping: the orchestrator names the committed length it assumes, and everything after it
(rejected draft tokens) is dropped before new tokens are appended.
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache


class KVCache:
    def __init__(self) -> None:
        self.cache = DynamicCache()

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def crop(self, length: int) -> None:
        if length < self.length:
            self.cache.crop(length - self.length)  # transformers takes a negative count to remove

    def nbytes(self) -> int:
        total = 0
        for layer in getattr(self.cache, "layers", []):
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total


class ModelRunner:
    """Runs a causal LM on a KVCache and returns only the logits the caller needs."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model = model
        self.device = device
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    @torch.inference_mode()
    def extend(self, cache: KVCache, token_ids: list[int], keep: int) -> torch.Tensor:
        """Append `token_ids` to the cache; return the logits of the last `keep` positions [keep, vocab]."""
        input_ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        kwargs = {"logits_to_keep": keep} if self._keeps_logits else {}
        out = self.model(input_ids=input_ids, past_key_values=cache.cache, use_cache=True, **kwargs)
        return out.logits[0, -keep:].float()
