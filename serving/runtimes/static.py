"""The static runtime: the GPU fast path for the architectures the lean runtime serves (`lean.unsupported`).

What makes it static: every session's keys and values live in one KV pool allocated once at startup,
[layers, K/V, slots + 1, slot_tokens, kv_heads, head_dim]; a session gets a slot (a fixed capacity of
`slot_tokens` tokens), rollback moves its length, and the slot goes back to the pool when its cache object
dies (the session store just drops caches: eviction, expiry, release). Nothing is allocated per session, so
the shapes a pass runs at depend on (sessions, length bucket) only, and a decode step can be replayed as a
CUDA graph.

One forward serves both lanes:
- new keys and values are written into the pool with index ops (index_copy_ at slot * slot_tokens + position);
- attention runs once per layer over all the sessions of a pass: each session's keys and values up to a
  length bucket L (a multiple of `length_step` up to 4 steps, then a power of two; never past slot_tokens)
  are gathered into [n, kv_heads, L, head_dim] and one scaled_dot_product_attention runs with a per-session
  boolean mask (everything cached before visible, causal within the new tokens, padding masked, the model's
  sliding window where it has one). The query heads sharing a key head are folded into the query length
  ([n, kv_heads, group * T, head_dim]), so grouped-query attention needs no copies of the keys.
- `decode_step` (the draft's inner loop) on CUDA replays a graph captured lazily per (batch bucket in
  BATCH_BUCKETS, length bucket), whose inputs (tokens, slots, positions) are copied into static buffers: the
  tokens device to device, the slots and positions in one pinned, non-blocking host copy (no host sync).
  Padding rows point at slot 0, a scratch slot no session gets. A shape whose capture fails runs eagerly
  (the same code), with one logged warning.
- `extend_batch` (prefill, and the verify of gamma + 1 tokens): a pass of at most GRAPH_TOKENS tokens a session
  replays a graph too (every session padded to the pass's longest); longer ones run eagerly, their token ids,
  positions and indices sent to the device in one copy.
- Captures are one at a time in the process (two runtimes in one process: torch.cuda.graph synchronizes the device
  on entry, an error while another thread captures), and the graphs' outputs together stay within
  GRAPH_OUTPUT_BYTES (kept out of the KV pool), past which a new shape runs eagerly.
- Fusing q/k/v and gate/up in place makes the model's parameters views of one tensor each: the model still runs
  and its values are unchanged, but safetensors will not save tensors that share storage (save a copy).

Weights: the model's own tensors, used through F.linear on their [out, in] layout: no copies (the lean
runtime's fused, pre-transposed products double the weights in memory, which on a GPU buys little; a decode
step replayed as a graph pays no launch overhead for the three q/k/v and two gate/up products).

It runs on the CPU too (the conformance tests run it there), eagerly and more slowly than lean there: `auto`
picks it on CUDA only.
"""

from __future__ import annotations

import logging
import math
import threading
import weakref
from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from service_common.errors import OutOfRange, ResourceExhausted
from serving.runtimes import lean
from serving.runtimes.base import Capabilities, Runtime, to_device
from serving.sessions import most_caches

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)  # decode graphs are captured at these batch sizes; beyond 32: eager
# Passes of at most this many new tokens per session (verify of gamma + 1, a proposal's first step) replay graphs
# too, captured per (batch bucket, tokens per session, length bucket); longer ones (prefills) run eagerly.
GRAPH_TOKENS = 16
MAX_EXTEND_GRAPHS = 192  # shapes beyond this many run eagerly (each graph holds its output rows)
# What the graphs' static outputs (float32 logits of every row of their shape) may hold together; a shape whose
# output would pass it runs eagerly. Kept out of the KV pool on CUDA, beside RESERVE_BYTES.
GRAPH_OUTPUT_BYTES = 1 << 30
# Captures are serialised across every runtime of the process: torch.cuda.graph synchronizes the device and empties
# the allocator's cache on entry, which fails (and spoils the other's capture) while another thread captures.
_CAPTURE_LOCK = threading.Lock()
LENGTH_STEP = 256
# A slot's tokens when --slot-tokens is 0: every session reserves its whole slot, so the model's own context would
# leave room for few sessions (Llama-3.1-8B's 131,072 tokens are 16 GiB a slot in bf16: 3 sessions on an 80 GB card).
DEFAULT_SLOT_TOKENS = 8192
DEFAULT_POOL_MB = 4096.0  # the CPU pool when no --session-memory-mb is given (the store's default budget)
# Device memory left outside the pool, besides the passes' gathered keys and values (_activation_bytes).
RESERVE_BYTES = 1 << 30
MAX_BATCH = 32  # sessions per pass the activation reserve is sized for (the worker's default --max-batch)

_MODULES = {
    "layer": {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"},
    "attn": {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "rotary_emb"},
    "mlp": {"gate_proj", "up_proj", "down_proj", "act_fn"},
}


def unsupported_model(model: torch.nn.Module) -> str:
    """What in the loaded model's layers this forward would leave out (a module it does not know); "" if none.
    A guard for architectures lean may learn before this runtime does."""
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "the model has no model.layers / model.rotary_emb"
    for layer in inner.layers:
        for what, module in (("layer", layer), ("attn", getattr(layer, "self_attn", None)),
                             ("mlp", getattr(layer, "mlp", None))):
            names = {name for name, _ in module.named_children()} if module is not None else set()
            extra = names - _MODULES[what]
            if extra or module is None:
                return f"its decoder layers hold modules this runtime does not compute: {sorted(extra)}"
    return ""


def length_bucket(length: int, step: int = LENGTH_STEP) -> int:
    """The attention length a pass whose longest session reaches `length` runs at: a multiple of `step` up
    to 4 steps, then the next power of two (at most ~2x the keys gathered; few shapes to capture)."""
    length = max(1, length)
    if length <= 4 * step:
        return step * math.ceil(length / step)
    return 1 << (length - 1).bit_length()


def batch_bucket(n: int) -> int | None:
    return next((b for b in BATCH_BUCKETS if b >= n), None)


@dataclass
class _Layer:
    norm1: torch.Tensor
    qkv: torch.Tensor  # [(heads + 2 kv_heads) * head_dim, hidden]: q_proj, k_proj, v_proj's weights, one tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor  # [hidden, heads * head_dim]: the model's own weight
    o_bias: torch.Tensor | None
    norm2: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]: gate_proj and up_proj's weights, one tensor
    down: torch.Tensor
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    windowed: bool


def fuse_in_place(modules: list[torch.nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The modules' weights (and biases) as one tensor stacked along the output dimension, WITHOUT a second copy:
    the fused tensor is made once and each module's parameter becomes a view of it, so the model's own forward
    (HF generate, the exactness checks) reads the same memory. The values are unchanged. A second runtime over the
    same model finds the fusion already done (`_specdec_fused`) and shares it."""
    done = getattr(modules[0], "_specdec_fused", None)
    if done is not None and _still_views_of(modules, done):
        return done
    biases = [getattr(m, "bias", None) for m in modules]
    with torch.no_grad():
        weight = torch.cat([m.weight.detach() for m in modules])
        bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None
        offset = 0
        for module, b in zip(modules, biases):
            rows = module.weight.shape[0]
            module.weight = torch.nn.Parameter(weight[offset:offset + rows], requires_grad=False)
            if bias is not None:
                module.bias = torch.nn.Parameter(bias[offset:offset + rows], requires_grad=False)
            elif b is not None:  # some but not all have a bias: add it after the fused product
                raise ValueError("cannot fuse projections of which only some have a bias")
            offset += rows
    fused = (weight, bias)
    for module in modules:
        module._specdec_fused = fused
    return fused


def _still_views_of(modules: list[torch.nn.Module], fused: tuple[torch.Tensor, torch.Tensor | None]) -> bool:
    """Whether every module's weight (and bias) is still its rows of the fused tensors: not when the model's weights
    were replaced since (load_state_dict(assign=True), a new parameter), whose values the fusion would not hold."""
    weight, bias = fused
    offset = 0
    for module in modules:
        if getattr(module, "_specdec_fused", None) is not fused:
            return False
        rows = module.weight.shape[0]
        expected = weight[offset:offset + rows]
        if module.weight.data_ptr() != expected.data_ptr() or module.weight.shape != expected.shape:
            return False
        if bias is not None:
            own = getattr(module, "bias", None)
            if own is None or own.data_ptr() != bias[offset:offset + rows].data_ptr():
                return False
        offset += rows
    return True


class StaticCache:
    """A session's slot in the pool and how many tokens of it are filled. The slot returns to the pool when
    this object is garbage (or on `release()`); rollback (`crop`) moves the length only."""

    def __init__(self, runtime: StaticRuntime, slot: int):
        self.slot: int | None = slot
        self.capacity = runtime.slot_tokens
        self.length = 0
        self._nbytes = runtime.slot_bytes
        self.zeroed = False  # its slot's keys and values are zeroed before its first pass (StaticRuntime._admit)
        # deque.append is atomic: the finalizer may run on any thread, in the middle of anything (no lock).
        self._release = weakref.finalize(self, runtime._free.append, slot)

    def crop(self, length: int) -> None:
        self.length = max(0, min(self.length, length))

    def nbytes(self) -> int:
        """The slot's bytes: reserved whole for this session whatever its length."""
        return self._nbytes

    def release(self) -> None:
        """Give the slot back now (it is given back anyway when the cache is garbage); the cache is dead."""
        self.slot = None
        self._release()


@dataclass
class _Graph:
    graph: object  # torch.cuda.CUDAGraph
    meta: torch.Tensor  # [2, batch]: slots, positions (static input)
    tokens: torch.Tensor  # [batch] (static input)
    out: torch.Tensor  # [batch, vocab] float32 (static output)


@dataclass
class _ExtendGraph:
    """A pass of `per` new tokens for each of `bucket` sessions. Static input `meta`, one flat long tensor:
    ids, positions, write rows ([bucket * per] each), slots [bucket], then room for the rows to keep
    [bucket * per] (read after the replay, outside the graph). Static output: logits of every row."""
    graph: object
    meta: torch.Tensor
    out: torch.Tensor  # [bucket * per, vocab] float32


class StaticRuntime(Runtime):
    name = "static"

    def __init__(self, model: torch.nn.Module, *, slot_tokens: int = 0, slots: int | None = None,
                 pool_mb: float | None = None, gpu_memory_fraction: float = 0.9, max_sessions: int = 1024,
                 graphs: bool = True, length_step: int = LENGTH_STEP):
        """slot_tokens: each session's capacity (0: the model's context up to DEFAULT_SLOT_TOKENS); it is also the most this runtime
        serves (`max_context`). The pool's slots: `slots` when given; else on CUDA as many as fit in
        gpu_memory_fraction of the free device memory less a reserve for activations and graphs; on the CPU
        as many as fit in pool_mb (the --session-memory-mb budget); at most what max_sessions sessions need
        (the session store may admit a quarter more, and one more while it replaces a session's cache).
        graphs: replay decode steps as CUDA graphs (CUDA only; False: eager, for timing the difference)."""
        why = lean.unsupported(model.config) or unsupported_model(model)
        if why:
            raise ValueError(f"the static runtime cannot serve this {model.config.model_type!r} model: {why}")
        config = self.config = model.config
        inner = model.model
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = inner.layers[0].self_attn.q_proj.weight.shape[0] // self.heads
        self.group = self.heads // self.kv_heads
        self.eps = config.rms_norm_eps
        self.hidden = config.hidden_size
        weight = inner.embed_tokens.weight
        self.dtype, self.device = weight.dtype, weight.device
        self.embed = weight.detach()
        self.final_norm = inner.norm.weight.detach()
        self.lm_head = model.lm_head.weight.detach()
        self.vocab = self.lm_head.shape[0]
        windows = lean.attention_windows(config)
        self.window = next((w for w in windows if w is not None), None)
        self.layers: list[_Layer] = []
        for layer, window in zip(inner.layers, windows):
            attn, mlp = layer.self_attn, layer.mlp

            def w(module):
                return module.weight.detach()

            q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
            # One product for q, k and v and one for gate and up (fewer, larger kernels: on a GPU a decode step is
            # mostly small kernels), over the model's own memory (fuse_in_place: no second copy of the weights).
            qkv, qkv_bias = fuse_in_place([attn.q_proj, attn.k_proj, attn.v_proj])
            gate_up, gate_up_bias = fuse_in_place([mlp.gate_proj, mlp.up_proj])
            if gate_up_bias is not None or getattr(mlp.down_proj, "bias", None) is not None:
                raise ValueError("the static runtime computes no MLP biases")  # (lean.unsupported refuses them)
            o_bias = attn.o_proj.bias.detach() if getattr(attn.o_proj, "bias", None) is not None else None
            self.layers.append(_Layer(
                norm1=w(layer.input_layernorm), qkv=qkv, qkv_bias=qkv_bias, o=w(attn.o_proj), o_bias=o_bias,
                norm2=w(layer.post_attention_layernorm), gate_up=gate_up, down=w(mlp.down_proj),
                q_norm=None if q_norm is None else w(q_norm), k_norm=None if k_norm is None else w(k_norm),
                windowed=window is not None))

        context = int(getattr(config, "max_position_embeddings", 0) or 0) or 2048
        if slot_tokens < 0:
            raise ValueError(f"--slot-tokens must be >= 0 (0: the model's context), got {slot_tokens}")
        self.slot_tokens = min(context, slot_tokens or DEFAULT_SLOT_TOKENS)
        self.max_context = self.slot_tokens
        self.length_step = max(1, length_step)
        # Rotary tables for the positions a slot holds, [slot_tokens, head_dim].
        self.cos, self.sin = lean.rotary_tables(inner.rotary_emb, self.slot_tokens, self.device, self.dtype)
        # rotate_half(x) * sin == flip_halves(x) * signed_sin, where signed_sin is sin with its first half negated:
        # rotary in three kernels (flip, mul, addcmul) for q and k together instead of five each.
        half = self.head_dim // 2
        self.signed_sin = torch.cat([-self.sin[:, :half], self.sin[:, half:]], dim=-1)

        element = torch.empty((), dtype=self.dtype).element_size()
        self.slot_bytes = len(self.layers) * 2 * self.slot_tokens * self.kv_heads * self.head_dim * element
        most = most_caches(max_sessions)
        if slots is None:
            if self.device.type == "cuda":
                if not 0 < gpu_memory_fraction <= 1:
                    raise ValueError(f"--gpu-memory-fraction must be in (0, 1], got {gpu_memory_fraction}")
                free, _ = torch.cuda.mem_get_info(self.device)
                # Memory torch's caching allocator holds but no tensor uses (a runtime built and dropped before
                # this one) is free to this process too.
                free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
                kept_out = RESERVE_BYTES + self._activation_bytes() + (GRAPH_OUTPUT_BYTES if graphs else 0)
                budget = int(free * gpu_memory_fraction) - kept_out
                where = (f"{gpu_memory_fraction} of the {free >> 20} MiB free on {self.device} less "
                         f"{kept_out >> 20} MiB for activations and graphs")
            else:
                budget = int((DEFAULT_POOL_MB if pool_mb is None else pool_mb) * (1 << 20))
                where = f"{budget >> 20} MiB (--session-memory-mb)"
            slots = min(most, budget // self.slot_bytes - 1)  # less the scratch slot
            if slots < 1:
                raise ValueError(
                    f"the static runtime's KV pool has no room for one session of {self.slot_tokens} tokens "
                    f"({self.slot_bytes >> 20} MiB a slot) in {where}: lower --slot-tokens or give it more memory")
        self.session_slots = int(slots)
        # Slot 0 is the scratch slot: padding rows of a graph write and read there; sessions get 1..slots.
        self.kv = torch.empty(len(self.layers), 2, self.session_slots + 1, self.slot_tokens, self.kv_heads,
                              self.head_dim, dtype=self.dtype, device=self.device)
        self.pool_bytes = self.kv.numel() * element
        self.kv[:, :, 0].zero_()
        self._free: deque[int] = deque(range(1, self.session_slots + 1))
        # A session's slot is zeroed before its first pass: masked-out keys and values must be finite (0 * inf is
        # NaN), and a recycled slot may hold an earlier session's overflowed bf16/fp16 values; on a CPU the pool's
        # pages are then touched only as sessions come.

        self.use_graphs = bool(graphs) and self.device.type == "cuda"
        self.capabilities = Capabilities(batches_sessions=True, concurrent_passes=False, graphs=self.use_graphs)
        self._graphs: dict[tuple[int, int], _Graph | None] = {}  # None: capture failed, that shape runs eagerly
        self._graph_output_bytes = 0  # the captured graphs' static outputs, against GRAPH_OUTPUT_BYTES
        self._extend_graphs: dict[tuple[int, int, int], _ExtendGraph | None] = {}  # (bucket, per, length)
        self._graph_pool = None
        self._stats_lock = threading.Lock()
        self._stats = {"graphs_captured": 0, "graph_replays": 0, "capture_failures": 0, "eager_decode_steps": 0,
                       "extend_passes": 0, "extend_graphs_captured": 0, "extend_graph_replays": 0,
                       "extend_capture_failures": 0}

    # -- sessions ------------------------------------------------------------------------------------------
    def new_cache(self) -> StaticCache:
        try:
            slot = self._free.popleft()
        except IndexError:
            raise ResourceExhausted(
                f"the static runtime's KV pool is full: all {self.session_slots} session slots of "
                f"{self.slot_tokens} tokens are held by live sessions; retry later, or start the service with more "
                f"memory for it (--gpu-memory-fraction on a GPU, --session-memory-mb on a CPU) or a smaller "
                f"--slot-tokens") from None
        return StaticCache(self, slot)

    def stats(self) -> dict:
        """Counters for a benchmark: graphs captured, replays, capture failures (those shapes run eagerly),
        eager decode steps, extend passes; and the pool: slots, free slots, slot tokens, bytes."""
        with self._stats_lock:
            out = dict(self._stats)
        out.update(graphs=self.use_graphs, slots=self.session_slots, free_slots=len(self._free),
                   slot_tokens=self.slot_tokens, slot_bytes=self.slot_bytes, pool_bytes=self.pool_bytes,
                   graph_shapes=sorted(k for k, g in self._graphs.items() if g is not None),
                   extend_graph_shapes=sorted(k for k, g in self._extend_graphs.items() if g is not None))
        return out

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self._stats[key] += n

    def _activation_bytes(self) -> int:
        """Keys and values one layer of a MAX_BATCH-session pass gathers at full slot length, twice over
        (the attention's own buffers)."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return 4 * MAX_BATCH * self.slot_tokens * self.kv_heads * self.head_dim * element

    def _admit(self, caches: list[StaticCache], counts: list[int]) -> None:
        """Refuse, before anything changes, a pass that would take a session past its slot; zero fresh slots."""
        for cache, count in zip(caches, counts):
            if cache.slot is None:
                raise RuntimeError("this cache was released; its slot may be another session's now")
            if cache.length + count > self.slot_tokens:
                raise OutOfRange(
                    f"the session would reach {cache.length + count} tokens, past the static runtime's "
                    f"{self.slot_tokens}-token slots (--slot-tokens; the service's max_context)")
        for cache in caches:
            if not cache.zeroed:
                self.kv[:, :, cache.slot].zero_()
                cache.zeroed = True

    def _bucket(self, length: int) -> int:
        return min(self.slot_tokens, length_bucket(length, self.length_step))

    def _host(self, values: list[int]) -> torch.Tensor:
        """Host integers as a tensor to copy to the device: pinned on CUDA, so that the copy does not block
        (the caching host allocator keeps a pinned block until the copies from it are done)."""
        host = torch.tensor(values, dtype=torch.long)
        return host.pin_memory() if self.device.type == "cuda" else host

    def _to_device(self, values: list[int]) -> torch.Tensor:
        """Host integers to the device in one copy, non-blocking on CUDA (no host sync)."""
        return to_device(torch.tensor(values, dtype=torch.long), self.device)

    # -- the forward -------------------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, write: torch.Tensor, slots: torch.Tensor,
                 query_positions: torch.Tensor, q_index: torch.Tensor | None, length: int) -> torch.Tensor:
        """The decoder over a pass's new tokens (flat, session after session); returns the last hidden states
        [tokens, hidden] before the final norm. ids, positions: [tokens]; write: [tokens], each token's row in
        the flat [slots * slot_tokens] pool (slot * slot_tokens + position); slots: [n]; query_positions
        [n, T]: each session's padded query rows' positions (a padding row repeats the session's last one);
        q_index: each token's row in the padded [n * T] layout (None: no padding, T tokens each)."""
        n, per = query_positions.shape
        heads, kv_heads, head_dim, group = self.heads, self.kv_heads, self.head_dim, self.group
        capacity, rows = self.slot_tokens, self.session_slots + 1
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        keys_at = torch.arange(length, device=self.device)
        visible = keys_at <= query_positions[..., None]  # [n, T, L]: cached and causal
        masks = [visible]
        if self.window is not None:
            masks.append(visible & (keys_at > query_positions[..., None] - self.window))
        # Query heads sharing a key head fold into the query length: [n, 1, group * T, L].
        masks = [m[:, None, None].expand(n, 1, group, per, length).reshape(n, 1, group * per, length) for m in masks]
        x = F.embedding(ids, self.embed)
        q_size, kv_size = heads * head_dim, kv_heads * head_dim
        signed_sin = self.signed_sin[positions][:, None]
        for i, layer in enumerate(self.layers):
            h = F.rms_norm(x, (self.hidden,), layer.norm1, self.eps)
            qkv = F.linear(h, layer.qkv, layer.qkv_bias)  # [tokens, (heads + 2 kv_heads) * head_dim]
            v = qkv[:, q_size + kv_size:].view(-1, kv_heads, head_dim)
            if layer.q_norm is None and layer.k_norm is None:
                # q and k rotated together: [tokens, heads + kv_heads, head_dim]
                qk = qkv[:, :q_size + kv_size].view(-1, heads + kv_heads, head_dim)
                flipped = qk.view(-1, heads + kv_heads, 2, head_dim // 2).flip(-2).view_as(qk)
                qk = torch.addcmul(qk * cos, flipped, signed_sin)
                q, k = qk[:, :heads], qk[:, heads:]
            else:  # Qwen3: per-head norms on q and k before the rotation
                q = qkv[:, :q_size].view(-1, heads, head_dim)
                k = qkv[:, q_size:q_size + kv_size].view(-1, kv_heads, head_dim)
                if layer.q_norm is not None:
                    q = F.rms_norm(q, (head_dim,), layer.q_norm, self.eps)
                if layer.k_norm is not None:
                    k = F.rms_norm(k, (head_dim,), layer.k_norm, self.eps)
                q, k = lean.rotate(q, cos, sin), lean.rotate(k, cos, sin)
            pool_k = self.kv[i, 0].view(rows * capacity, kv_heads, head_dim)
            pool_v = self.kv[i, 1].view(rows * capacity, kv_heads, head_dim)
            pool_k.index_copy_(0, write, k)
            pool_v.index_copy_(0, write, v)
            keys = self.kv[i, 0, :, :length].index_select(0, slots).transpose(1, 2)  # [n, kv_heads, L, d]
            values = self.kv[i, 1, :, :length].index_select(0, slots).transpose(1, 2)
            if q_index is not None:
                q = q.new_zeros(n * per, heads, head_dim).index_copy_(0, q_index, q)
            # [n * T, heads, d] -> [n, kv_heads, group * T, d]: head h = kv * group + r, as HF's repeat_kv
            q = q.reshape(n, per, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4).reshape(n, kv_heads, group * per, head_dim)
            attended = F.scaled_dot_product_attention(q, keys, values,
                                                      attn_mask=masks[-1] if layer.windowed else masks[0])
            attended = attended.view(n, kv_heads, group, per, head_dim).permute(0, 3, 1, 2, 4).reshape(n * per, heads * head_dim)
            if q_index is not None:
                attended = attended.index_select(0, q_index)
            # Residual adds fused into the products (addmm: one kernel, not two).
            if layer.o_bias is None:
                x = torch.addmm(x, attended, layer.o.t())
            else:
                x = x + F.linear(attended, layer.o, layer.o_bias)
            h = F.rms_norm(x, (self.hidden,), layer.norm2, self.eps)
            gate, up = F.linear(h, layer.gate_up).chunk(2, dim=-1)
            x = torch.addmm(x, F.silu(gate) * up, layer.down.t())
        return x

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.rms_norm(x, (self.hidden,), self.final_norm, self.eps), self.lm_head).float()

    @torch.inference_mode()
    def extend_batch(self, caches: list[StaticCache], token_lists: list[list[int]], keeps: list[int]) -> list[torch.Tensor]:
        """Prefill and verify passes (any number of new tokens per session, ragged). On CUDA a pass of at most
        GRAPH_TOKENS tokens per session for at most 32 sessions replays a graph (one token a session: the decode
        step's, not a second graph of the same computation); others run eagerly."""
        counts = [len(tokens) for tokens in token_lists]
        if self.use_graphs and max(counts) == 1:  # one token a session (so one row kept): a decode step's graph
            return list(self.decode_step(caches, self._to_device([t for tokens in token_lists for t in tokens])).split(1))
        self._admit(caches, counts)
        n, per, total = len(caches), max(counts), sum(counts)
        starts = [cache.length for cache in caches]
        length = self._bucket(max(s + c for s, c in zip(starts, counts)))
        bucket = batch_bucket(n) if self.use_graphs and per <= GRAPH_TOKENS else None
        graph = self._extend_graph(bucket, per, length) if bucket is not None else None
        if graph is not None:
            logits = self._replay_extend(graph, bucket, per, caches, token_lists, starts, keeps)
            for cache, start, count in zip(caches, starts, counts):
                cache.length = start + count
            self._count("extend_graph_replays")
            return list(logits.split(list(keeps)))
        padded = total != n * per
        ids = [t for tokens in token_lists for t in tokens]
        positions = [p for s, c in zip(starts, counts) for p in range(s, s + c)]
        q_index = [i * per + j for i, c in enumerate(counts) for j in range(c)] if padded else []
        query_positions = [s + min(j, c - 1) for s, c in zip(starts, counts) for j in range(per)]
        rows, offset = [], 0
        for c, keep in zip(counts, keeps):
            rows += range(offset + c - keep, offset + c)
            offset += c
        slots = [cache.slot for cache in caches]
        write = [cache.slot * self.slot_tokens + p for cache, s, c in zip(caches, starts, counts) for p in range(s, s + c)]
        # One host-to-device copy for all of it, then views.
        meta = self._to_device(ids + positions + write + q_index + query_positions + rows + slots)
        parts = meta.split([total, total, total, len(q_index), n * per, len(rows), n])
        ids_d, positions_d, write_d, q_index_d, query_d, rows_d, slots_d = parts
        x = self._forward(ids_d, positions_d, write_d, slots_d, query_d.view(n, per), q_index_d if padded else None,
                          length)
        logits = self._logits(x.index_select(0, rows_d))
        for cache, start, count in zip(caches, starts, counts):
            cache.length = start + count
        self._count("extend_passes")
        return list(logits.split(list(keeps)))

    # -- graphs of short passes (verify, a proposal's first step) ---------------------------------------------
    def _replay_extend(self, graph: _ExtendGraph, bucket: int, per: int, caches: list[StaticCache],
                       token_lists: list[list[int]], starts: list[int], keeps: list[int]) -> torch.Tensor:
        """Every session padded to `per` tokens and the pass to `bucket` sessions: a padding token repeats its
        session's last position and writes its key and value to the scratch slot (never to the session's), a
        padding session is all scratch. Returns the logits of the rows to keep, [sum(keeps), vocab]."""
        ids, positions, write, rows = [], [], [], []
        for i, (cache, tokens, start, keep) in enumerate(zip(caches, token_lists, starts, keeps)):
            count = len(tokens)
            ids += tokens + [0] * (per - count)
            positions += [start + j for j in range(count)] + [start + count - 1] * (per - count)
            write += [cache.slot * self.slot_tokens + start + j for j in range(count)] + [0] * (per - count)
            rows += range(i * per + count - keep, i * per + count)
        pad = (bucket - len(caches)) * per
        slots = [cache.slot for cache in caches] + [0] * (bucket - len(caches))
        host = ids + [0] * pad + positions + [0] * pad + write + [0] * pad + slots + rows
        graph.meta[:len(host)].copy_(self._host(host), non_blocking=True)
        graph.graph.replay()
        start = 3 * bucket * per + bucket
        return graph.out.index_select(0, graph.meta[start:start + len(rows)])

    def _extend_graphed(self, meta: torch.Tensor, bucket: int, per: int, length: int) -> torch.Tensor:
        """What an extend graph captures: the forward over the static inputs in `meta`, logits of every row."""
        size = bucket * per
        ids, positions, write = meta[:size], meta[size:2 * size], meta[2 * size:3 * size]
        slots = meta[3 * size:3 * size + bucket]
        x = self._forward(ids, positions, write, slots, positions.view(bucket, per), None, length)
        return self._logits(x)

    def _extend_graph(self, bucket: int, per: int, length: int) -> _ExtendGraph | None:
        if len(self._extend_graphs) >= MAX_EXTEND_GRAPHS and (bucket, per, length) not in self._extend_graphs:
            return None
        return self._cached_graph(self._extend_graphs, (bucket, per, length), bucket * per, self._capture_extend,
                                  "extend_", f"a pass of {per} tokens for {bucket} sessions at length {length}",
                                  "such passes go without a graph")

    def _cached_graph(self, graphs: dict, key: tuple, rows: int, capture, counters: str, shape: str, fallback: str):
        """The graph of this shape in `graphs`, captured on first use; None, so that the shape runs eagerly (as
        exact), when its output of `rows` rows would not fit GRAPH_OUTPUT_BYTES or its capture failed (said once)."""
        if key in graphs:
            return graphs[key]
        if not self._output_fits(rows):
            return None
        try:
            graphs[key] = capture(*key)
            self._count(counters + "graphs_captured")
        except Exception as error:  # noqa: BLE001 - any capture failure: that shape runs eagerly, as exact
            graphs[key] = None
            self._count(counters + "capture_failures")
            log.warning("static runtime: capturing the graph of %s failed (%s: %s); %s", shape,
                        type(error).__name__, error, fallback)
        return graphs[key]

    def _capture_extend(self, bucket: int, per: int, length: int) -> _ExtendGraph:
        """As _capture: warm up on a side stream, capture into the shared pool; all-zero inputs point every row at
        the scratch slot, position 0."""
        meta = torch.zeros(4 * bucket * per + bucket, dtype=torch.long, device=self.device)
        out = self._capture_graph(lambda: self._extend_graphed(meta, bucket, per, length))
        return _ExtendGraph(out[0], meta, out[1])

    def _output_fits(self, rows: int) -> bool:
        """Whether a graph whose static output holds `rows` logit rows fits what graph outputs may hold together."""
        return self._graph_output_bytes + rows * self.vocab * 4 <= GRAPH_OUTPUT_BYTES

    def _capture_graph(self, run):
        """(graph, output) of `run` captured per PyTorch's recipe (torch.cuda.graph), one capture in the process at
        a time (_CAPTURE_LOCK)."""
        with _CAPTURE_LOCK:
            graph, out = self._capture_graph_locked(run)
        self._graph_output_bytes += out.numel() * out.element_size()
        return graph, out

    def _capture_graph_locked(self, run):
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
            out = run()
        return graph, out

    def _decode(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """One token per row: what a graph captures and what runs eagerly. Returns [rows, vocab] float32."""
        x = self._forward(tokens, positions, slots * self.slot_tokens + positions, slots, positions[:, None], None, length)
        return self._logits(x)

    @torch.inference_mode()
    def decode_step(self, caches: list[StaticCache], tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per session (a [sessions] long tensor on the device); [sessions, vocab] float32.
        No host sync: the tokens stay on the device, the slots and lengths are the host's own."""
        n = len(caches)
        self._admit(caches, [1] * n)
        lengths = [cache.length for cache in caches]
        length = self._bucket(max(lengths) + 1)
        slots = [cache.slot for cache in caches]
        bucket = batch_bucket(n) if self.use_graphs else None
        graph = self._graph(bucket, length) if bucket is not None else None
        if graph is not None:
            pad = bucket - n
            graph.meta.view(-1).copy_(self._host(slots + [0] * pad + lengths + [0] * pad), non_blocking=True)
            graph.tokens[:n].copy_(tokens)
            graph.graph.replay()
            out = graph.out[:n].clone()
            self._count("graph_replays")
        else:
            meta = self._to_device(slots + lengths).view(2, n)
            out = self._decode(tokens.to(self.device, torch.long), meta[0], meta[1], length)
            self._count("eager_decode_steps")
        for cache in caches:
            cache.length += 1
        return out

    def _graph(self, bucket: int, length: int) -> _Graph | None:
        """The decode graph of this shape, captured on first use; None when it runs eagerly."""
        return self._cached_graph(self._graphs, (bucket, length), bucket, self._capture, "",
                                  f"a decode step for {bucket} sessions at length {length}", "that shape runs eagerly")

    def _capture(self, bucket: int, length: int) -> _Graph:
        """Per PyTorch's recipe (torch.cuda.graph): warm up on a side stream, then capture into the pool shared
        by all decode graphs (they never run at once). Warm-up and capture run with every row on the scratch
        slot at position 0, so they change no session's keys."""
        meta = torch.zeros(2, bucket, dtype=torch.long, device=self.device)
        tokens = torch.zeros(bucket, dtype=torch.long, device=self.device)
        graph, out = self._capture_graph(lambda: self._decode(tokens, meta[0], meta[1], length))
        return _Graph(graph, meta, tokens, out)

    def check(self) -> None:
        """A three-token forward and a rollback at startup, on a slot given back afterwards."""
        cache = self.new_cache()
        try:
            self.extend(cache, [0, 0, 0], 1)
            cache.crop(2)
        finally:
            cache.release()
