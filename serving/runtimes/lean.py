"""A lean forward pass for Llama-architecture models: the default runtime of both services for them.

Why: a small draft model spends almost all of its per-token time in eager-mode op overhead (HF's Llama
layer runs ~70 small ops); the draft's cost ratio c is what speculation's speedup hinges on. This
runner reads the same HF weights and runs ~15 ops per layer: fused QKV and gate/up projections with
pre-transposed weights (MKL's small-M path is much faster for x @ W^T stored contiguous), one rms_norm
op per norm, rotary tables precomputed, and its own preallocated KV buffers. For the target, the same
pre-transposed products make scoring gamma + 1 positions cheaper, and sessions batch ragged
(`extend_batch`).

Its logits match HF's to float rounding, not bit for bit; so do HF's own when it scores several
positions in one pass instead of `generate`'s one-token steps (serving/runtimes/__init__.py: make_runtime gives
the measured differences). Greedy exactness against `generate` is tested on this runtime
(tests/test_greedy_exactness.py); rejection sampling is exact for any proposal distribution as long as
draft_probs are the ones the draft sampled from, which they are.

`skipping(layers)` gives a runner of the same weights with some decoder layers left out (the layer-skip
drafter, draft_service/drafters/layer_skip.py): its caches hold the kept layers' keys and values only.

Knows nothing about sessions or gRPC. Supports model_type "llama" with default RoPE and SiLU MLP;
`supports(config)` says when to fall back to the HF runner.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from serving.runtimes.base import Capabilities, Runtime


def unsupported(config) -> str:
    """Why this runtime cannot serve a model of this config exactly; "" when it can."""
    rope = getattr(config, "rope_parameters", None) or {}
    if getattr(config, "model_type", "") != "llama":
        return f"model_type {getattr(config, 'model_type', None)!r} is not one it computes"
    if getattr(config, "hidden_act", "") != "silu":
        return f"hidden_act {config.hidden_act!r} is not silu"
    if rope.get("rope_type", "default") != "default":
        return f"rope_type {rope.get('rope_type')!r} is not one it computes"
    if getattr(config, "mlp_bias", False):
        return "MLP biases are not computed"
    return ""


def supports(config) -> bool:
    return not unsupported(config)


@dataclass
class _Layer:
    norm1: torch.Tensor
    qkv_t: torch.Tensor  # [hidden, (heads + 2 * kv_heads) * head_dim]
    qkv_bias: torch.Tensor | None
    o_t: torch.Tensor  # [heads * head_dim, hidden]
    o_bias: torch.Tensor | None  # Llama's attention_bias puts a bias on o_proj too
    norm2: torch.Tensor
    gate_up_t: torch.Tensor  # [hidden, 2 * intermediate]
    down_t: torch.Tensor  # [intermediate, hidden]


class LeanCache:
    """Per-session KV buffers [layers][kv_heads, capacity, head_dim], grown by doubling."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype, device):
        self.shape = (layers, kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0

    def reserve(self, needed: int) -> None:
        capacity = self.keys[0].shape[1] if self.keys else 0
        if needed <= capacity:
            return
        layers, kv_heads, head_dim = self.shape
        new_capacity = max(needed, 2 * capacity, 64)
        for store in (self.keys, self.values):
            for i in range(layers):
                buffer = torch.empty(kv_heads, new_capacity, head_dim, dtype=self.dtype, device=self.device)
                if store and self.length:
                    buffer[:, : self.length] = store[i][:, : self.length]
                if len(store) == layers:
                    store[i] = buffer
                else:
                    store.append(buffer)

    def crop(self, length: int) -> None:
        self.length = min(self.length, length)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class LeanLlama(Runtime):
    name = "lean"
    # Ragged batches across sessions; no state between calls but the caches given, so two threads may run at once.
    capabilities = Capabilities(batches_sessions=True, concurrent_passes=True)

    def __init__(self, model: torch.nn.Module):
        config = model.config
        self.config = config
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        inner = model.model
        weight = inner.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.embed = weight.detach()
        self.final_norm = inner.norm.weight.detach()
        self.lm_head_t = model.lm_head.weight.detach().t().contiguous()  # [hidden, vocab]
        self.layers = []
        self.layer_indices: list[int] = list(range(len(inner.layers)))  # which of the model's layers run, in order
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            biases = [p.bias for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
            self.layers.append(_Layer(
                norm1=layer.input_layernorm.weight.detach(),
                qkv_t=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach().t().contiguous(),
                qkv_bias=torch.cat(biases).detach() if biases[0] is not None else None,
                o_t=attn.o_proj.weight.detach().t().contiguous(),
                o_bias=attn.o_proj.bias.detach() if attn.o_proj.bias is not None else None,
                norm2=layer.post_attention_layernorm.weight.detach(),
                gate_up_t=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach().t().contiguous(),
                down_t=mlp.down_proj.weight.detach().t().contiguous(),
            ))
        rotary = inner.rotary_emb
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32, device=self.device)
        freqs = positions[:, None] * rotary.inv_freq.float()[None, :]  # [max_pos, head_dim / 2]
        table = torch.cat([freqs, freqs], dim=-1)
        scale = getattr(rotary, "attention_scaling", 1.0)
        self.cos = (table.cos() * scale).to(self.dtype)  # [max_pos, head_dim]
        self.sin = (table.sin() * scale).to(self.dtype)

    def new_cache(self) -> LeanCache:
        return LeanCache(len(self.layers), self.kv_heads, self.head_dim, self.dtype, self.device)

    def skipping(self, skip: Iterable[int]) -> LeanLlama:
        """This model with the decoder layers `skip` (0-based indices into the model's layers) left out: the
        residual stream passes them by unchanged. It shares every weight with self; its caches have one K/V buffer
        per kept layer, so a session costs kept / total of what it costs the whole model. self is unchanged."""
        skip = set(skip)
        skipped = copy.copy(self)
        kept = [position for position, index in enumerate(self.layer_indices) if index not in skip]
        skipped.layers = [self.layers[position] for position in kept]
        skipped.layer_indices = [self.layer_indices[position] for position in kept]
        return skipped

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def extend(self, cache: LeanCache, token_ids: list[int], keep: int) -> torch.Tensor:
        """Append tokens; return float32 logits of the last `keep` positions [keep, vocab]."""
        return self.extend_batch([cache], [token_ids], [keep])[0]

    @torch.inference_mode()
    def extend_batch(self, caches: list[LeanCache], token_lists: list[list[int]], keeps: list[int]) -> list[torch.Tensor]:
        """One forward for several sessions of different lengths (ragged: no padding, no cache copies).

        The projections and MLP run once over all sessions' new tokens stacked together, which is where
        batching pays (the weights are read once); attention runs per session over its own KV buffer.
        Returns each session's float32 logits for its last `keep` positions.
        """
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        spans = []  # (row offset, token count, cache start) per session
        offset = 0
        for cache, tokens in zip(caches, token_lists):
            cache.reserve(cache.length + len(tokens))
            spans.append((offset, len(tokens), cache.length))
            offset += len(tokens)
        flat = [t for tokens in token_lists for t in tokens]
        x = self.embed[torch.tensor(flat, device=self.device)]  # [total, hidden]
        # Index tensors built from Python lists: one op each, not one per session (the draft's steps
        # are per-session op overhead more than arithmetic).
        positions = torch.tensor([p for _, n, start in spans for p in range(start, start + n)], device=self.device)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [total, 1, head_dim]
        masks = []
        for _, n, start in spans:  # causal within the new tokens, everything cached before them visible
            masks.append(None if n == 1 else (torch.arange(start + n, device=self.device)[None, :]
                                              <= torch.arange(start, start + n, device=self.device)[:, None]))
        for i, layer in enumerate(self.layers):
            h = F.rms_norm(x, (x.shape[-1],), layer.norm1, self.eps)
            qkv = h @ layer.qkv_t  # [total, (heads + 2 kv_heads) * head_dim]
            if layer.qkv_bias is not None:
                qkv = qkv + layer.qkv_bias
            q = self._rotate(qkv[:, :q_size].view(-1, heads, head_dim), cos, sin)  # [total, heads, head_dim]
            k = self._rotate(qkv[:, q_size:q_size + kv_size].view(-1, kv_heads, head_dim), cos, sin)
            v = qkv[:, q_size + kv_size:].view(-1, kv_heads, head_dim)
            # Head-major views once per layer, so that each session takes plain slices of them.
            q_heads, k_heads, v_heads = q.transpose(0, 1)[None], k.transpose(0, 1), v.transpose(0, 1)
            outputs = []
            for (row, n, start), cache, mask in zip(spans, caches, masks):
                end = start + n
                keys, values = cache.keys[i], cache.values[i]
                keys[:, start:end] = k_heads[:, row:row + n]
                values[:, start:end] = v_heads[:, row:row + n]
                # 4-D (a batch of one): with 3-D inputs the CPU dispatcher falls back to the unfused math
                # kernel, 2-3x slower here (80 vs 43 us per draft layer, 359 vs 130 us per verify layer).
                outputs.append(F.scaled_dot_product_attention(
                    q_heads[:, :, row:row + n], keys[None, :, :end], values[None, :, :end],
                    attn_mask=mask, enable_gqa=kv_heads != heads)[0])  # [heads, n, head_dim]
            attended = (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1))  # [heads, total, head_dim]
            attended = attended.transpose(0, 1).reshape(-1, q_size) @ layer.o_t
            x = x + (attended if layer.o_bias is None else attended + layer.o_bias)
            h = F.rms_norm(x, (x.shape[-1],), layer.norm2, self.eps)
            gate, up = (h @ layer.gate_up_t).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ layer.down_t
        for (_, n, start), cache in zip(spans, caches):
            cache.length = start + n
        rows = torch.tensor([r for (row, n, _), keep in zip(spans, keeps) for r in range(row + n - keep, row + n)],
                            device=self.device)
        logits = (F.rms_norm(x[rows], (x.shape[-1],), self.final_norm, self.eps) @ self.lm_head_t).float()
        return list(logits.split(list(keeps)))
