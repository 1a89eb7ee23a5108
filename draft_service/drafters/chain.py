"""A chain of drafters behind one draft service: each round, the first member that proposes anything wins
(`--drafter ngram,model`: prompt lookup when the session's tokens hold a match, else the draft model).

Members a round does not reach are not fed: their caches lag behind the session and catch up on the committed
tokens they missed the next time they are asked, in the same pass as that round's append (a model member feeds
them through its KV cache then; an n-gram member indexes them). Only a prefill chunk (a gamma-0 job) feeds every
member at once, so that a long prompt reaches a model member in chunks, as chunked prefill intends, rather than
in one pass at its first proposal.
"""

from __future__ import annotations

from dataclasses import replace

from draft_service.drafters.base import Drafter, DraftCache, Proposal, ProposeJob


class ChainCache:
    """The session's tokens (committed, then the drafts the winning member fed), and each member's cache, which
    holds a prefix of them: a member that lags is fed the rest when it is next asked. Cropping crops them all."""

    __slots__ = ("tokens", "members")

    def __init__(self, members: list[DraftCache]):
        self.tokens: list[int] = []
        self.members = members

    @property
    def length(self) -> int:
        return len(self.tokens)

    def crop(self, length: int) -> None:
        del self.tokens[length:]
        for cache in self.members:
            if cache.length > length:
                cache.crop(length)

    def nbytes(self) -> int:
        return 8 * len(self.tokens) + sum(cache.nbytes() for cache in self.members)


class ChainDrafter(Drafter):
    # tokens_of is the base's: a round costs as a model member's (the append and its drafts but the last); what a
    # lagging member catches up on is not counted, since which member a round reaches is known only once the
    # lookups before it have run.

    def __init__(self, members: list[Drafter]):
        if len(members) < 2:
            raise ValueError("a chain needs at least two drafters")
        for member, after in zip(members, members[1:]):
            if member.always_proposes:
                raise ValueError(f"in a chain, {member.kind!r} always proposes, so {after.kind!r} after it would never "
                                 "be asked; put the drafters that may find nothing first (e.g. ngram,model)")
        self.members = members
        self.kind = "chain"
        self.description = f"chain({','.join(member.description for member in members)})"
        # What the service says it is: a member with weights' (its logits count is what the target pairs with).
        weighted = [m for m in members if m.identity.num_parameters > 0]
        self.identity = (weighted or members)[0].identity
        runners = [m.runner for m in members if m.runner is not None]
        self.runner = runners[0] if runners else None
        self.always_proposes = members[-1].always_proposes

    def new_cache(self) -> ChainCache:
        return ChainCache([member.new_cache() for member in self.members])

    def propose_batch(self, jobs: list[ProposeJob]) -> list[Proposal]:
        for job in jobs:
            job.cache.tokens.extend(job.append)
        results: list[Proposal | None] = [None] * len(jobs)
        # A prefill chunk goes to every member; a round to each member in turn until one proposes.
        asked = list(range(len(jobs)))
        last = len(self.members) - 1
        for m, member in enumerate(self.members):
            sub_jobs = []
            for i in asked:
                chain: ChainCache = jobs[i].cache
                cache = chain.members[m]
                sub_jobs.append(replace(jobs[i], cache=cache, append=chain.tokens[cache.length:]))
            proposals = member.propose_batch(sub_jobs) if sub_jobs else []
            still = []
            for i, sub_job, proposal in zip(asked, sub_jobs, proposals):
                chain = jobs[i].cache
                fed = sub_job.cache.length - len(chain.tokens)  # its own drafts it fed (a model: all but the last)
                if fed > 0:
                    chain.tokens.extend(proposal.token_ids[:fed])
                results[i] = proposal
                if m < last and (jobs[i].gamma == 0 or not proposal.token_ids):
                    still.append(i)
            asked = still
        return results
