"""The model drafter: a small causal LM proposes with the ordinary decode loop, one token at a time.

The loop (propose_batch) knows nothing about gRPC; it takes a runner, the jobs' caches (the runner's KV caches),
sampling settings and seeds. ModelDrafter is it behind the drafter seam (base.py).
"""

from __future__ import annotations

import torch

from draft_service.drafters.base import Drafter, Proposal, ProposeJob
from serving.runtimes import make_runtime
from serving.model_loading import LoadedModel, load_model
from serving.model_server import runtime_options_from
from speculation.sampling import COUPLED_STREAM, DRAFT_STREAM, logits_to_probs, race, race_key


class ModelDrafter(Drafter):
    kind = "model"
    description = "model"
    always_proposes = True  # at least one token per call (min_confidence stops only after the first)

    def __init__(self, loaded: LoadedModel, runner):
        self.identity = loaded
        self.runner = runner

    @classmethod
    def from_settings(cls, settings) -> ModelDrafter:
        """--model loaded the standard way, on --device in --dtype, run by --runtime."""
        options = runtime_options_from(settings)
        loaded = load_model(settings.model, settings.device, settings.dtype)
        return cls(loaded, make_runtime(loaded.model, loaded.device, settings.runtime, options))

    def new_cache(self):
        return self.runner.new_cache()

    def propose_batch(self, jobs: list[ProposeJob]) -> list[Proposal]:
        proposals = propose_batch(self.runner, jobs)
        for proposal in proposals:
            proposal.drafter = self.kind
        return proposals


def propose_batch(runner, jobs: list[ProposeJob]) -> list[Proposal]:
    """Each job's committed tokens are appended, then up to gamma tokens drawn one at a time (the
    ordinary decode loop); several sessions run in lockstep, one (ragged) forward per draft position
    for all of them. A session's cache ends holding all but its last proposed token (never fed back).
    Tokens and probabilities equal a solo run's up to the float rounding of a batched product. A job of
    gamma 0 only feeds its tokens (its one kept logit row is thrown away) and proposes nothing.

    Everything stays on the runner's device until the proposal is done: each step's picks are a device tensor fed
    straight back through runner.decode_step, the draft_probs rows stay where they were computed, and the end reads
    all tokens of all sessions in one .tolist() (the draft_probs rows are copied out before it, without a sync of
    their own). One host sync per proposal, then, besides what the runtime does inside its forwards. The exception
    is min_confidence > 0: stopping early needs the confidences on the host, one read per step for the batch (only
    while a job that asks for it is still proposing).

    Sampled tokens come from the race (speculation/sampling.py), keyed by the request's seed: the first token on the
    coupled stream (when this proposal continues past a verify, it is the guess for the bonus token the
    orchestrator draws with the same seed), the rest on the draft stream keyed by step. A retried pass draws the
    same tokens; there is no generator to keep."""
    first_logits = runner.extend_batch([j.cache for j in jobs], [j.append for j in jobs], [1] * len(jobs))
    vocab = first_logits[0].shape[-1] if first_logits else 0
    widths = [job.vocab_limit if 0 < job.vocab_limit < vocab else vocab for job in jobs]
    # Rows of jobs that pick alike (greedy or the same sampling, the same width) are adjacent at every step, so that
    # each group is one slice of the step's logits; within a group the longer proposals first, so the jobs that are
    # done leave from a group's end.
    active = sorted((i for i, job in enumerate(jobs) if job.gamma > 0),
                    key=lambda i: (_group(jobs[i], widths[i]), -jobs[i].gamma))
    if not active:
        return [Proposal([], None) for _ in jobs]
    logits = first_logits[active[0]] if len(active) == 1 else torch.cat([first_logits[i] for i in active])
    steps: list[tuple[list[int], torch.Tensor]] = []  # per step: the jobs in row order, their picks [rows]
    sampled_rows: dict[int, list[torch.Tensor]] = {}  # width -> [rows, width] draft_probs blocks, in draw order
    row_of: dict[int, list[tuple[int, int]]] = {}  # job -> (width, row in that width's blocks) per sampled token
    drawn = [0] * len(jobs)
    for step in range(max(jobs[i].gamma for i in active)):
        picks, confidences = [], []
        watched = any(jobs[i].min_confidence > 0 for i in active)
        for start, end in _groups(active, jobs, widths):
            job, width = jobs[active[start]], widths[active[start]]
            group_logits = logits[start:end, :width] if width < vocab else logits[start:end]
            if job.sampling.greedy:
                group_picks = group_logits.argmax(dim=-1)
                if watched:
                    confidences.append(group_logits.softmax(-1).gather(-1, group_picks[:, None])[:, 0])
            else:
                probs = logits_to_probs(group_logits, job.sampling)  # [rows, width]
                stream, index = (COUPLED_STREAM, 0) if step == 0 else (DRAFT_STREAM, step)
                group_picks = race(probs, [race_key(jobs[i].seed, stream, index) for i in active[start:end]])
                blocks = sampled_rows.setdefault(width, [])
                first_row = sum(block.shape[0] for block in blocks)
                blocks.append(probs)
                for offset, i in enumerate(active[start:end]):
                    row_of.setdefault(i, []).append((width, first_row + offset))
                if watched:
                    confidences.append(probs.gather(-1, group_picks[:, None])[:, 0])
            picks.append(group_picks)
        picks = picks[0] if len(picks) == 1 else torch.cat(picks)
        steps.append((active, picks))
        for i in active:
            drawn[i] += 1
        stopped = set()
        if watched:  # the one per-step host read, for jobs that stop when the draft doubts its token
            confidence = (confidences[0] if len(confidences) == 1 else torch.cat(confidences)).tolist()
            stopped = {i for i, c in zip(active, confidence) if c < jobs[i].min_confidence}
        keep = [p for p, i in enumerate(active) if drawn[i] < jobs[i].gamma and i not in stopped]
        if not keep:
            break
        active = [active[p] for p in keep]
        logits = runner.decode_step([jobs[i].cache for i in active], _take(picks, keep))
    # The proposal's end: the draft_probs rows start on their way to the host, then every token is read at once.
    on_host = {width: _download(blocks) for width, blocks in sampled_rows.items()}
    values = (steps[0][1] if len(steps) == 1 else torch.cat([picks for _, picks in steps])).tolist()
    tokens: list[list[int]] = [[] for _ in jobs]
    position = 0
    for rows, _ in steps:
        for i in rows:
            tokens[i].append(values[position])
            position += 1
    return [Proposal(tokens[i], _rows(on_host, row_of[i]) if i in row_of else None) for i in range(len(jobs))]


def _group(job: ProposeJob, width: int):
    sampling = job.sampling
    return (not sampling.greedy, width) + (() if sampling.greedy else
                                           (sampling.temperature, sampling.top_k, sampling.top_p))


def _groups(active: list[int], jobs: list[ProposeJob], widths: list[int]):
    """(start, end) of the runs of adjacent rows that pick alike."""
    start = 0
    for end in range(1, len(active) + 1):
        if end == len(active) or _group(jobs[active[end]], widths[active[end]]) != _group(
                jobs[active[start]], widths[active[start]]):
            yield start, end
            start = end


def _take(picks: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """picks[keep] by slices of its runs (no index tensor to copy to the device)."""
    if len(keep) == picks.shape[0]:
        return picks
    runs, start = [], 0
    for n in range(1, len(keep) + 1):
        if n == len(keep) or keep[n] != keep[n - 1] + 1:
            runs.append(picks[keep[start]:keep[n - 1] + 1])
            start = n
    return runs[0] if len(runs) == 1 else torch.cat(runs)


def _download(blocks: list[torch.Tensor]) -> torch.Tensor:
    """The blocks, as one tensor, copied to the host without waiting (the proposal's .tolist() waits for it)."""
    block = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
    return block.to("cpu", non_blocking=True)


def _rows(on_host: dict[int, torch.Tensor], rows: list[tuple[int, int]]) -> torch.Tensor:
    width = rows[0][0]
    return on_host[width][[row for _, row in rows]]
