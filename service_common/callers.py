"""Who is calling: the key by which the model worker shares its passes and its queue between callers
(serving/model_worker.py).

- Over mutual TLS, the names on the client's certificate (its subject alternative names, else its common
  name), which only their holder can present, from whichever address it calls.
- Otherwise the peer's host without its port: every connection from one machine is one caller, so
  opening more connections buys no larger share. Clients behind one address (a NAT, a proxy, one host)
  share one share; mutual TLS is what tells them apart. An IPv6 peer is its /64: a host is usually
  given a whole /64 (SLAAC, privacy addresses, a delegated prefix) and may call from any address in it,
  so keyed by address it could pose as 2^64 callers. Hosts sharing one /64 share one share. Loopback
  (::1) stays itself.
- None when gRPC reports no peer: the worker then keys the job by its session.

Knows gRPC's peer strings and auth context, nothing of what the calls carry.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import unquote

import grpc


def caller_of(context: grpc.ServicerContext) -> str | None:
    """The caller key of a call: "tls:<names>", "ipv4:<address>", "ipv6:[<prefix>/64]" (or "ipv6:[::1]"),
    "unix:<path>"."""
    identity = tls_identity(context)
    if identity is not None:
        return identity
    try:
        peer = context.peer()
    except Exception:  # noqa: BLE001 - a context without a peer (a test double, a closed call)
        return None
    return peer_host(peer)


def tls_identity(context: grpc.ServicerContext) -> str | None:
    """The peer certificate's names ("tls:a,b", sorted), or None when the call was not authenticated
    (plaintext, or TLS without a client certificate)."""
    try:
        names = context.peer_identities()
    except Exception:  # noqa: BLE001 - no auth context on this call
        return None
    if not names:
        return None
    return "tls:" + ",".join(sorted({_text(name) for name in names}))


def peer_host(peer: str | None) -> str | None:
    """A gRPC peer string without its port: "ipv4:10.0.0.7:51234" -> "ipv4:10.0.0.7",
    "ipv6:[2001:db8:1:2:a:b:c:d]:51234" (or its %-encoded form) -> "ipv6:[2001:db8:1:2::/64]" (the /64
    it is in), "ipv6:[::1]:51234" -> "ipv6:[::1]"; an IPv4 address mapped into IPv6 is given as IPv4 (a
    dual-stack listener sees IPv4 clients that way). Other kinds ("unix:...") are kept whole."""
    if not peer:
        return None
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return peer
    rest = unquote(rest)
    if kind == "ipv6" and rest.startswith("["):
        host = rest[1:rest.find("]")] if "]" in rest else rest[1:]
    else:
        host = rest.rsplit(":", 1)[0] if kind == "ipv4" or rest.count(":") == 1 else rest
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return f"{kind}:{host}"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.version == 4:
        return f"ipv4:{address}"
    if address.is_loopback:
        return f"ipv6:[{address}]"
    return f"ipv6:[{ipaddress.IPv6Network((address, 64), strict=False)}]"


def _text(name) -> str:
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
