"""Listening: bind a server's port with TLS or in plaintext, and the plaintext health port for probes.

Kubernetes' gRPC probes speak neither TLS nor API keys, so a TLS server can also serve the health
service alone, in plaintext, on a port of its own. It shares the main server's HealthServicer, so a
draining server reports NOT_SERVING on both.
"""

from __future__ import annotations

import socket
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from transport.tls import TLSSettings, server_credentials


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS's choice), for a process that must be told its port up front:
    it can be taken before that process binds it, so callers that can bind port 0 themselves should."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def listen(server: grpc.Server, host: str, port: int, tls: TLSSettings | None = None) -> int:
    """Bind host:port (0: a free port) with TLS when `tls` has a certificate and key; the bound port."""
    address = f"{host}:{port}"
    if tls is not None:
        tls.check()
    if tls is not None and tls.serves_tls:
        bound = server.add_secure_port(address, server_credentials(tls))
    else:
        bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind {address}")
    return bound


def serve_health(servicer: health.HealthServicer, host: str, port: int) -> tuple[grpc.Server, int]:
    """A plaintext server with only grpc.health.v1.Health on host:port; (server, bound port), started."""
    # A few threads: a Watch call holds one for as long as it lasts.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="health"),
                         options=[("grpc.max_receive_message_length", 64 << 10)])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    bound = listen(server, host, port)
    server.start()
    return server, bound
