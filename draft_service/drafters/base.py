"""The drafter seam: what the draft service asks of a drafter, whatever drafts.

A drafter proposes up to gamma tokens after each of several sessions' committed tokens in one call (one pass of
the model worker), with the draft_probs rows the acceptance test needs when sampling. It keeps what it knows of a
session in a cache object of its own, which the session store holds, crops and sizes (serving/sessions.py), and it
says what it is: a description for ModelInfo, and the vocabulary and limits a target pairs with.

Knows nothing about gRPC; a drafter never decides which tokens are final (the orchestrator does).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Protocol

import torch

from serving.model_loading import LoadedModel, ModelIdentity
from speculation.sampling import Sampling
from speculation.wire import EncodedProbs, encode_probs


@dataclass
class ProposeJob:
    cache: object  # the drafter's cache for this session (its new_cache())
    append: list[int]  # committed tokens after the cache's length: at least one
    gamma: int  # 0: a chunk of a longer append (chunked prefill): feed it, propose nothing
    sampling: Sampling
    min_confidence: float = 0.0
    vocab_limit: int = 0  # propose only ids below this (0: all); see ProposeRequest.vocab_limit
    # The request's seed: the first token is coupled_sample(probs, seed), the rest race on its draft stream (no
    # generator: a retried pass redraws the same tokens).
    seed: int = 0


@dataclass
class Proposal:
    token_ids: list[int]  # at most gamma; none when the drafter has nothing to propose
    draft_probs: torch.Tensor | None  # [len(token_ids), vocab] when sampling, else None; dense or sparse
    drafter: str = ""  # the kind of drafter that made it (ProposeResponse.drafter)


class DraftCache(Protocol):
    """A session's state in a drafter, as the session store needs it. `length` counts the session's tokens the
    cache holds (the store fingerprints exactly those); crop(n) forgets all after the first n (n <= length)."""

    @property
    def length(self) -> int: ...

    def crop(self, length: int) -> None: ...

    def nbytes(self) -> int: ...


class Drafter(ABC):
    """One way of drafting. Subclasses set `kind`, `description` and `identity` and implement new_cache and
    propose_batch; a new drafter is one module in this package and one line in its registry (__init__.py)."""

    kind: str  # short and stable, per proposal: "model", "ngram" (ProposeResponse.drafter)
    description: str  # what the service hosts, for ModelInfo.drafter and the startup log: "ngram(n=1..3)"
    identity: LoadedModel | ModelIdentity  # vocab_size, max_context, EOS ids, tokenizer fingerprint (pairing)
    runner: object | None = None  # the torch runner inside, if any (the prefill lane needs the lean one)
    always_proposes: bool = False  # True: never an empty proposal (a chain asks no member after it)

    @abstractmethod
    def new_cache(self) -> DraftCache:
        """An empty cache for a new session."""

    @abstractmethod
    def propose_batch(self, jobs: list[ProposeJob]) -> list[Proposal]:
        """One proposal per job, in order. Each job's `append` goes into its cache first; then up to gamma tokens
        are proposed (none for a gamma-0 job). Afterwards each cache holds its old tokens, the append, and the
        first k of its own proposed tokens for some k (the model drafter feeds all but the last; the n-gram
        drafter none): Session.record fingerprints the cache's growth as that prefix of append + proposals.
        If it raises, the caller crops every cache back to the length it had (so crop must undo anything)."""

    def tokens_of(self, job: ProposeJob) -> int:
        """The tokens a job feeds (the worker's fair-share charge, prefill and chunk decisions, and
        ServerTiming.batch_tokens): the append, then its own drafts but the last (a chunk: gamma 0)."""
        return len(job.append) + max(job.gamma - 1, 0)

    def split(self, job: ProposeJob, n: int) -> tuple[ProposeJob, ProposeJob] | None:
        """Chunked prefill (serving/model_worker.py): see split_job."""
        return split_job(job, n)


def split_job(job: ProposeJob, n: int) -> tuple[ProposeJob, ProposeJob] | None:
    """Chunked prefill: a job feeding the first n appended tokens (gamma 0: it proposes nothing) and one
    feeding the rest and proposing; None when the append is not longer than n (the decode steps after it
    are one token each: nothing to split)."""
    if len(job.append) <= n:
        return None
    return replace(job, append=job.append[:n], gamma=0), replace(job, append=job.append[n:])


def one_hot_rows(token_ids: list[int], vocab: int) -> torch.Tensor:
    """[len(token_ids), vocab] point masses at the tokens, as a sparse (COO) tensor with one nonzero per row: the
    draft distribution of a drafter that proposes deterministically."""
    rows = len(token_ids)
    indices = torch.tensor([list(range(rows)), token_ids], dtype=torch.long)
    return torch.sparse_coo_tensor(indices, torch.ones(rows, dtype=torch.float32), (rows, vocab), is_coalesced=True,
                                   check_invariants=False)


def encode_rows(probs: torch.Tensor) -> EncodedProbs:
    """draft_probs in the wire format: a dense tensor as encode_probs chooses (CSR when smaller); a sparse one as
    CSR without ever making it dense (a one-hot row over a 150k vocabulary is 600 kB dense, 8 B sparse)."""
    if not probs.is_sparse:
        return encode_probs(probs)
    probs = probs.coalesce()  # entries in row order
    rows, cols = probs.shape
    row_ids, col_ids = probs.indices()
    offsets = torch.zeros(rows + 1, dtype=torch.int32)
    offsets[1:] = torch.bincount(row_ids, minlength=rows).cumsum(0)
    return EncodedProbs(rows, cols, row_offsets=offsets.numpy().tobytes(),
                        col_indices=col_ids.to(torch.int32).numpy().tobytes(),
                        values=probs.values().to(torch.float32).numpy().tobytes())
