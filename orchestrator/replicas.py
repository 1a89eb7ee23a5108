"""The replicas of one role (draft or verify) behind the orchestrator, and the binding of sessions to them.

`--verify` / `--draft` name a replica set: one HOST:PORT, several comma-separated, or `dns:///NAME:PORT`
(every address NAME resolves to, as a Kubernetes headless Service publishes its ready pods). Each address
gets its own channel, so each pod is reached directly: behind one ClusterIP address, a channel's one HTTP/2
connection would carry every call to whichever pod it reached.

A background refresher re-resolves dns:/// names and asks every replica for its ModelInfo (which carries
its load) every `resolve_interval_s`, and at once after a replica failed. A replica takes new sessions
only while it answers, serves what the role should (every verify replica the same target, every draft
replica a draft the target can pair with) and is not draining. Replies to Propose / Verify carry the
replica's load too, so between polls the loads are as fresh as the last call.

Sessions are bound here and only here (`bind`, `unbind`): the choice is replica_routing.choose_replica.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import re
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from opentelemetry import metrics

from orchestrator.replica_routing import ReplicaView, choose_replica
from specdec_api import common_pb2

log = logging.getLogger(__name__)

DNS_SCHEME = "dns:///"
# gRPC target schemes given to the channel as they are, one replica each (a unix socket: one local process).
PASSED_SCHEMES = ("unix:", "unix-abstract:", "ipv4:", "ipv6:")
PROBE_TIMEOUT_S = 2.0
DOWN_RETRY_S = 1.0  # how soon a replica that did not answer is probed again
SUSPECT_HOLD_S = 30.0  # a replica that hung or failed a call takes no new session for this long
RELEASE_TIMEOUT_S = 1.0  # a session's release on a replica it left
SPEED_MIN_SAMPLES = 4  # decode calls measured before a replica's speed counts (one or two say little)
SPEED_WINDOW = 16  # a replica's speed: the least compute per step and session among its last this many decode calls
SPEED_TTL_S = 30.0  # a speed not measured again for this long is forgotten (the replica may have changed)
LOAD_TTL_S = 1.0  # others' sessions and the queue a replica reported count this long (they go stale: see docs)
PREFILL_TOKENS = 32  # calls feeding more tokens than this (or a session's first) are prefills: no speed from them


_live_sets: weakref.WeakSet = weakref.WeakSet()  # the sets the gauges below report on


def _observer(value: Callable[[int, bool], int]):
    """A gauge callback: value(sessions bound, takes new sessions) for every replica of every live set."""
    def observe(_options):
        for replicas in list(_live_sets):
            for address, bound, up in replicas.snapshot():
                yield metrics.Observation(value(bound, up), {"role": replicas.role, "replica": address})
    return observe


_meter = metrics.get_meter("specdec.orchestrator")
_meter.create_observable_gauge("specdec.replica.sessions", [_observer(lambda bound, _up: bound)], unit="{session}",
                               description="sessions this orchestrator has bound to each replica")
_meter.create_observable_gauge("specdec.replica.up", [_observer(lambda _bound, up: int(up))], unit="1",
                               description="1 while a replica takes new sessions (answering, right model, not draining)")


class IncompatibleReplica(RuntimeError):
    """A replica serves something the others of its role do not: it takes no session."""


@dataclass(frozen=True)
class ReplicaTargets:
    """What `--verify` / `--draft` named: fixed addresses, or a name to resolve."""
    addresses: tuple[str, ...] = ()
    dns_host: str | None = None
    dns_port: int = 0

    @property
    def resolved(self) -> bool:
        return self.dns_host is not None


def parse_targets(spec: str, flag: str) -> ReplicaTargets:
    """`HOST:PORT`, `A:P,B:P,...` or `dns:///NAME:PORT` (a `unix:` socket, or another PASSED_SCHEMES
    target, is one replica as it is); ValueError with a message for the operator."""
    text = (spec or "").strip()
    if text.startswith("dns:"):
        if not text.startswith(DNS_SCHEME):
            raise ValueError(f"{flag} {spec!r}: write dns:///NAME:PORT (a DNS server authority, dns://HOST/, "
                             "is not supported: the orchestrator uses the system resolver)")
        if "," in text:
            raise ValueError(f"{flag} {spec!r}: a dns:/// name stands alone (it names every replica); list "
                             "HOST:PORT addresses, or give one name")
        host, port = _split_host_port(text[len(DNS_SCHEME):], flag, spec)
        return ReplicaTargets(dns_host=host, dns_port=port)
    addresses = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("dns:"):
            raise ValueError(f"{flag} {spec!r}: a dns:/// name stands alone (it names every replica); list "
                             "HOST:PORT addresses, or give one name")
        if not part.startswith(PASSED_SCHEMES):
            _split_host_port(part, flag, spec)
        if part not in addresses:
            addresses.append(part)
    if not addresses:
        raise ValueError(f"{flag} names no address; give HOST:PORT, several comma-separated, or dns:///NAME:PORT")
    return ReplicaTargets(addresses=tuple(addresses))


_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?")


def _split_host_port(text: str, flag: str, spec: str) -> tuple[str, int]:
    """(host, port) of `name:port`, `a.b.c.d:port` or `[ipv6]:port`; ValueError otherwise."""
    problem = f"{flag} {spec!r}: {text!r} is not HOST:PORT (a host name, an IPv4 address or [IPv6], and a port in 1..65535)"
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(problem)
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(problem) from None
        return host[1:-1], int(port)
    if not host.isascii() or not _HOST_NAME.fullmatch(host):
        raise ValueError(problem)
    return host, int(port)


def resolve_dns(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, as HOST:PORT strings (IPv6 in brackets), sorted; [] if none."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    found = set()
    for family, _type, _proto, _name, sockaddr in infos:
        ip = sockaddr[0]
        found.add(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
    return sorted(found)


class Replica:
    """One replica: its channel and stub, and what is known of it. Fields change under the set's lock."""

    def __init__(self, address: str, stub, channel: grpc.Channel | None = None):
        self.address = address
        self.stub = stub
        self.channel = channel
        self.answering = channel is None  # answered its last call or probe (a replica given as a stub: yes)
        self.refused: str | None = None  # why it may take no session (serves the wrong model)
        self.draining = False
        self.listed = True  # still among the addresses the flag names (or its name resolves to)
        self.bound = 0  # sessions bound to it now
        self.others = 0  # sessions other orchestrators held there at its last report (its count less ours)
        self.queued = 0
        self.memory_used = 0.0
        self.reported_at = 0.0  # when its load was last reported
        self.steps_ms: collections.deque[float] = collections.deque(maxlen=SPEED_WINDOW)
        self.service_at = 0.0  # when steps_ms was last added to
        self.last_error = ""
        self.last_code: grpc.StatusCode | None = None
        self.instance = ""  # the process its checked ModelInfo came from (ReplicaLoad.instance)
        self.suspect_until = 0.0  # hung or failed a call: no new session before this (time.monotonic)

    @property
    def service_ms(self) -> float | None:
        """Its speed: the least compute per model step and session of its recent decode calls. The least, not
        the mean: a busy host (other processes, a shared GIL, a noisy neighbour) only ever adds time, so the
        least of a window is what the replica's hardware does, and identical replicas read alike."""
        return min(self.steps_ms) if len(self.steps_ms) >= SPEED_MIN_SAMPLES else None

    def takes_sessions(self) -> bool:
        return self.listed and self.refused is None and not self.draining

    def takes_new_sessions(self, now: float, require_answering: bool = True) -> bool:
        """Whether a new session may bind here now: it takes sessions and (unless not required) answered
        lately and is not held back after a failed call."""
        return self.takes_sessions() and (not require_answering or (self.answering and now >= self.suspect_until))

    def view(self, require_answering: bool = True) -> ReplicaView:
        now = time.monotonic()
        fresh = now - self.service_at < SPEED_TTL_S
        # Our own sessions are counted exactly (bound); others' and the queue only from a recent report:
        # their sessions may have ended since, which we learn only from its next reply or poll.
        recent = now - self.reported_at < LOAD_TTL_S
        return ReplicaView(self.address, self.bound, self.bound + self.others if recent else 0,
                           self.queued if recent else 0, self.memory_used,
                           self.service_ms if fresh else None, self.takes_new_sessions(now, require_answering))

    def __repr__(self) -> str:
        return f"Replica({self.address})"


class ReplicaSet:
    """The replicas of one role: resolving, probing, loads, and session binding."""

    def __init__(self, role: str, targets: ReplicaTargets, open_channel: Callable[[str], grpc.Channel],
                 make_stub: Callable[[grpc.Channel], object],
                 check_info: Callable[[common_pb2.ModelInfo, common_pb2.ModelInfo | None], None] | None = None,
                 resolve_interval_s: float = 10.0, resolver: Callable[[str, int], list[str]] = resolve_dns,
                 may_follow: Callable[[common_pb2.ModelInfo, common_pb2.ModelInfo], bool] | None = None):
        """check_info(info, reference) raises IncompatibleReplica (or the deployment's IncompatibleModels)
        when a replica may not serve this role; reference is the first accepted replica's info.
        may_follow(new, old): whether the role may move to a new reference once no replica hosts the old."""
        self.role = role
        self.may_follow = may_follow
        self.targets = targets
        self.open_channel = open_channel
        self.make_stub = make_stub
        self.check_info = check_info
        self.resolve_interval_s = resolve_interval_s
        self.resolver = resolver
        self.reference: common_pb2.ModelInfo | None = None
        self.epoch = 0  # counts the references followed (a rolling update to new weights): see SessionClient
        self._replicas: dict[str, Replica] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._refresher: threading.Thread | None = None
        self._probe_pool = ThreadPoolExecutor(8, thread_name_prefix=f"{role}-probe")

    @classmethod
    def of_stubs(cls, role: str, stubs: dict[str, object]) -> ReplicaSet:
        """A set of replicas given as ready stubs (no channels, no refresher): for in-process fakes."""
        replicas = cls(role, ReplicaTargets(tuple(stubs)), open_channel=None, make_stub=None)
        for address, stub in stubs.items():
            replicas._replicas[address] = Replica(address, stub)
        return replicas

    # -- membership ------------------------------------------------------------------------------
    def _addresses(self) -> list[str]:
        if self.targets.resolved:
            return self.resolver(self.targets.dns_host, self.targets.dns_port)
        return list(self.targets.addresses)

    def _update_membership(self) -> None:
        addresses = self._addresses()
        if self.targets.resolved and not addresses:
            # A name that resolves to nothing for a moment (every pod restarting, a DNS hiccup) keeps
            # the replicas it had: their own failures, not the resolver's silence, take them out.
            return
        to_close = []
        with self._lock:
            for address in addresses:
                replica = self._replicas.get(address)
                if replica is None:
                    channel = self.open_channel(address)
                    self._replicas[address] = Replica(address, self.make_stub(channel), channel)
                    log.info("%s replica %s joined", self.role, address)
                elif not replica.listed:
                    replica.listed = True
            for address, replica in list(self._replicas.items()):
                if address not in addresses and replica.listed:
                    replica.listed = False
                    log.info("%s replica %s left the set (%d sessions still bound)", self.role, address,
                             replica.bound)
                if not replica.listed and replica.bound == 0:
                    del self._replicas[address]
                    to_close.append(replica)
        for replica in to_close:
            if replica.channel is not None:
                replica.channel.close()

    def _probe(self, replica: Replica) -> common_pb2.ModelInfo | None:
        """Its ModelInfo, or None (recorded as not answering)."""
        try:
            return replica.stub.GetModelInfo(common_pb2.GetModelInfoRequest(), timeout=PROBE_TIMEOUT_S)
        except grpc.RpcError as error:
            with self._lock:
                replica.answering = False
                replica.last_error = f"{error.code().name}: {error.details()}"
                replica.last_code = error.code()
            return None

    def _accept(self, replica: Replica, info: common_pb2.ModelInfo) -> None:
        """A probe's answer: may the replica serve this role (the first accepted sets the reference)?"""
        problem = None
        if self.check_info is not None:
            try:
                self.check_info(info, self.reference)
            except Exception as error:  # noqa: BLE001 - IncompatibleReplica / IncompatibleModels: a refusal
                problem = str(error)
        with self._lock:
            if problem is None and self.reference is None:
                self.reference = info
            if problem and replica.refused != problem:
                log.error("%s replica %s takes no session: %s", self.role, replica.address, problem)
            replica.refused = problem
            replica.instance = "" if problem else info.load.instance
            replica.answering = True
            replica.last_error = ""
            self._take_load(replica, info.load)

    def refresh(self) -> None:
        """Re-resolve (dns:///) and probe every replica now (in parallel). Answers are judged in the order
        the flag lists the addresses (a resolved name: sorted), so that when replicas disagree, the one the
        role's reference comes from is the same on every orchestrator and every start: the first listed."""
        self._update_membership()
        order = {address: i for i, address in enumerate(self.targets.addresses)}
        with self._lock:
            replicas = sorted((r for r in self._replicas.values() if r.channel is not None),
                              key=lambda r: (order.get(r.address, len(order)), r.address))
        answers = [self._probe_pool.submit(self._probe, r) for r in replicas]
        infos = [(replica, answer.result()) for replica, answer in zip(replicas, answers)]
        for replica, info in infos:
            if info is not None:
                self._accept(replica, info)
        self._follow_an_update(infos)

    def _follow_an_update(self, infos) -> None:
        """When every replica that answers hosts something other than the role's reference (a rolling update
        to new weights has replaced them all), the first of them becomes the reference, provided
        `may_follow(new, old)` allows it (the orchestrator's tokenizer and limits still hold), and all are
        judged again. Until then sessions stay on the replicas that match: a generation never mixes
        models."""
        answered = [(r, info) for r, info in infos if info is not None and r.listed]
        with self._lock:
            if self.reference is None or not answered or any(r.refused is None for r, _ in answered):
                return
        new = answered[0][1]
        if self.may_follow is None or not self.may_follow(new, self.reference):
            return
        log.warning("every %s replica now hosts %r (weights %s…): it becomes the reference", self.role, new.model,
                    new.weights_fingerprint[:12])
        with self._lock:
            self.reference = None
            self.epoch += 1
        for replica, info in answered:
            self._accept(replica, info)

    def wait_ready(self, timeout_s: float, hint: Callable[[grpc.StatusCode | None], str] = lambda code: "",
                   refusal: type[Exception] = ConnectionError) -> common_pb2.ModelInfo:
        """Block until some replica takes sessions; its ModelInfo (the role's reference). `refusal` (with
        the reason) as soon as every replica that answered was refused and none is left to wait for;
        ConnectionError naming every address, its last error and `hint(code)` when none is ready within
        timeout_s."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.refresh()
            with self._lock:
                known = sorted(self._replicas.values(), key=lambda r: r.address)
                if self.reference is not None and any(r.answering and r.takes_sessions() for r in known):
                    return self.reference
                refused = [r for r in known if r.refused]
            if known and len(refused) == len(known):
                raise refusal(f"{self.role} service at {self._named()}: {refused[0].refused}")
            if time.monotonic() >= deadline:
                raise ConnectionError(self._not_ready_message(known, hint))
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    def _named(self) -> str:
        if self.targets.resolved:
            return f"dns:///{self.targets.dns_host}:{self.targets.dns_port}"
        return ",".join(self.targets.addresses)

    def _not_ready_message(self, known: list[Replica], hint) -> str:
        if not known:
            return f"{self.role} service at {self._named()}: the name resolves to no address"
        parts = []
        for r in known:
            why = r.refused or r.last_error or "no answer"
            extra = "" if r.refused else hint(r.last_code)
            parts.append(f"{r.address}: {why}" + (f" ({extra})" if extra else ""))
        return f"{self.role} service at {self._named()}: no replica is ready; " + "; ".join(parts)

    def start(self) -> None:
        """The refresher: every resolve_interval_s, or at once after a replica failed."""
        _live_sets.add(self)
        if self._refresher is None and self.open_channel is not None:
            self._refresher = threading.Thread(target=self._refresh_loop, name=f"{self.role}-replicas", daemon=True)
            self._refresher.start()

    def _refresh_loop(self) -> None:
        while not self._closed.is_set():
            # A replica that does not answer (not up yet, restarting) is looked at again within a second.
            with self._lock:
                waiting = any(r.listed and not r.answering for r in self._replicas.values())
            self._wake.wait(min(self.resolve_interval_s, DOWN_RETRY_S) if waiting else self.resolve_interval_s)
            self._wake.clear()
            if self._closed.is_set():
                return
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the refresher must outlive one bad round (logged)
                log.exception("%s replicas: refresh failed", self.role)
            time.sleep(0.1)  # a burst of failures asks for one refresh, not one each

    def close(self) -> None:
        _live_sets.discard(self)
        self._closed.set()
        self._wake.set()
        if self._refresher is not None:
            self._refresher.join(timeout=PROBE_TIMEOUT_S + 1)
        self._probe_pool.shutdown(wait=False)
        with self._lock:
            replicas = list(self._replicas.values())
        for replica in replicas:
            if replica.channel is not None:
                replica.channel.close()

    # -- sessions --------------------------------------------------------------------------------
    def bind(self, session_key: str, exclude: Iterable[str] = ()) -> Replica | None:
        """The replica a session starts on (or moves to), counted as bound to it; None when none can
        take it. Replicas that did not answer lately are chosen only when no other can be: a lone
        replica that is restarting is still worth waiting for."""
        excluded = set(exclude)  # addresses
        with self._lock:
            candidates = [r for r in self._replicas.values() if r.address not in excluded]
            address = choose_replica(session_key, [r.view() for r in candidates])
            if address is None:
                address = choose_replica(session_key, [r.view(require_answering=False) for r in candidates])
            if address is None:
                return None
            replica = self._replicas[address]
            replica.bound += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s: session %s bound to %s among %s", self.role, session_key[:8], address,
                          [r.view() for r in candidates])
            return replica

    def unbind(self, replica: Replica) -> None:
        close = False
        with self._lock:
            replica.bound = max(0, replica.bound - 1)
            if not replica.listed and replica.bound == 0 and self._replicas.get(replica.address) is replica:
                del self._replicas[replica.address]
                close = True
        if close and replica.channel is not None:
            replica.channel.close()

    def observe(self, replica: Replica, load: common_pb2.ReplicaLoad, compute_ms: float, steps: int,
                batch_size: int = 1, decode: bool = True) -> None:
        """A reply's load, and (a decode call: not a session's first, nor one feeding more than
        PREFILL_TOKENS) its compute for `steps` model steps in passes shared by `batch_size` sessions. Speed
        is measured on decode calls only (a prefill's compute, or time spent queued, says nothing of how
        fast the replica steps, and a replica judged slow on such a call would get no session to re-measure
        it), per session of the pass, so that a busy replica does not look slow for being busy: its sessions
        are counted apart."""
        with self._lock:
            replica.answering = True
            self._take_load(replica, load)
            if decode and compute_ms > 0 and steps > 0:
                step_ms = compute_ms / steps / max(1, batch_size)
                if time.monotonic() - replica.service_at >= SPEED_TTL_S:
                    replica.steps_ms.clear()
                replica.steps_ms.append(step_ms)
                replica.service_at = time.monotonic()

    @staticmethod
    def _take_load(replica: Replica, load: common_pb2.ReplicaLoad) -> None:
        replica.others = max(0, load.live_sessions - replica.bound)
        replica.queued = load.queued
        replica.memory_used = load.memory_used
        replica.reported_at = time.monotonic()
        replica.draining = load.draining

    def failed(self, replica: Replica, draining: bool = False, hold: bool = False) -> None:
        """A call found the replica gone (UNAVAILABLE), draining, or (hold) hung or failing: no new session
        goes there until a probe finds it back (after a hold, not for SUSPECT_HOLD_S either: its probe may
        answer while its model does not); the refresher looks now (a pod that went away may have a
        successor to resolve)."""
        with self._lock:
            if draining:
                replica.draining = True
            else:
                replica.answering = False
            if hold:
                replica.suspect_until = time.monotonic() + SUSPECT_HOLD_S
        self._wake.set()

    def others_take_sessions(self, replica: Replica, exclude: Iterable[str] = ()) -> bool:
        """Whether another replica (not in `exclude`) could take this session now: then a failed call
        moves rather than waits."""
        excluded = set(exclude)
        now = time.monotonic()
        with self._lock:
            return any(r is not replica and r.address not in excluded and r.takes_new_sessions(now)
                       for r in self._replicas.values())

    def trusts(self, replica: Replica, instance: str) -> bool:
        """Whether a reply from process `instance` of this replica may be used: the process the set checked
        (ModelInfo), or, after a restart, a new one that a probe made now finds hosting what the role must.
        A replica found hosting something else is refused: no session goes there, and those bound there move."""
        if not instance or instance == replica.instance or replica.channel is None:
            return True
        info = self._probe(replica)
        if info is not None:
            self._accept(replica, info)
        with self._lock:
            return replica.refused is None and replica.instance == instance

    def release_elsewhere(self, replica: Replica, session_id: str) -> None:
        """Ask a replica a session left to drop its cache (best effort, in the background): a replica that
        is still up would otherwise hold it until its TTL, and a drain would wait for it."""
        def release() -> None:
            try:
                replica.stub.ReleaseSession(common_pb2.ReleaseSessionRequest(session_id=session_id),
                                            timeout=RELEASE_TIMEOUT_S)
            except grpc.RpcError:
                pass  # down: it has lost the session already
        if replica.channel is not None and not self._closed.is_set():
            try:
                self._probe_pool.submit(release)
            except RuntimeError:  # the pool shut down meanwhile (the orchestrator is stopping)
                pass

    def lone(self) -> bool:
        """At most one replica can take sessions: its calls may wait for it to come back (wait_for_ready)."""
        with self._lock:
            return sum(1 for r in self._replicas.values() if r.takes_sessions()) <= 1

    def channels(self) -> list[grpc.Channel]:
        """Every replica's channel now (replicas come and go with dns:/// names)."""
        with self._lock:
            return [r.channel for r in self._replicas.values() if r.channel is not None]

    def snapshot(self) -> list[tuple[str, int, bool]]:
        """(address, sessions bound, takes new sessions now) per replica, for reports and tests."""
        now = time.monotonic()
        with self._lock:
            return [(r.address, r.bound, r.takes_new_sessions(now))
                    for r in sorted(self._replicas.values(), key=lambda r: r.address)]

    def describe(self) -> list[str]:
        """One line per replica saying whether it takes sessions and, if not, why: for error messages."""
        now = time.monotonic()
        lines = []
        with self._lock:
            for r in sorted(self._replicas.values(), key=lambda r: r.address):
                if r.refused:
                    why = f"refused: {r.refused}"
                elif r.draining:
                    why = "draining"
                elif not r.listed:
                    why = "no longer listed"
                elif now < r.suspect_until:
                    why = f"held back after a failed call ({r.last_error or 'hung or failing'})"
                elif not r.answering:
                    why = f"not answering ({r.last_error or 'down'})"
                else:
                    why = "up"
                lines.append(f"{r.address}: {why}")
        return lines
