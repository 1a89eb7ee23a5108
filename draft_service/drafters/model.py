"""The model drafter: a small causal LM proposes with the ordinary decode loop, one token at a time.

The loop (propose_batch) knows nothing about gRPC; it takes a runner, the jobs' caches (the runner's KV caches),
sampling settings and generators. ModelDrafter is it behind the drafter seam (base.py).
"""

from __future__ import annotations

import torch

from draft_service.drafters.base import Drafter, Proposal, ProposeJob
from serving.runtimes import make_runtime
from serving.model_loading import LoadedModel, load_model
from speculation.sampling import coupled_sample, logits_to_probs, sample


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
        loaded = load_model(settings.model, settings.device, settings.dtype)
        return cls(loaded, make_runtime(loaded.model, loaded.device, settings.runtime))

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
    gamma 0 only feeds its tokens (its one kept logit row is thrown away) and proposes nothing."""
    logits = runner.extend_batch([j.cache for j in jobs], [j.append for j in jobs], [1] * len(jobs))
    tokens: list[list[int]] = [[] for _ in jobs]
    rows: list[list[torch.Tensor]] = [[] for _ in jobs]
    active = [i for i, job in enumerate(jobs) if job.gamma > 0]
    logits = [logits[i] for i in active]
    stopped: set[int] = set()
    for step in range(max(j.gamma for j in jobs) if active else 0):
        # Greedy picks for the whole batch in one op (per-session argmax calls were ~10% of a step at 16
        # sessions); a lone session keeps its own argmax, which skips the copy into a batch.
        batched = len(active) > 1 and any(jobs[i].sampling.greedy for i in active)
        argmax = torch.cat(logits).argmax(dim=-1).tolist() if batched else None
        for position, (index, row_logits) in enumerate(zip(active, logits)):
            job = jobs[index]
            limited = 0 < job.vocab_limit < row_logits.shape[-1]
            if limited:
                row_logits = row_logits[..., :job.vocab_limit]  # only ids the target has; probs renormalise
            if job.sampling.greedy:
                token = argmax[position] if argmax is not None and not limited else int(row_logits[0].argmax())
                confidence = float(row_logits[0].softmax(-1)[token]) if job.min_confidence > 0 else 1.0
            else:
                probs = logits_to_probs(row_logits, job.sampling)  # [1, vocab]
                # The first token by Gumbel-max on the request's seed: when this proposal continues past a
                # verify (the overlap), it is the guess for the bonus token the orchestrator draws with the
                # same seed. Exact sampling from the draft either way.
                token = coupled_sample(probs[0], job.seed) if step == 0 else int(sample(probs, job.generator)[0])
                rows[index].append(probs[0])
                confidence = float(probs[0, token])
            tokens[index].append(token)
            if confidence < job.min_confidence:
                stopped.add(index)  # the draft doubts this token: proposing more past it rarely pays
        active = [i for i in active if len(tokens[i]) < jobs[i].gamma and i not in stopped]
        if not active:
            break
        logits = runner.extend_batch([jobs[i].cache for i in active], [[tokens[i][-1]] for i in active],
                                     [1] * len(active))
    return [Proposal(tokens[i], torch.stack(rows[i]) if rows[i] else None) for i in range(len(jobs))]

