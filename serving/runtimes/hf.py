"""A session's KV cache: small verbs over transformers' DynamicCache, plus running the model on it.

Rollback is cropping: the orchestrator names the committed length it assumes, and everything after it
(rejected draft tokens) is dropped before new tokens are appended.
"""

from __future__ import annotations

import inspect

import torch

from serving.runtimes.base import Capabilities, Runtime, to_device
from serving.runtimes.growable_cache import new_cache


class KVCache:
    def __init__(self, config) -> None:
        self.cache = new_cache(config)

    @property
    def length(self) -> int:
        return self.cache.get_seq_length()

    def crop(self, length: int) -> None:
        if length < self.length:
            self.cache.crop(length - self.length)  # transformers takes a negative count to remove

    def nbytes(self) -> int:
        total = 0
        for layer in getattr(self.cache, "layers", []):
            if hasattr(layer, "nbytes"):
                total += layer.nbytes()
                continue
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total


class ModelRunner(Runtime):
    """Runs a causal LM through its own HF forward on a KVCache; returns only the logits needed."""

    name = "hf"
    # Sessions run one after another (below); the HF forward is not checked for two threads at once.
    capabilities = Capabilities(batches_sessions=False, concurrent_passes=False)

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model = model
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    def new_cache(self) -> KVCache:
        return KVCache(self.model.config)

    @torch.inference_mode()
    def extend(self, cache: KVCache, token_ids: list[int], keep: int) -> torch.Tensor:
        """Append `token_ids` to the cache; return the logits of the last `keep` positions [keep, vocab]."""
        input_ids = to_device(torch.tensor([token_ids], dtype=torch.long), self.device)
        kwargs = {"logits_to_keep": keep} if self._keeps_logits else {}
        out = self.model(input_ids=input_ids, past_key_values=cache.cache, use_cache=True, **kwargs)
        return out.logits[0, -keep:].float()

    def extend_batch(self, caches: list[KVCache], token_lists: list[list[int]], keeps: list[int]) -> list[torch.Tensor]:
        """One session after another: the HF forward cannot share a pass between caches of different
        lengths without copying them into a padded batch (costlier here than the weights themselves);
        the lean runtime batches them ragged."""
        return [self.extend(c, t, k) for c, t, k in zip(caches, token_lists, keeps)]

    def check(self) -> None:
        """Raise ValueError, naming the model type, when its cache cannot drop rejected draft tokens.

        Caches of full / sliding-window attention are our growable ones; others (linear attention,
        state-space layers) keep transformers' cache, which may refuse to crop; and a model's own forward
        may not take either. A three-token forward and a crop find out at startup, not in the middle of
        someone's generation."""
        cache = self.new_cache()
        try:
            self.extend(cache, [0, 0, 0], 1)
            cache.crop(2)
        except Exception as error:  # noqa: BLE001 - whatever the cache raises, the model is unservable
            raise ValueError(f"{self.model.config.model_type!r} models cannot be served: their KV cache cannot "
                             f"roll back rejected draft tokens ({type(error).__name__}: {error})") from error
        if cache.length != 2:
            raise ValueError(f"{self.model.config.model_type!r} models cannot be served: cropping their cache to "
                             f"2 tokens left {cache.length}")
