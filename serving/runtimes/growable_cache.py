"""A KV cache layer that grows into preallocated capacity instead of re-concatenating.

transformers' DynamicLayer appends with torch.cat, which copies the whole cache on every decode step:
on a CPU at a few hundred tokens of context that copy was ~45% of a 24M-parameter model's decode time.
This layer writes new states into a buffer that doubles when full and hands attention a view of the
filled part; cropping (rollback of rejected draft tokens) only moves the length. Keys and values are
the same numbers as DynamicLayer's, so outputs are unchanged.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class GrowableLayer(DynamicLayer):
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._length = 0
        self._key_buffer = self._value_buffer = None

    def _ensure_capacity(self, needed: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        capacity = 0 if self._key_buffer is None else self._key_buffer.shape[-2]
        if needed <= capacity:
            return
        new_capacity = max(needed, 2 * capacity, 64)

        def grow(old, like):
            shape = (*like.shape[:-2], new_capacity, like.shape[-1])
            buffer = torch.empty(shape, dtype=like.dtype, device=like.device)
            if old is not None and self._length:
                buffer[..., : self._length, :] = old[..., : self._length, :]
            return buffer

        self._key_buffer = grow(self._key_buffer, key_states)
        self._value_buffer = grow(self._value_buffer, value_states)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self._length, self._length + key_states.shape[-2]
        self._ensure_capacity(end, key_states, value_states)
        self._key_buffer[..., start:end, :] = key_states
        self._value_buffer[..., start:end, :] = value_states
        self._length = end
        self.keys = self._key_buffer[..., :end, :]
        self.values = self._value_buffer[..., :end, :]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length if self.is_initialized else 0

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove")
        if not self.is_initialized or tokens_to_remove == 0:
            return
        self._length = max(0, self._length + tokens_to_remove)
        self.keys = self._key_buffer[..., : self._length, :]
        self.values = self._value_buffer[..., : self._length, :]

    def nbytes(self) -> int:
        if not self.is_initialized or self._key_buffer is None:
            return 0
        return self._key_buffer.numel() * self._key_buffer.element_size() * 2


# Layer types whose attention mask transformers builds from the config alone, so a full-length cache
# serves them exactly: a sliding-window layer masks what lies outside its window whatever the cache holds.
GROWABLE_LAYER_TYPES = {"full_attention", "sliding_attention"}


def supports_growable(config) -> bool:
    """Decoders whose every layer is full or sliding-window attention. Sliding-window layers get a
    full-length cache too: transformers' own sliding layer cannot be cropped once the window has filled,
    and rollback of rejected drafts needs cropping. It costs memory beyond the window, not exactness (the
    mask hides what the window excludes; tests/test_greedy_exactness.py checks a Mistral pair).
    Linear-attention and state-space layers keep transformers' own cache."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None)
    return layer_types is None or all(t in GROWABLE_LAYER_TYPES for t in layer_types)


def new_cache(config) -> Cache:
    if supports_growable(config):
        return Cache(layer_class_to_replicate=GrowableLayer)
    return DynamicCache(config=config)
