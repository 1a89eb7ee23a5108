"""BENCHMARK-ONLY drafter: the real draft model's cost, proposals of a chosen acceptance rate. Never a serving option.

benchmarking/gpu_check.py measures speculative throughput through the services with RANDOM-WEIGHT models, whose
draft and target agree on nothing, so the acceptance rate α would be ~0 and tells nothing about the system. This
drafter runs the draft model's real propose loop (draft_service/drafters/model.py: propose_batch, on the draft's
runtime, so every draft forward is paid for) and then replaces the proposed tokens: at each position, with
probability α, the target's known greedy continuation token, else a different one. It knows the continuation
because the check first generated it with the target alone (greedy, deterministic) and wrote it to a control file
(JSON: {"alpha": a, "seed": s, "sequences": [prompt ids + continuation ids, ...]}), re-read whenever it changes.

It is registered nowhere (draft_service/drafters/__init__.py's DRAFTERS does not name it): gpu_check passes it to
serving.model_server.start_model_server through the `host=` hook. Its proposals say drafter "oracle-benchmark".

Cache bookkeeping: the draft runtime's cache holds, after a call, the append and the model's OWN first gamma-1
picks (the real loop feeds them), while the session store believes it holds the oracle's tokens: same lengths,
other keys and values. That changes what the draft model would predict next, which nothing here reads; the cost of
every forward is unchanged.
"""

from __future__ import annotations

import json
import os
import random
import threading
from dataclasses import replace

from draft_service.drafters.base import Drafter, Proposal, ProposeJob, one_hot_rows
from draft_service.drafters.model import propose_batch


class OracleCache:
    """The draft runtime's cache for a session, plus the token ids the session store thinks it holds."""

    def __init__(self, inner):
        self.inner = inner
        self.tokens: list[int] = []
        self.sequence: list[int] | None = None  # the known sequence this session follows, once found

    @property
    def length(self) -> int:
        return self.inner.length

    def crop(self, length: int) -> None:
        self.inner.crop(length)
        del self.tokens[length:]

    def nbytes(self) -> int:
        return self.inner.nbytes()


class OracleDrafter(Drafter):
    kind = "oracle-benchmark"
    always_proposes = True

    def __init__(self, identity, runner, control_file: str):
        self.identity = identity
        self.runner = runner
        self.control_file = control_file
        self.description = f"oracle-benchmark(model cost, control {os.path.basename(control_file)})"
        self._lock = threading.Lock()
        self._stamp = None
        self.alpha = 0.0
        self.sequences: list[list[int]] = []
        self.rng = random.Random(0)

    def new_cache(self) -> OracleCache:
        return OracleCache(self.runner.new_cache())

    def _reload(self) -> None:
        try:
            stamp = os.stat(self.control_file).st_mtime_ns
        except FileNotFoundError:
            return
        if stamp == self._stamp:
            return
        with open(self.control_file) as f:
            control = json.load(f)
        self._stamp = stamp
        self.alpha = float(control.get("alpha", 0.0))
        self.sequences = [list(map(int, s)) for s in control.get("sequences", [])]
        self.rng = random.Random(int(control.get("seed", 0)))

    def _known(self, cache: OracleCache, context: list[int]) -> list[int] | None:
        if cache.sequence is not None and cache.sequence[:len(context)] == context:
            return cache.sequence
        for sequence in self.sequences:
            if len(sequence) > len(context) and sequence[:len(context)] == context:
                cache.sequence = sequence
                return sequence
        cache.sequence = None
        return None

    def propose_batch(self, jobs: list[ProposeJob]) -> list[Proposal]:
        with self._lock:
            self._reload()
        inner_jobs = [replace(job, cache=job.cache.inner) for job in jobs]
        proposals = propose_batch(self.runner, inner_jobs)  # the real draft forwards: their cost is the point
        vocab = self.identity.vocab_size
        for job, proposal in zip(jobs, proposals):
            cache: OracleCache = job.cache
            context = cache.tokens + list(job.append)
            known = self._known(cache, context) if proposal.token_ids else None
            tokens = []
            with self._lock:
                for i, own in enumerate(proposal.token_ids):
                    position = len(context) + i
                    truth = known[position] if known is not None and position < len(known) else None
                    if truth is not None and self.rng.random() < self.alpha:
                        tokens.append(truth)
                    else:
                        wrong = own if truth is None or own != truth else (truth % (vocab - 1)) + 1
                        tokens.append(wrong)
            limit = job.vocab_limit or vocab
            tokens = [t if t < limit else 1 for t in tokens]
            proposal.token_ids = tokens
            proposal.drafter = self.kind
            if proposal.draft_probs is not None:  # sampling: proposals are deterministic, point masses
                proposal.draft_probs = one_hot_rows(tokens, proposal.draft_probs.shape[-1])
            fed = cache.inner.length - len(context)  # the loop fed its first `fed` proposals back
            cache.tokens = context + tokens[:max(fed, 0)]
        return proposals
