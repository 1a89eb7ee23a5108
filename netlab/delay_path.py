"""The path between an orchestrator in the root namespace and its services, with a settable one-way delay.

With namespaces (root, `ip`): each service runs in its own namespace, linked by a veth pair to a hub
namespace; the relay runs in the hub and listens on Unix sockets, which the root namespace can reach
because they live in the file system, so nothing is added to the root namespace's network. The delay is
netem's on the veths where the kernel has it (the relay then holds nothing), else the relay's.
Without namespaces: services on loopback, the relay on loopback in front of them, and `note` says why.

Knows addresses, namespaces and the relay, not what the services are.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from netlab.netns import NamespaceError, Topology, topology
from netlab.relay_process import RelayProcess
from transport import free_port

SERVICE_PORT = 50051  # each service has a namespace of its own, so they can share a port number


@dataclass
class DelayPath:
    isolation: str  # "netns" | "loopback"
    method: str  # "netem" | "relay": what adds the delay
    note: str  # why loopback, or how the namespaces are laid out
    bind: dict[str, tuple[str, int]]  # service -> (host, port) it listens on
    prefix: dict[str, list[str]]  # service -> command prefix that starts it in place (ip netns exec ...)
    reach: dict[str, str]  # service -> address the orchestrator dials
    relay: RelayProcess
    topology: Topology | None = None
    delay_ms: float = field(default=0.0)

    def set_delay(self, delay_ms: float) -> None:
        if self.method == "netem":
            self.topology.set_netem(delay_ms)
        else:
            self.relay.set_delay(delay_ms)
        self.delay_ms = delay_ms


@contextmanager
def _netns_path(services: list[str], sockets: Path) -> Iterator[DelayPath]:
    with topology(services) as topo:
        routes = [(f"unix:{sockets / f'{s}.sock'}", f"{topo.links[s].address}:{SERVICE_PORT}") for s in services]
        with RelayProcess(routes, sockets / "relay.ctl", prefix=topo.exec_prefix(topo.hub)) as relay:
            netem = topo.set_netem(0)
            method = "netem" if netem else "relay"
            note = (f"services in namespaces {', '.join(topo.links[s].namespace for s in services)}, veth pairs to "
                    f"{topo.hub}; delay by {'tc netem on the veths' if netem else 'the relay in ' + topo.hub}"
                    + ("" if netem else " (this kernel has no netem qdisc)"))
            yield DelayPath("netns", method, note, {s: (topo.links[s].address, SERVICE_PORT) for s in services},
                            {s: topo.exec_prefix(topo.links[s].namespace) for s in services},
                            {s: str(a) for s, a in zip(services, relay.bound)}, relay, topo)


@contextmanager
def _loopback_path(services: list[str], sockets: Path, why: str) -> Iterator[DelayPath]:
    ports = {s: free_port() for s in services}
    routes = [("127.0.0.1:0", f"127.0.0.1:{ports[s]}") for s in services]
    with RelayProcess(routes, sockets / "relay.ctl") as relay:
        yield DelayPath("loopback", "relay", f"network namespaces unavailable ({why}); relay on loopback",
                        {s: ("127.0.0.1", ports[s]) for s in services}, {s: [] for s in services},
                        {s: str(a) for s, a in zip(services, relay.bound)}, relay)


@contextmanager
def delay_path(services: list[str], isolation: str = "auto") -> Iterator[DelayPath]:
    """isolation: "netns" (fail without namespaces), "loopback", or "auto" (namespaces when they can be made)."""
    # Unix socket paths are limited to ~100 bytes: keep them in a short temporary directory.
    with tempfile.TemporaryDirectory(prefix="sd-") as directory:
        sockets = Path(directory)
        if isolation == "loopback":
            with _loopback_path(services, sockets, "loopback asked for") as path:
                yield path
            return
        why = None
        with contextlib.ExitStack() as stack:
            try:
                path = stack.enter_context(_netns_path(services, sockets))
            except NamespaceError as error:
                if isolation == "netns":
                    raise
                why = str(error)
            if why is None:
                yield path
                return
        with _loopback_path(services, sockets, why) as path:
            yield path
