"""API keys: a server interceptor that admits calls carrying `authorization: Bearer <key>` for a key in
the key file, and the metadata a client sends.

The key file holds one key per line (several, so keys rotate with an overlap); blank lines and `#`
comments are ignored. It is re-read when it changes (checked at most once per `reload_interval_s`).
Keys live in memory only as SHA-256 digests and are compared in constant time (`hmac.compare_digest`,
against every key, so the time says nothing about which key nearly matched). Health checking and
reflection stay open: Kubernetes probes carry no key.

The refusal happens before the request is parsed: the replacement handler reads the request as raw
bytes (no deserializer) and aborts with UNAUTHENTICATED.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time

import grpc

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")
HOW_TO_SEND = ("send metadata 'authorization: Bearer <key>' (SDK: Client(address, api_key=...); CLI: "
               "specdec generate --api-key or SPECDEC_API_KEY; an orchestrator calling its services: "
               "--service-api-key-file)")


def bearer_metadata(key: str) -> tuple[tuple[str, str], ...]:
    return ((AUTHORIZATION, f"Bearer {key}"),)


def parse_keys(text: str) -> list[str]:
    keys = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(line)
    return keys


def read_key_file(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return parse_keys(f.read())


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeys:
    """The accepted keys, as digests, following the key file."""

    def __init__(self, path: str, reload_interval_s: float = 1.0):
        self.path = path
        self.reload_interval_s = reload_interval_s
        keys = read_key_file(path)  # a missing or unreadable file at startup is the operator's to fix
        if not keys:
            raise ValueError(f"--api-key-file {path} holds no key (one per line; '#' starts a comment)")
        self._digests = [_digest(k) for k in keys]
        self._signature = self._stat()
        self._next_check = time.monotonic() + reload_interval_s
        self._lock = threading.Lock()

    def _stat(self):
        try:
            st = os.stat(self.path)
            return st.st_mtime_ns, st.st_size, st.st_ino
        except OSError:
            return None

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        with self._lock:
            if now < self._next_check:
                return
            self._next_check = now + self.reload_interval_s
            signature = self._stat()
            if signature == self._signature:
                return
            try:
                keys = read_key_file(self.path)
            except OSError as error:  # mid-swap: keep the keys we have, try again next time
                log.warning("API key file %s unreadable (%s); keeping the previous keys", self.path, error)
                return
            self._signature = signature
            self._digests = [_digest(k) for k in keys]
            if keys:
                log.info("API key file %s reloaded: %d keys", self.path, len(keys))
            else:
                log.warning("API key file %s now holds no key: every call is refused", self.path)

    def accepts(self, key: str) -> bool:
        self._maybe_reload()
        candidate = _digest(key)
        accepted = False
        for digest in self._digests:
            accepted |= hmac.compare_digest(candidate, digest)
        return accepted


def presented_key(metadata) -> str | None:
    """The key of an `authorization: Bearer <key>` entry, or None."""
    for name, value in metadata or ():
        if name == AUTHORIZATION and isinstance(value, str):
            scheme, _, key = value.partition(" ")
            if scheme.lower() == "bearer" and key.strip():
                return key.strip()
    return None


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    def abort(_request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    # No request deserializer: a refused call's request is never parsed.
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort, response_serializer=handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort, response_serializer=handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort, response_serializer=handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(abort, response_serializer=handler.response_serializer)


class ApiKeyInterceptor(grpc.ServerInterceptor):
    def __init__(self, keys: ApiKeys):
        self.keys = keys

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_SERVICES):
            return continuation(handler_call_details)
        key = presented_key(handler_call_details.invocation_metadata)
        if key is not None and self.keys.accepts(key):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if key is None:
            return _deny(handler, f"this server requires an API key: {HOW_TO_SEND}")
        return _deny(handler, "API key not accepted: it is not in the server's --api-key-file (keys are "
                              f"compared exactly; check for a stray character or a rotated key); {HOW_TO_SEND}")
