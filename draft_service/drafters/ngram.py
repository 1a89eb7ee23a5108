"""The n-gram drafter (prompt lookup): propose what followed the most recent earlier occurrence of the session's
last n tokens, n from n_max down to n_min, searching every committed token (prompt and generated). No weights:
it reads only the vocabulary of the checkpoint it names, to pair with the target.

As in HF's prompt lookup decoding (`prompt_lookup_num_tokens`, `max_matching_ngram_size`), the longest suffix
that occurred before wins; among its occurrences the most recent (HF takes the first), since text being written
tends to repeat what was written last. When there is no match it proposes nothing, and the round is the target's
alone: a guess with no evidence behind it costs the target's verify a position and is rarely accepted.

The lookup is the whole cost, so it is an index, not a scan: each cache maps every n-gram of its tokens to the
position right after its most recent occurrence, updated as tokens arrive (n_max - n_min + 1 dict writes per
token) and undone exactly when the cache is cropped (rejected drafts fed while drafting ahead). A proposal is at
most n_max - n_min + 1 dict reads and a copy of gamma tokens, whatever the context's length.
"""

from __future__ import annotations

from draft_service.drafters.base import Drafter, Proposal, ProposeJob, one_hot_rows
from serving.model_loading import LoadedModel, ModelIdentity, read_identity

MAX_NGRAM = 32  # longer n-grams index more per token for matches that a shorter one finds as well

# The cache's memory per token, measured with tracemalloc over 4096 random tokens and n = 1..3 (Python objects:
# the token list, the index's tuples and entries, the undo log); nbytes() scales it by the number of n sizes.
BYTES_PER_TOKEN_AND_SIZE = 190


class NgramCache:
    """A session's committed tokens and the index of their n-grams.

    index[gram] is the position p right after the most recent occurrence of gram that has a token after it
    (tokens[p - n:p] == gram, p < length); undo holds, for every registration, what index[gram] was before it, so
    that crop restores the index exactly as it was at that length."""

    __slots__ = ("tokens", "index", "undo", "marks", "n_min", "n_max")

    def __init__(self, n_min: int, n_max: int):
        self.tokens: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}
        self.undo: list[tuple[tuple[int, ...], int]] = []  # (gram, its previous position or -1), in order
        self.marks: list[int] = []  # marks[p]: len(undo) before position p's token registered its grams
        self.n_min, self.n_max = n_min, n_max

    @property
    def length(self) -> int:
        return len(self.tokens)

    def extend(self, new_tokens: list[int]) -> None:
        tokens, index, undo, marks, n_min, n_max = self.tokens, self.index, self.undo, self.marks, self.n_min, self.n_max
        for token in new_tokens:
            p = len(tokens)
            marks.append(len(undo))
            # The n-grams ending at p now have a token after them (this one): p is their most recent occurrence.
            for n in range(n_min, min(n_max, p) + 1):
                gram = tuple(tokens[p - n:p])
                undo.append((gram, index.get(gram, -1)))
                index[gram] = p
            tokens.append(token)

    def crop(self, length: int) -> None:
        if length >= len(self.tokens):
            return
        index, undo = self.index, self.undo
        for _ in range(len(undo) - self.marks[length]):
            gram, previous = undo.pop()
            if previous < 0:
                del index[gram]
            else:
                index[gram] = previous
        del self.tokens[length:], self.marks[length:]

    def nbytes(self) -> int:
        return len(self.tokens) * BYTES_PER_TOKEN_AND_SIZE * (self.n_max - self.n_min + 1)

    def lookup(self, gamma: int) -> list[int]:
        """Up to gamma tokens: what followed the most recent earlier occurrence of the longest matching suffix;
        [] when no suffix of n_min..n_max tokens occurred before with a token after it."""
        tokens, index = self.tokens, self.index
        length = len(tokens)
        for n in range(min(self.n_max, length), self.n_min - 1, -1):
            p = index.get(tuple(tokens[length - n:]))
            if p is None:
                continue
            proposal = tokens[p:p + gamma]
            # Past the end of the context the copy runs on into itself (LZ77's overlapping copy): the match says
            # the text repeats with period length - p, so a loop of a few tokens is proposed for all gamma.
            period = length - p
            while len(proposal) < gamma:
                proposal.append(proposal[len(proposal) - period])
            return proposal
        return []


class NgramDrafter(Drafter):
    """Prompt lookup behind the drafter seam.

    Under sampling a proposal's draft distribution is a point mass at each proposed token (its draft_probs rows
    are one-hot), and rejection sampling stays exact. With draft_probs = delta_x, the orchestrator accepts x with
    probability min(1, target_probs(x) / 1) = target_probs(x); otherwise it draws from the residual
    norm(max(0, target_probs - delta_x)), which is target_probs with x removed, renormalised. So the token emitted
    is x with probability target_probs(x), and any y != x with probability
    (1 - target_probs(x)) * target_probs(y) / (1 - target_probs(x)) = target_probs(y): exactly target_probs,
    whatever x the lookup chose (Leviathan et al. 2023, Theorem 3.5, holds for any draft distribution, a
    deterministic one included). The rows go on the wire sparse: one nonzero per row.
    """

    kind = "ngram"

    def __init__(self, identity: LoadedModel | ModelIdentity, n_min: int = 1, n_max: int = 3):
        if not 1 <= n_min <= n_max <= MAX_NGRAM:
            raise ValueError(f"--ngram-min and --ngram-max must satisfy 1 <= min <= max <= {MAX_NGRAM}; "
                             f"got {n_min} and {n_max}")
        self.identity = identity
        self.n_min, self.n_max = n_min, n_max
        self.description = f"ngram(n={n_min}..{n_max})"

    @classmethod
    def from_settings(cls, settings) -> NgramDrafter:
        """--model names the checkpoint (or tokenizer directory) whose vocabulary it pairs with; no weights."""
        return cls(read_identity(settings.model), settings.ngram_min, settings.ngram_max)

    def new_cache(self) -> NgramCache:
        return NgramCache(self.n_min, self.n_max)

    def tokens_of(self, job: ProposeJob) -> int:
        return len(job.append)  # it indexes the append and feeds nothing of its own

    def propose_batch(self, jobs: list[ProposeJob]) -> list[Proposal]:
        proposals = []
        for job in jobs:
            cache: NgramCache = job.cache
            cache.extend(job.append)
            # (min_confidence: a point mass is sure of its token, so nothing stops a proposal early)
            token_ids = cache.lookup(job.gamma) if job.gamma > 0 else []
            if job.vocab_limit > 0:  # (the session's own tokens are the target's; kept for the contract)
                cut = next((i for i, t in enumerate(token_ids) if t >= job.vocab_limit), len(token_ids))
                token_ids = token_ids[:cut]
            rows = None
            if token_ids and not job.sampling.greedy:
                rows = one_hot_rows(token_ids, self.identity.vocab_size)
            proposals.append(Proposal(token_ids, rows, self.kind))
        return proposals
