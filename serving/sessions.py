"""Per-session KV caches keyed by session id: thread-safe, bounded, disposable.

The orchestrator owns the truth (DESIGN.md, principle 1), so losing a session is never an error of
correctness: a call that assumes more than the store holds gets SessionLost and the orchestrator
re-sends the whole prefix. Bounds: a byte budget over all caches, a session count, an idle TTL; idle
sessions are evicted least-recently-used first.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from service_common import session_fingerprint
from service_common.errors import Draining, InvalidArgument, ResourceExhausted, SessionLost


@dataclass
class Session:
    session_id: str
    cache: object  # KVCache or LeanCache: length, crop(n), nbytes()
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_used: float = field(default_factory=time.monotonic)
    nbytes: int = 0
    in_use: int = 0
    # digests[i]: the fingerprint of the first i tokens the cache holds (service_common/session_fingerprint.py)
    digests: list[bytes] = field(default_factory=lambda: [session_fingerprint.EMPTY])

    @property
    def length(self) -> int:
        return self.cache.length

    def record(self, fed: Sequence[int]) -> None:
        """After a forward: the cache grew by some of `fed` (in order; a drafter feeds all but its last
        proposal); extend the fingerprints by as many as it grew."""
        grew = self.cache.length - (len(self.digests) - 1)
        if grew > len(fed) or grew < 0:
            raise RuntimeError(f"the cache grew by {grew} tokens but the call fed {len(fed)}")
        self.digests += session_fingerprint.extend(self.digests[-1], fed[:grew])

    def rewind(self, length: int) -> None:
        self.cache.crop(length)
        del self.digests[length + 1:]


def headroom(bound: int) -> int:
    """Sessions a store bounded to `bound` admits over it for a caller below its fair share (SessionStore)."""
    return max(1, bound // 4)


def most_caches(bound: int) -> int:
    """The most caches a store bounded to `bound` holds at once: its headroom, and one more while a session's new
    cache replaces its old one (a restart at prefix 0). What a fixed pool of caches must have room for."""
    return bound + headroom(bound) + 1


def owner(key) -> Hashable:
    """Who holds a session: the caller part of a (caller, id) key; None for plain ids (one caller)."""
    return key[0] if isinstance(key, tuple) else None


def _name(key) -> str:
    """The session id a caller sent, for messages: keys may be (caller, session id) pairs (the model
    services keep sessions per caller), and the caller part is not the caller's to read back."""
    return key[1] if isinstance(key, tuple) else key


@dataclass
class StoreStats:
    live_sessions: int
    bytes_used: int
    evictions: int
    created: int


class SessionStore:
    def __init__(self, new_cache: Callable[[], object], max_bytes: int = 4 << 30, max_sessions: int = 1024,
                 ttl_s: float = 600.0):
        self.new_cache = new_cache
        self.max_bytes, self.max_sessions, self.ttl_s = max_bytes, max_sessions, ttl_s
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.evictions = 0
        self.created = 0

    def stats(self) -> StoreStats:
        with self._lock:
            return StoreStats(len(self._sessions), sum(s.nbytes for s in self._sessions.values()),
                              self.evictions, self.created)

    def __contains__(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._sessions

    def release(self, session_id: str) -> bool:
        with self._lock:
            return self._sessions.pop(session_id, None) is not None

    def drop_all(self) -> None:
        with self._lock:
            self._sessions.clear()

    @contextmanager
    def use(self, session_id, prefix_len: int, fingerprint: bytes = b"", new_sessions: bool = True) -> Iterator[Session]:
        """The session (an id, or a (caller, id) pair) cropped to prefix_len, locked for the caller. prefix_len 0 starts it anew.

        `new_sessions` False (a draining replica): a session the store does not hold is refused with
        Draining, whatever prefix_len, so its caller starts it on another replica rather than here; one it
        holds is served as ever.

        The cache is served only if its first prefix_len tokens have `fingerprint`: whatever else
        happened to it (another caller overwrote, cropped or re-filled it) is a miss, SessionLost, and the
        caller re-sends the whole prefix. A miss leaves the session untouched. If the body raises, the
        session goes back to prefix_len tokens (the model services restore a cache whose forward failed),
        or is dropped when even that fails: a failed call costs its caller a retry, nobody a token.
        """
        if not _name(session_id):
            raise InvalidArgument("session_id is required")
        if prefix_len < 0:
            raise InvalidArgument(f"prefix_len must be >= 0, got {prefix_len}")
        session = self._checkout(session_id, prefix_len, new_sessions)
        try:
            with session.lock:
                if prefix_len > session.length:
                    raise SessionLost(
                        f"session {_name(session_id)!r} holds {session.length} tokens but the call assumes "
                        f"{prefix_len}; resend the whole prefix with prefix_len=0")
                if prefix_len > 0 and session.digests[prefix_len] != fingerprint:
                    why = ("prefix_fingerprint differs" if fingerprint else
                           "no prefix_fingerprint: a cached prefix is served only to a caller that names its fingerprint")
                    raise SessionLost(
                        f"session {_name(session_id)!r} holds other tokens than the {prefix_len}-token prefix this call "
                        f"names ({why}); resend the whole prefix with prefix_len=0")
                session.rewind(prefix_len)
                try:
                    yield session
                except BaseException:
                    try:
                        session.rewind(prefix_len)
                    except Exception:  # noqa: BLE001 - a cache that cannot roll back is not served again
                        self.release(session_id)
                    raise
                if len(session.digests) - 1 != session.length:  # a body that did not record what it fed
                    self.release(session_id)
                session.nbytes = session.cache.nbytes()
        finally:
            with self._lock:
                session.in_use -= 1
                session.last_used = time.monotonic()
            self._enforce_budget()

    def _checkout(self, session_id: str, prefix_len: int, new_sessions: bool = True) -> Session:
        with self._lock:
            self._expire_locked()
            session = self._sessions.get(session_id)
            if session is None and not new_sessions:
                raise Draining("this replica is shutting down and takes no new sessions; start the session on "
                               "another replica")
            if prefix_len == 0:
                if session is None or session.in_use == 0:
                    if session is None and len(self._sessions) >= self.max_sessions:
                        self._evict_locked(need_slot=True, requester=owner(session_id))
                    session = Session(session_id, self.new_cache())
                    self._sessions[session_id] = session
                    self.created += 1
            elif session is None:
                raise SessionLost(f"session {_name(session_id)!r} is not held here (evicted, expired or the "
                                  "service restarted); resend the whole prefix with prefix_len=0")
            self._sessions.move_to_end(session_id)
            session.in_use += 1
            return session

    def _expire_locked(self) -> None:
        now = time.monotonic()
        for sid, session in list(self._sessions.items()):
            if session.in_use == 0 and now - session.last_used > self.ttl_s:
                del self._sessions[sid]
                self.evictions += 1

    def _evict_locked(self, need_slot: bool, requester: Hashable = None) -> None:
        """Evict idle sessions until the bounds hold, taking from the callers that hold the most.

        Sessions belong to callers (keys are (caller, id) pairs; plain ids are one caller). A caller's
        fair share is the budget (bytes, and sessions) over the callers holding sessions, the requester
        of a new one included. Only idle sessions of callers at or above their share are evicted, the
        furthest above first, least recently used within a caller: one caller keeping many sessions warm
        cannot push another's out every round. When nothing may be evicted, a caller below its share gets
        its new session anyway (the bounds are exceeded until an over-share caller's session goes idle and
        is evicted); one at or above its share is refused. With a single caller this is plain LRU."""
        while True:
            used = sum(s.nbytes for s in self._sessions.values())
            over_bytes = used > self.max_bytes
            over_slots = len(self._sessions) >= self.max_sessions if need_slot else len(self._sessions) > self.max_sessions
            if not (over_bytes or over_slots):
                return
            counts: Counter = Counter()
            held: Counter = Counter()
            for key, session in self._sessions.items():
                counts[owner(key)] += 1
                held[owner(key)] += session.nbytes
            callers = set(counts) | ({requester} if need_slot else set())

            def weight(caller) -> float:  # how far above its share (>= 1: at or above)
                w = 0.0
                if over_bytes:
                    w = held[caller] * len(callers) / max(1, self.max_bytes)
                if over_slots:
                    w = max(w, counts[caller] * len(callers) / max(1, self.max_sessions))
                return w

            victim, heaviest = None, 0.0
            for key, session in self._sessions.items():  # least recently used first: ties keep the oldest
                if session.in_use:
                    continue
                w = weight(owner(key))
                if w >= 1.0 and w > heaviest:
                    victim, heaviest = key, w
            if victim is None:
                break
            del self._sessions[victim]
            self.evictions += 1
        if (need_slot and weight(requester) < 1.0 and len(self._sessions) < self.max_sessions + headroom(self.max_sessions)
                and sum(s.nbytes for s in self._sessions.values()) <= self.max_bytes):
            return  # below its share: admitted over the bound, taken back from the heaviest caller later
        if need_slot:
            raise ResourceExhausted(
                f"session memory is full: {len(self._sessions)} sessions in use hold "
                f"{sum(s.nbytes for s in self._sessions.values()) >> 20} MiB of a {self.max_bytes >> 20} MiB "
                f"budget (max {self.max_sessions} sessions) and none is idle, this caller holding "
                f"{counts[requester]} of them (its share: {self.max_sessions // max(1, len(callers))}); retry "
                "later or raise --session-memory-mb / --max-sessions")

    def _enforce_budget(self) -> None:
        with self._lock:
            self._evict_locked(need_slot=False)  # what is left over waits for a heavy caller's session to go idle
