"""The one logits -> probabilities transform and the one sampler, used by the draft, the target and the tests.

Order follows HF transformers' warpers: temperature, then top-k, then top-p. Temperature 0 is the
greedy limit and returns the one-hot distribution of the argmax, so greedy is a special case of the
same maths rather than a separate code path with its own rules.

Temperatures below MIN_SAMPLED_TEMPERATURE are that limit too (vLLM draws the same line at 1e-5): at
1e-40, logits / temperature overflow float32 to inf and the softmax is NaN; at 1e-5 a logit gap of 1e-3
is already a factor e**100, so what is left to sample is the argmax up to exact ties. Every side (the
orchestrator, the draft, the verify) decides greedy here, so they always agree.

The sampler is `race` (below): a seeded exponential race that runs on whatever device holds the probabilities,
with noise every device computes bit for bit alike. `sample` (the orchestrator's residual and bonus draws, on a seed
from its generator) and `coupled_sample` (the bonus coupled with the draft's guess) are the race with host-side
keys. Its cost (benchmarks in the commit that made it, H200 host): per row, 115 us at a 4096-id vocabulary and
1.8 ms at 128k on one CPU thread (the inverse CDF it replaced: 35 us and 0.5 ms, with no coupling and a host copy
on a GPU); on CUDA ~0.2 ms a call whatever the vocabulary or rows (about 22 elementwise kernels; no host sync).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


MIN_SAMPLED_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_SAMPLED_TEMPERATURE

    @property
    def bounds_support(self) -> bool:
        """Whether the distribution is sparse enough to send as (token, prob) pairs."""
        return self.greedy or self.top_k > 0 or self.top_p < 1.0

    def problems(self) -> list[str]:
        """Human-readable reasons these settings are invalid; empty when they are fine."""
        found = []
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):  # also catches NaN
            found.append(f"temperature must be finite and >= 0 (0 = greedy; below {MIN_SAMPLED_TEMPERATURE} is "
                         f"greedy too), got {self.temperature}")
        if self.top_k < 0:
            found.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:  # also catches NaN
            found.append(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        return found


def logits_to_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """[rows, vocab] logits -> [rows, vocab] float32 probabilities under `sampling`."""
    logits = logits.float()
    if sampling.greedy:
        one_hot = torch.zeros_like(logits)
        return one_hot.scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    logits = logits / sampling.temperature
    vocab = logits.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]  # [rows, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [rows, vocab]
        # A token stays while the mass of the more likely tokens has not reached top_p; the most
        # likely token always stays.
        drop_sorted = mass_before >= sampling.top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(dim=-1)


# -- The one sampler: a seeded exponential race --------------------------------------------------------------
#
# token = argmax_v probs[v] / E[v], with E[v] ~ Exp(1) independent: E[v] / probs[v] is Exp(probs[v]), and the least
# of independent exponentials is v with probability probs[v] / sum(probs). So the race is an exact sample of the
# row (unnormalised rows too: a residual max(0, target_probs - draft_probs) needs no division), an id of zero
# probability never wins (its ratio is 0, every other is > 0), and it is argmax(log probs + Gumbel) by another name.
#
# The noise is not drawn from a generator: E[v] is a hash of (key, v), the key a hash of (seed, stream, index).
# It runs where the probabilities are, with no generator state to save and restore (a retried pass redraws the
# same tokens by construction) and nothing on the host in the loop; and every device computes the same bits,
# so the draft's guess on its GPU and the orchestrator's bonus on its CPU share their noise exactly (the coupling).
# The hash is int64 torch arithmetic on values below 2**32: xor, shifts of non-negative values (logical), and
# products of a value below 2**32 and a constant below 2**31, so every product is below 2**63 (no overflow, no
# wrap-around whose behaviour could differ between devices); the same functions run on Python ints unchanged.

MASK32 = 0xFFFFFFFF
# The multipliers of a 32-bit xorshift-multiply finaliser (hash-prospector's "lowbias32" family, both below 2**31
# so that x * c < 2**63 for any 32-bit x).
_MUL_A, _MUL_B = 0x21F0AAAD, 0x735A2D97
_STREAM_SALT, _SECOND_SALT = 0x5BD1E995, 0x68E31DA4
PLAIN_STREAM = 0  # speculation/rejection.py: a residual or uncoupled bonus, the seed drawn from the generation's RNG
COUPLED_STREAM = 1  # the draft's first token and the orchestrator's coupled bonus draw with the same seed
DRAFT_STREAM = 2  # the draft's later tokens, keyed by step (each Propose carries a fresh seed)


def fmix32(x):
    """A bijection of [0, 2**32) with full avalanche, on a Python int or (in place) on an int64 tensor."""
    x ^= x >> 16
    x *= _MUL_A
    x &= MASK32
    x ^= x >> 15
    x *= _MUL_B
    x &= MASK32
    x ^= x >> 15
    return x


def race_key(seed: int, stream: int, index: int) -> tuple[int, int]:
    """The two 32-bit words that fix a row's noise: a hash of the 64-bit seed, the stream and the row (or step)
    index. Python ints on the host, so a key costs no device op."""
    seed &= (1 << 64) - 1
    high, low = seed >> 32, seed & MASK32
    h = fmix32(fmix32(fmix32(stream & MASK32 ^ _STREAM_SALT) ^ high) ^ low)
    first = fmix32(h ^ (index & MASK32))
    return first, fmix32(fmix32(first ^ _SECOND_SALT) ^ high)


_IDS: dict[tuple[int, str], torch.Tensor] = {}  # arange(vocab) per (vocab, device): one op fewer per draw


def _ids(vocab: int, device) -> torch.Tensor:
    key = (vocab, str(device))
    ids = _IDS.get(key)
    if ids is None:
        if len(_IDS) > 16:
            _IDS.clear()
        ids = _IDS[key] = torch.arange(vocab, dtype=torch.int64, device=device)
    return ids


def race_bits(keys, vocab: int, device) -> torch.Tensor:
    """[rows, vocab] int64 in [1, 2**53): the race's random bits for ids 0..vocab-1, `keys` a list of race_key
    pairs (one per row). The value at (row, v) depends on the row's key and v alone, not on the width, the device or
    the other rows. Bits 52..21 are fmix32(fmix32(v ^ first) ^ second), distinct across a row (a bijection of v);
    bits 20..1 refine them (a keyed multiply of those); bit 0 is 1, so the uniform bits / 2**53 is never 0 or 1.
    Both key words enter non-linearly: with fmix32(v ^ first) alone, two keys whose `first` differ by d gave rows
    that are one permutation of the other (row 2 at v = row 1 at v ^ d: a pair of correlated draws about once in
    2**32 / vocab pairs of rows). One row's key enters
    as scalars; several rows' keys go to the device in one non-blocking copy (no host sync)."""
    if len(keys) == 1:
        first, second = keys[0]
    else:
        words = torch.tensor(keys, dtype=torch.int64)  # [rows, 2]
        if torch.device(device).type != "cpu":  # pinned, so that the copy does not block the host
            words = (words.pin_memory() if torch.cuda.is_available() else words).to(device, non_blocking=True)
        first, second = words[:, :1], words[:, 1:]
    high = fmix32(_ids(vocab, device) ^ first)  # a new tensor, hashed in place
    high ^= second
    high = fmix32(high)
    low = high ^ second
    low *= _MUL_B
    low &= MASK32
    low >>= 11  # the product's top 21 bits
    high <<= 21
    high |= low
    high |= 1
    return high.reshape(len(keys), vocab)


def race(probs: torch.Tensor, keys) -> torch.Tensor:
    """[rows, vocab] probabilities (any scale, non-negative) -> [rows] token ids on probs' device, one draw per row,
    the race's noise fixed by `keys` (race_key pairs, one per row). No host sync, nothing but device ops."""
    probs = probs.reshape(len(keys), probs.shape[-1])
    # E = -log1p(-u) ~ Exp(1), accurate to float64 rounding for every u (1 - u is exact: u is a multiple of 2**-53).
    # probs / E maximal <=> probs / log1p(-u) minimal: -0.0 for a zero probability, < 0 for every other id
    # (log1p(-u) is in [-36.8, -1.1e-16], never 0 nor infinite).
    minus_noise = race_bits(keys, probs.shape[-1], probs.device).to(torch.float64)
    minus_noise *= -(2.0 ** -53)
    return torch.div(probs, minus_noise.log1p_()).argmin(dim=-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """[rows, vocab] -> [rows] token ids, by the race on a seed drawn from `generator` (the orchestrator's, on the
    CPU: its residual and uncoupled bonus draws). Checks the rows on the host: for host tensors."""
    rows = probs.reshape(-1, probs.shape[-1])
    totals = rows.sum(dim=-1, dtype=torch.float64)
    if not (totals > 0).all() or not torch.isfinite(totals).all():
        raise ValueError(f"cannot sample from rows whose probabilities sum to {totals.tolist()}")
    seed = int(torch.randint(0, 1 << 62, (1,), generator=generator))
    return race(rows, [race_key(seed, PLAIN_STREAM, r) for r in range(rows.shape[0])])


def seeded_generator(seed: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for a 64-bit seed (the orchestrator's per generation). torch's keeps only the low 32 bits of
    what it is given, so seeds that differ only above bit 31 would replay the same draws: fold the high half in
    first. `stream` picks another, independent stream for the same seed (a seed below 2**32 on stream 0 is used as
    it is)."""
    folded = (seed ^ (seed >> 32)) & 0xFFFFFFFF
    return torch.Generator().manual_seed((folded + stream * 0x9E3779B9) & 0xFFFFFFFF)


def coupled_sample(probs: torch.Tensor, seed: int) -> int:
    """One draw from a [vocab] distribution by the race on (seed, COUPLED_STREAM, 0). Alone it is an exact sample
    of `probs`; two distributions drawn with the same seed pick the same token far more often than independent
    draws do (always, when they are equal), on any devices: the noise of id v is the same wherever it is computed
    and however wide the row.

    The draft guesses the target's bonus token this way while the target verifies (the overlap's continuation;
    draft_service/drafters/model.py draws its first token with race_key(seed, COUPLED_STREAM, 0) on its device),
    and the orchestrator draws the bonus with the same seed, so a draft close to the target guesses it right
    about as often as it would under greedy decoding. Reads the token to the host (for host tensors). Refuses a row
    that is no distribution, as `sample` does (the race would pick a NaN's id, or id 0 of an all-zero row)."""
    total = float(probs.sum(dtype=torch.float64))
    if not (total > 0 and math.isfinite(total)):
        raise ValueError(f"cannot sample from a row whose probabilities sum to {total}")
    return int(race(probs.reshape(1, -1), [race_key(seed, COUPLED_STREAM, 0)])[0])
