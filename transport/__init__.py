"""Security by configuration, the same on every role: how a process listens (TLS or plaintext, a
plaintext health port for probes, API keys) and how it dials (TLS with a client identity, an API key),
with certificates and keys re-read when their files change.

Every role goes through here: service_common/server.py's start_server listens with `listen`, the
orchestrator dials its services with `dial`.
"""

from transport.api_keys import ApiKeyInterceptor, ApiKeys, bearer_metadata
from transport.channel import ManagedChannel, dial
from transport.server import free_port, listen, serve_health
from transport.tls import TLSSettings

__all__ = ["ApiKeyInterceptor", "ApiKeys", "ManagedChannel", "TLSSettings", "bearer_metadata", "dial", "free_port", "listen",
           "serve_health"]
