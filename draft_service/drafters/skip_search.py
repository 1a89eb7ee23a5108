"""Which layers the layer-skip drafter skips: the set with the highest PREDICTED speedup on held-out prompts, as
Draft & Verify chooses it (Zhang et al., ACL 2024, Sec. 3.2, who search with Bayesian optimisation over LLaMA-2's
80-160 attention and MLP sub-layers).

For a candidate skip set S:
- alpha(S): how often the skipped model's greedy choice equals the full model's, along the full model's greedy path
  (teacher forcing: each held-out prompt and the full model's own greedy continuation go through the skipped model in
  one pass, and its argmax at every continuation position is compared with the token the full model chose there).
  That is the per-token acceptance of greedy drafts, the alpha of Leviathan et al. 2023 (speculation/gamma_policy.py).
- c(S): a skipped-model decode step over a full one, MEASURED once per search as a line: a step of the model with no
  decoder layers (embedding, final norm, lm_head and the runtime's per-call work: t0) and a step of the whole model
  (t_full). Every Llama decoder layer has the same shapes, so a model keeping k of L layers costs
  t0 + k (t_full - t0) / L and c = that / t_full. Timing every set instead would cost a second per set and move by
  +-15 % with the machine's other work, which would make the choice depend on the moment more than the set;
  kept / total alone would leave out t0 and flatter sets that skip many layers.
- predicted speedup: gamma_policy.expected_speedup(alpha, gamma, c) at the best gamma in 1..max_gamma.

Search: a beam over set sizes. Size 1 tries every layer; size k + 1 adds each remaining layer to each of the `beam`
best sets of size k; it stops at the first size whose best set predicts no more than the best so far (predicted
speedup first rises with k, as c falls, then falls as alpha does), or at the time budget. On L layers that is at
most L + beam * (L - 1) + beam * (L - 2) + ... sets (47 of the 126 for 7 layers, at beam 2), each one batched
forward over the prompts. A Bayesian optimiser earns its keep on 2^80 sets; on 2^7 a beam over sizes finds what an
exhaustive search finds: on the reference target (7 layers, 16 prompts x 32 tokens, one thread) both choose skip
1-6, the beam after 42 sets in 37 s, the exhaustive search after 126 in 80 s more; the best set of every size was
the beam's too.

What the prediction leaves out: the cost of a round beyond c * gamma + 1 target steps (the draft's RPC, a verify of
gamma + 1 positions costing more than one step). On the reference target over gRPC that was ~0.6 of a target step
per round, which is why a set predicted at x1.2 measured x0.93 against the target alone in the same stack.

Knows nothing about gRPC or sessions: it takes a lean runner (serving/runtimes/lean.py) and token ids.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field

import torch

from speculation.gamma_policy import expected_speedup

log = logging.getLogger(__name__)

NEW_TOKENS = 32  # the full model's greedy tokens per prompt whose choices the skipped models are compared with
PROMPT_TOKENS = 256  # a longer prompt is cut to its last this many tokens (the search's cost grows with it)
PASS_TOKENS = 2048  # prompts per teacher-forced pass: as many as fit in this many tokens
MAX_GAMMA = 8  # the predicted speedup is the best over gamma 1..this
BEAM = 2
BUDGET_S = 300.0  # past this the search stops and takes the best set it has evaluated


@dataclass(frozen=True)
class Candidate:
    skip: tuple[int, ...]  # 0-based layer indices, ascending
    alpha: float
    cost_ratio: float
    gamma: int
    predicted_speedup: float


@dataclass
class SearchReport:
    chosen: Candidate
    evaluated: list[Candidate]  # in the order evaluated
    num_layers: int
    prompts: int
    positions: int  # continuation positions alpha is measured on, per set
    step_ms: tuple[float, float]  # (t0, t_full): a decode step with no decoder layers, with all of them
    seconds: float
    stopped_by_budget: bool = False
    sizes: list[int] = field(default_factory=list)  # set sizes the beam went through

    def summary(self) -> str:
        chosen = self.chosen
        return (f"skip layers {','.join(map(str, chosen.skip))} of {self.num_layers}: alpha {chosen.alpha:.3f}, "
                f"c {chosen.cost_ratio:.3f} (measured: {self.step_ms[0]:.2f} ms with no layers, "
                f"{self.step_ms[1]:.2f} ms with all), predicted speedup x{chosen.predicted_speedup:.3f} at gamma "
                f"{chosen.gamma}; {len(self.evaluated)} sets evaluated on {self.prompts} prompts x {NEW_TOKENS} "
                f"tokens in {self.seconds:.1f} s" + (" (stopped by the time budget)" if self.stopped_by_budget else ""))


def best_gamma_speedup(alpha: float, cost_ratio: float, max_gamma: int = MAX_GAMMA) -> tuple[int, float]:
    """(gamma, expected speedup) at the gamma in 1..max_gamma that predicts the most (ties: the smaller gamma)."""
    alpha = min(alpha, 0.999)
    gamma = max(range(1, max_gamma + 1), key=lambda g: (expected_speedup(alpha, g, cost_ratio), -g))
    return gamma, expected_speedup(alpha, gamma, cost_ratio)


def _passes(prompts: list[list[int]], extra: int) -> list[list[int]]:
    """Indices of prompts grouped so that a group feeds at most PASS_TOKENS tokens (one prompt at least)."""
    groups, group, tokens = [], [], 0
    for i, prompt in enumerate(prompts):
        if group and tokens + len(prompt) + extra > PASS_TOKENS:
            groups.append(group)
            group, tokens = [], 0
        group.append(i)
        tokens += len(prompt) + extra
    return groups + ([group] if group else [])


def greedy_continuations(full, prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    """The full model's greedy `new_tokens` after each prompt (no stop at EOS: these are only positions to compare
    at), the prompts decoded together one step at a time."""
    out: list[list[int]] = [[] for _ in prompts]
    for group in _passes(prompts, new_tokens):
        caches = [full.new_cache() for _ in group]
        logits = full.extend_batch(caches, [prompts[i] for i in group], [1] * len(group))
        for step in range(new_tokens):
            picks = torch.cat(logits).argmax(dim=-1).tolist()
            for i, token in zip(group, picks):
                out[i].append(token)
            if step + 1 < new_tokens:
                logits = full.extend_batch(caches, [[t] for t in picks], [1] * len(group))
    return out


def greedy_alpha(runner, prompts: list[list[int]], continuations: list[list[int]]) -> float:
    """The fraction of continuation positions where the runner's argmax, fed the prompt and the continuation before
    that position, is the continuation's token."""
    matched = total = 0
    for group in _passes(prompts, len(continuations[0])):
        caches = [runner.new_cache() for _ in group]
        feeds = [prompts[i] + continuations[i][:-1] for i in group]
        logits = runner.extend_batch(caches, feeds, [len(continuations[i]) for i in group])
        for i, rows in zip(group, logits):
            expected = torch.tensor(continuations[i])
            matched += int((rows.argmax(dim=-1) == expected).sum())
            total += len(expected)
    return matched / total if total else 0.0


def step_ms(runner, context: int = 128, steps: int = 10, blocks: int = 7) -> float:
    """A one-token decode step after `context` tokens, in ms: the fastest of `blocks` blocks' means (the least
    disturbed by whatever else the machine runs)."""
    cache = runner.new_cache()
    runner.extend(cache, [1] * context, 1)
    per_block = []
    for _ in range(blocks):
        started = time.perf_counter()
        for _ in range(steps):
            cache.crop(context)
            runner.extend(cache, [2], 1)
        per_block.append((time.perf_counter() - started) * 1000 / steps)
    return min(per_block)


def search(full, prompts: list[list[int]], *, beam: int = BEAM, max_gamma: int = MAX_GAMMA,
           budget_s: float = BUDGET_S, new_tokens: int = NEW_TOKENS) -> SearchReport:
    """The skip set of the lean runner `full` (all layers) that predicts the highest speedup on `prompts` (token
    ids, cut here to their last PROMPT_TOKENS), by the beam over set sizes the module docstring describes."""
    started = time.monotonic()
    num_layers = len(full.layers)
    if num_layers < 2:
        raise ValueError("a model with one decoder layer has no layer to skip (one must be kept)")
    room = max(1, full.config.max_position_embeddings - new_tokens)
    prompts = [p[-min(PROMPT_TOKENS, room):] for p in prompts if p]
    if not prompts:
        raise ValueError("the skip search needs at least one non-empty held-out prompt")
    continuations = greedy_continuations(full, prompts, new_tokens)
    t0 = statistics.median(step_ms(full.skipping(range(num_layers))) for _ in range(3))
    t_full = statistics.median(step_ms(full) for _ in range(3))
    per_layer = max(t_full - t0, 0.0) / num_layers

    evaluated: dict[tuple[int, ...], Candidate] = {}

    def evaluate(skip: tuple[int, ...]) -> Candidate:
        alpha = greedy_alpha(full.skipping(skip), prompts, continuations)
        cost_ratio = (t0 + per_layer * (num_layers - len(skip))) / t_full
        gamma, speedup = best_gamma_speedup(alpha, cost_ratio, max_gamma)
        candidate = Candidate(skip, alpha, cost_ratio, gamma, speedup)
        log.debug("skip %s: alpha %.3f, c %.3f, x%.3f at gamma %d", skip, alpha, cost_ratio, speedup, gamma)
        evaluated[skip] = candidate
        return candidate

    def rank(candidate: Candidate):
        return (-candidate.predicted_speedup, len(candidate.skip), candidate.skip)

    best: Candidate | None = None
    frontier: list[tuple[int, ...]] = [()]
    sizes: list[int] = []
    stopped = False
    for size in range(1, num_layers):
        sets = sorted({tuple(sorted((*kept, layer))) for kept in frontier for layer in range(num_layers)
                       if layer not in kept})
        results = []
        for skip in sets:
            if best is not None and time.monotonic() - started > budget_s:
                stopped = True
                break
            results.append(evaluated.get(skip) or evaluate(skip))
        if not results:
            break
        sizes.append(size)
        results.sort(key=rank)
        improved = best is None or rank(results[0]) < rank(best)
        if improved:
            best = results[0]
        if stopped or not improved:
            break
        frontier = [candidate.skip for candidate in results[:beam]]
    return SearchReport(best, list(evaluated.values()), num_layers, len(prompts), len(prompts) * new_tokens,
                        (t0, t_full), time.monotonic() - started, stopped, sizes)
