"""A lean forward pass for Llama-shaped models (Llama, Mistral, Qwen2, Qwen3): the default runtime of both services for them.

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

Knows nothing about sessions or gRPC. What it computes exactly, and so serves (`unsupported(config)` says why
not, and make_runtime falls back to the HF runner):

- Llama 2 / 3.x, Mistral, Qwen2 / 2.5 and Qwen3: one decoder shape (pre-norm RMSNorm, rotary attention with
  optional q/k/v and o biases, GQA, SiLU-gated MLP), differing only in what the weights and config hold. Biases
  and Qwen3's per-head q/k RMSNorm are read from the modules present, head_dim from q_proj's shape (Mistral
  Nemo's and Qwen3's differ from hidden / heads), tied embeddings need nothing (lm_head is the same tensor).
- RoPE of any type whose frequencies are fixed when the model is built (default, linear, llama3, yarn): the
  cos/sin tables are the model's own `rotary_emb.inv_freq` and `attention_scaling`, which is all HF's forward
  uses for them. Refused: `dynamic` (HF recomputes inv_freq from each forward's longest position) and `longrope`
  (HF swaps short for long factors once a forward passes original_max_position_embeddings), whose tables change
  at run time; any type not listed, and partial rotary, which these layers' HF forward does not rotate.
- Sliding-window attention, exactly as HF's mask has it (a query at position p sees keys p - window < j <= p):
  Mistral's window on every layer, Qwen2/3's on the layers `layer_types` marks sliding. Keys fall out of the
  window by slicing each session's buffer, not by copying; the buffers still hold every key, so a windowed
  session costs what an unwindowed one does (rollback stays a crop).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from serving.runtimes.base import Capabilities, Runtime, to_device


ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
# RoPE types whose inv_freq and attention_scaling are computed once, from the config, when the model is built.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
# Layer kinds its attention computes (transformers' `layer_types`).
LAYER_TYPES = ("full_attention", "sliding_attention")


def rope_parameters(config) -> dict:
    """The RoPE settings however this transformers spells them: `rope_parameters` (5.x, with rope_theta inside),
    `rope_scaling` (4.x; None for default RoPE), and `type` for what newer ones call `rope_type`."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope = dict(rope)
    rope.setdefault("rope_type", rope.get("type", "default"))
    return rope


def attention_windows(config) -> list[int | None]:
    """Each decoder layer's sliding window as HF's masks apply it (None: full attention). Mistral windows every
    layer (config.sliding_window); Qwen2/3 the layers `layer_types` marks sliding, or on transformers without
    layer_types, those from max_window_layers on when use_sliding_window is set. A window that cannot bind
    within max_position_embeddings is None: it changes nothing and costs nothing."""
    layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if config.model_type == "mistral":
        windows = [window] * layers
    elif config.model_type in ("qwen2", "qwen3"):
        kinds = getattr(config, "layer_types", None)
        if kinds is None:
            on = getattr(config, "use_sliding_window", False) and window is not None
            first = getattr(config, "max_window_layers", layers)
            kinds = ["sliding_attention" if on and i >= first else "full_attention" for i in range(layers)]
        windows = [window if kind == "sliding_attention" else None for kind in kinds]
    else:
        windows = [None] * layers
    return [w if w is not None and w < config.max_position_embeddings else None for w in windows]


def unsupported(config) -> str:
    """Why this runtime cannot serve a model of this config exactly; "" when it can (the module docstring says
    what it computes and why the rest is refused)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        return f"model_type {model_type!r} is not one it computes ({', '.join(ARCHITECTURES)})"
    if getattr(config, "hidden_act", "") != "silu":
        return f"hidden_act {config.hidden_act!r} is not silu"
    if getattr(config, "mlp_bias", False):
        return "MLP biases are not computed"
    rope = rope_parameters(config)
    if any(isinstance(value, dict) for value in rope.values()):
        return "RoPE parameters set per layer type are not computed"
    kind = rope["rope_type"]
    if "dynamic" in kind:
        return (f"rope_type {kind!r} recomputes its frequencies from the sequence length at run time; "
                f"its tables are not fixed")
    if kind == "longrope":
        return ("rope_type 'longrope' switches from short to long factors at run time, once a forward passes "
                "original_max_position_embeddings; its tables are not fixed")
    if kind not in STATIC_ROPE:
        return f"rope_type {kind!r} is not one it computes ({', '.join(STATIC_ROPE)})"
    partial = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    if partial not in (None, 1, 1.0):
        return f"partial_rotary_factor {partial} (rotary on part of each head) is not computed"
    kinds = getattr(config, "layer_types", None) or []
    if any(k not in LAYER_TYPES for k in kinds):
        return f"layer_types {sorted(set(kinds) - set(LAYER_TYPES))} are not computed"
    if len({w for w in attention_windows(config) if w is not None}) > 1:
        return "sliding windows of different sizes are not computed"
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
    q_norm: torch.Tensor | None = None  # Qwen3's per-head RMSNorm of queries and keys, before the rotation
    k_norm: torch.Tensor | None = None
    windowed: bool = False  # attends within the model's sliding window


def rotary_tables(rotary: torch.nn.Module, positions: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [positions, head_dim] from a model's own rotary embedding (its inv_freq and attention_scaling:
    every static RoPE type is in these two, unsupported() refuses the rest), tabulated as HF's rotary forward
    computes them: float32, cast to the weights' dtype."""
    at = torch.arange(positions, dtype=torch.float32, device=device)
    freqs = at[:, None] * rotary.inv_freq.float().to(device)[None, :]  # [positions, head_dim / 2]
    table = torch.cat([freqs, freqs], dim=-1)
    scale = getattr(rotary, "attention_scaling", 1.0)
    return (table.cos() * scale).to(dtype), (table.sin() * scale).to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, as HF's apply_rotary_pos_emb."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


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
        inner = model.model
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = inner.layers[0].self_attn.q_proj.weight.shape[0] // self.heads
        self.eps = config.rms_norm_eps
        weight = inner.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.embed = weight.detach()
        self.final_norm = inner.norm.weight.detach()
        self.lm_head_t = model.lm_head.weight.detach().t().contiguous()  # [hidden, vocab]
        windows = attention_windows(config)
        self.window = next((w for w in windows if w is not None), None)
        self.layers = []
        self.layer_indices: list[int] = list(range(len(inner.layers)))  # which of the model's layers run, in order
        for layer, window in zip(inner.layers, windows):
            attn, mlp = layer.self_attn, layer.mlp
            biases = [p.bias for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
            q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
            self.layers.append(_Layer(
                norm1=layer.input_layernorm.weight.detach(),
                qkv_t=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach().t().contiguous(),
                qkv_bias=torch.cat(biases).detach() if biases[0] is not None else None,
                o_t=attn.o_proj.weight.detach().t().contiguous(),
                o_bias=attn.o_proj.bias.detach() if attn.o_proj.bias is not None else None,
                norm2=layer.post_attention_layernorm.weight.detach(),
                gate_up_t=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach().t().contiguous(),
                down_t=mlp.down_proj.weight.detach().t().contiguous(),
                q_norm=q_norm.weight.detach() if q_norm is not None else None,
                k_norm=k_norm.weight.detach() if k_norm is not None else None,
                windowed=window is not None,
            ))
        # The model's own frequencies and scale (every static RoPE type is in these two: unsupported() refuses
        # the rest), tabulated as HF's rotary forward computes them: float32, cast to the weights' dtype.
        self.cos, self.sin = rotary_tables(inner.rotary_emb, config.max_position_embeddings, self.device, self.dtype)

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

    def extend_batch(self, caches: list[LeanCache], token_lists: list[list[int]], keeps: list[int]) -> list[torch.Tensor]:
        """One forward for several sessions of different lengths (ragged: no padding, no cache copies).

        The projections and MLP run once over all sessions' new tokens stacked together, which is where
        batching pays (the weights are read once); attention runs per session over its own KV buffer.
        Returns each session's float32 logits for its last `keep` positions.
        """
        return self._forward(caches, [len(tokens) for tokens in token_lists], keeps,
                             host_ids=[t for tokens in token_lists for t in tokens])

    def decode_step(self, caches: list[LeanCache], tokens: torch.Tensor) -> torch.Tensor:
        """One token per session fed from the device as it is (no read to the host)."""
        n = len(caches)
        return torch.cat(self._forward(caches, [1] * n, [1] * n, device_ids=tokens))

    @torch.inference_mode()
    def _forward(self, caches: list[LeanCache], counts: list[int], keeps: list[int], host_ids: list[int] | None = None,
                 device_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        spans = []  # (row offset, token count, cache start) per session
        offset = 0
        for cache, count in zip(caches, counts):
            cache.reserve(cache.length + count)
            spans.append((offset, count, cache.length))
            offset += count
        # Index tensors built from Python lists: one op for all sessions, not one per session (the draft's steps
        # are per-session op overhead more than arithmetic); ids, positions and the rows to keep go to the device
        # in ONE copy, non-blocking from pinned memory on a GPU (three blocking copies were three host syncs).
        positions = [p for _, n, start in spans for p in range(start, start + n)]
        rows = [r for (row, n, _), keep in zip(spans, keeps) for r in range(row + n - keep, row + n)]
        index = to_device(torch.tensor((host_ids or []) + positions + rows), self.device)
        ids, positions, rows = index.split([len(host_ids or []), len(positions), len(rows)])
        x = self.embed[device_ids if device_ids is not None else ids]  # [total, hidden]
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # [total, 1, head_dim]
        # Per session, the first cached key its new tokens may see and the mask over keys from there on. Full
        # attention: causal within the new tokens, everything cached before them visible. Windowed: HF's
        # p - window < j <= p, the keys before the window sliced off. Built once per pass, not per layer.
        full, windowed = [], []
        for _, n, start in spans:
            full.append((0, None if n == 1 else (torch.arange(start + n, device=self.device)[None, :]
                                                 <= torch.arange(start, start + n, device=self.device)[:, None])))
            if self.window is not None:
                first = max(0, start + 1 - self.window)
                if n == 1:
                    windowed.append((first, None))
                else:
                    keys = torch.arange(first, start + n, device=self.device)[None, :]
                    queries = torch.arange(start, start + n, device=self.device)[:, None]
                    windowed.append((first, (keys <= queries) & (keys > queries - self.window)))
        for i, layer in enumerate(self.layers):
            h = F.rms_norm(x, (x.shape[-1],), layer.norm1, self.eps)
            qkv = h @ layer.qkv_t  # [total, (heads + 2 kv_heads) * head_dim]
            if layer.qkv_bias is not None:
                qkv = qkv + layer.qkv_bias
            q = qkv[:, :q_size].view(-1, heads, head_dim)  # [total, heads, head_dim]
            k = qkv[:, q_size:q_size + kv_size].view(-1, kv_heads, head_dim)
            if layer.q_norm is not None:
                q = F.rms_norm(q, (head_dim,), layer.q_norm, self.eps)
                k = F.rms_norm(k, (head_dim,), layer.k_norm, self.eps)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            v = qkv[:, q_size + kv_size:].view(-1, kv_heads, head_dim)
            # Head-major views once per layer, so that each session takes plain slices of them.
            q_heads, k_heads, v_heads = q.transpose(0, 1)[None], k.transpose(0, 1), v.transpose(0, 1)
            outputs = []
            for (row, n, start), cache, (first, mask) in zip(spans, caches, windowed if layer.windowed else full):
                end = start + n
                keys, values = cache.keys[i], cache.values[i]
                keys[:, start:end] = k_heads[:, row:row + n]
                values[:, start:end] = v_heads[:, row:row + n]
                # 4-D (a batch of one): with 3-D inputs the CPU dispatcher falls back to the unfused math
                # kernel, 2-3x slower here (80 vs 43 us per draft layer, 359 vs 130 us per verify layer).
                outputs.append(F.scaled_dot_product_attention(
                    q_heads[:, :, row:row + n], keys[None, :, first:end], values[None, :, first:end],
                    attn_mask=mask, enable_gqa=kv_heads != heads)[0])  # [heads, n, head_dim]
            attended = (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1))  # [heads, total, head_dim]
            attended = attended.transpose(0, 1).reshape(-1, q_size) @ layer.o_t
            x = x + (attended if layer.o_bias is None else attended + layer.o_bias)
            h = F.rms_norm(x, (x.shape[-1],), layer.norm2, self.eps)
            gate, up = (h @ layer.gate_up_t).chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ layer.down_t
        for (_, n, start), cache in zip(spans, caches):
            cache.length = start + n
        logits = (F.rms_norm(x[rows], (x.shape[-1],), self.final_norm, self.eps) @ self.lm_head_t).float()
        return list(logits.split(list(keeps)))
