"""Network namespaces for a latency study: a hub namespace joined to one namespace per service by a veth pair
on a /30 of its own, plus netem delay on those links where the kernel has it.

Every interface and address is created directly inside the new namespaces, so the root namespace is never
touched (the private 10.213.x.0/30 addresses cannot collide with anything outside). Names are unique per
run; the namespaces, and with them the veths, are deleted on exit, also when the body fails. Needs root and
`ip`; NamespaceError says why it could not be done.

Knows iproute2 commands, not what runs inside the namespaces.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


class NamespaceError(RuntimeError):
    pass


@dataclass
class Link:
    namespace: str  # the service's namespace
    address: str  # the service's address, reachable from the hub
    device: str  # the service's end of the veth
    hub_address: str
    hub_device: str


@dataclass
class Topology:
    hub: str
    links: dict[str, Link] = field(default_factory=dict)

    def exec_prefix(self, namespace: str) -> list[str]:
        return ["ip", "netns", "exec", namespace]

    def set_netem(self, delay_ms: float) -> bool:
        """Delay every packet delay_ms on each end of each link (so each direction once); False without netem."""
        for link in self.links.values():
            for namespace, device in ((self.hub, link.hub_device), (link.namespace, link.device)):
                done = subprocess.run([*self.exec_prefix(namespace), "tc", "qdisc", "replace", "dev", device,
                                       "root", "netem", "delay", f"{delay_ms}ms"], capture_output=True, text=True)
                if done.returncode != 0:
                    if "unknown" in done.stderr.lower() or "no such file" in done.stderr.lower():
                        return False
                    raise NamespaceError(f"tc netem on {device}: {done.stderr.strip()}")
        return True


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise NamespaceError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")


def _unavailable() -> str | None:
    import os

    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    return None


@contextmanager
def topology(services: list[str], run_id: str | None = None) -> Iterator[Topology]:
    """Namespaces <prefix>-hub and <prefix>-<service>, each service on link 10.213.<i>.0/30 (.1 hub, .2 it)."""
    reason = _unavailable()
    if reason:
        raise NamespaceError(reason)
    prefix = f"sd{run_id or secrets.token_hex(3)}"
    made: list[str] = []
    try:
        topo = Topology(f"{prefix}-hub")
        for namespace in (topo.hub, *(f"{prefix}-{s}" for s in services)):
            _ip("netns", "add", namespace)
            made.append(namespace)
            _ip("-n", namespace, "link", "set", "lo", "up")
        for i, service in enumerate(services):
            namespace = f"{prefix}-{service}"
            link = Link(namespace, f"10.213.{i}.2", f"{prefix}{service[0]}{i}s", f"10.213.{i}.1",
                        f"{prefix}{service[0]}{i}h")
            _ip("link", "add", link.hub_device, "netns", topo.hub, "type", "veth", "peer", "name", link.device,
                "netns", namespace)
            _ip("-n", topo.hub, "addr", "add", f"{link.hub_address}/30", "dev", link.hub_device)
            _ip("-n", namespace, "addr", "add", f"{link.address}/30", "dev", link.device)
            _ip("-n", topo.hub, "link", "set", link.hub_device, "up")
            _ip("-n", namespace, "link", "set", link.device, "up")
            topo.links[service] = link
        yield topo
    finally:
        for namespace in reversed(made):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
