"""Which prefix a session's cache holds: a running hash of its token ids, and a tag for traces.

A call that relies on a cached prefix names its length AND its fingerprint (DESIGN.md, principle 9):
the service serves the cache only when the fingerprint of the tokens it holds up to that length is the
one the caller sent, so a cache that anyone else cropped, overwrote or re-filled is a cache miss
(session-lost, then a re-prefill), never a wrong token. The orchestrator and the services compute it
the same way, from the token ids alone.

    digest(0) = 16 zero bytes
    digest(i + 1) = blake2b-128(digest(i) || token_i as 4 little-endian bytes)

blake2b at 128 bits: finding two token sequences with one digest is out of reach, so the only way to
present the right fingerprint is to hold the right tokens, and then the cache (a function of the tokens)
is right too. ~0.5 us per token in CPython.

Knows nothing about gRPC or caches.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

DIGEST_BYTES = 16
EMPTY = bytes(DIGEST_BYTES)


def extend(digest: bytes, token_ids: Sequence[int]) -> list[bytes]:
    """The digests after each of `token_ids`, continuing from `digest`: [len(token_ids)] entries."""
    out = []
    for token in token_ids:
        digest = hashlib.blake2b(digest + (token & 0xFFFFFFFF).to_bytes(4, "little"), digest_size=DIGEST_BYTES).digest()
        out.append(digest)
    return out


def fingerprint(token_ids: Sequence[int]) -> bytes:
    """The fingerprint of a whole token sequence (the slow, obvious reference the chains must equal)."""
    digests = extend(EMPTY, token_ids)
    return digests[-1] if digests else EMPTY


class PrefixChain:
    """digest(i) for every prefix length i of one token sequence, extended as it grows and cut back where a
    new sequence departs from it. The orchestrator keeps one per service session: the sequence it sends
    is the committed tokens, or (for the draft's continuation) those plus unverified drafts.

    Only the last `window` hashed tokens are compared with each new sequence (comparing all of them cost
    0.34 ms a call at 32k tokens): a sequence that departs further back gets a wrong fingerprint, which a
    service answers as session-lost, never as a wrong token; the caller then calls `reset()`."""

    def __init__(self, window: int = 256) -> None:
        self.window = window
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self.digests: list[bytes] = [EMPTY]  # digests[i]: the first i tokens

    def at(self, tokens: Sequence[int], length: int) -> bytes:
        """The fingerprint of tokens[:length]."""
        known = min(len(self.tokens), length)
        start = max(0, known - self.window)
        if self.tokens[start:known] != list(tokens[start:known]):  # departs: cut back to the agreement
            same = start
            while same < known and self.tokens[same] == tokens[same]:
                same += 1
            del self.tokens[same:], self.digests[same + 1:]
        if length > len(self.tokens):
            new = list(tokens[len(self.tokens):length])
            self.digests += extend(self.digests[-1], new)
            self.tokens += new
        return self.digests[length]


def session_tag(session_id: str) -> str:
    """A short, one-way name for a session in spans and logs: the id itself is what lets a caller touch the
    session, so it travels only in requests, never where trace or log readers see it."""
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
