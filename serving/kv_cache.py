"""A session's KV cache: small verbs over transformers' DynamicCache, plus running the model on it.

Rollback is cropping: the orchestrator names the committed length it assumes, and everything after it
(rejected draft tokens) is dropped before new tokens are appended.
"""

from __future__ import annotations

import inspect

import torch

from serving.growable_cache import new_cache


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


class ModelRunner:
    """Runs a causal LM through its own HF forward on a KVCache; returns only the logits needed."""

    name = "hf"

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model = model
        self.device = device
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters

    def new_cache(self) -> KVCache:
        return KVCache(self.model.config)

    @torch.inference_mode()
    def extend(self, cache: KVCache, token_ids: list[int], keep: int) -> torch.Tensor:
        """Append `token_ids` to the cache; return the logits of the last `keep` positions [keep, vocab]."""
        input_ids = torch.tensor([token_ids], dtype=torch.long, device=self.device)
        kwargs = {"logits_to_keep": keep} if self._keeps_logits else {}
        out = self.model(input_ids=input_ids, past_key_values=cache.cache, use_cache=True, **kwargs)
        return out.logits[0, -keep:].float()

    def extend_batch(self, caches: list[KVCache], token_lists: list[list[int]], keeps: list[int]) -> list[torch.Tensor]:
        """One session after another: the HF forward cannot share a pass between caches of different
        lengths without copying them into a padded batch (costlier here than the weights themselves);
        the lean runtime batches them ragged."""
        return [self.extend(c, t, k) for c, t, k in zip(caches, token_lists, keeps)]

    def check_rollback(self) -> None:
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


RUNTIMES = ("auto", "hf", "lean")


def make_runner(model: torch.nn.Module, device: torch.device, runtime: str = "auto"):
    """`hf`: the model's own forward, for any causal LM. `lean`: serving/lean_llama.py for Llama models.
    `auto` (the default, for drafts and targets): lean where supported, else hf.

    Neither is bit-identical to `generate`'s one-token steps when it scores several positions at once:
    a [5, hidden] matrix product sums in another order than five [1, hidden] ones. Measured on the
    reference target, both differ from the one-token logits by ~1e-5 (HF 1.1e-5, lean 1.3e-5), far
    below the gaps between greedy candidates; the greedy-exactness tests run on whichever is default."""
    from serving import lean_llama

    if runtime not in RUNTIMES:
        raise ValueError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "lean" and not lean_llama.supports(model.config):
        raise ValueError(f"--runtime lean supports Llama models with default RoPE; "
                         f"{model.config.model_type!r} needs --runtime hf")
    if runtime == "lean" or (runtime == "auto" and lean_llama.supports(model.config)):
        runner = lean_llama.LeanLlama(model)
        runner.name = "lean"
        return runner
    runner = ModelRunner(model, device)
    runner.check_rollback()
    return runner
