"""Dialling a service: a plain channel, or one that follows its TLS files and API key file.

A gRPC channel's credentials are fixed when it is made, so a client certificate rotates by making a new
channel. `ManagedChannel` is a `grpc.Channel` whose stubs' calls go to the channel of the moment: at most
every `reload_interval_s` a call stats the files (no read unless they changed), and when the TLS files
changed it builds a new channel for the calls that follow. The old channel is closed `retire_after_s`
later, so calls in flight on it finish. It also adds `authorization: Bearer <key>` to every call when it
is given a key file (the first key in it; re-read on change like the certificates).

Without TLS and without a key, `dial` returns the plain `grpc.insecure_channel`, as before.
"""

from __future__ import annotations

import logging
import threading
import time

import grpc

from transport.api_keys import bearer_metadata, parse_keys
from transport.tls import TLSSettings, WatchedFiles, channel_credentials, channel_options, watch

log = logging.getLogger(__name__)


def dial(address: str, tls: TLSSettings | None = None, options=(), api_key_file: str | None = None) -> grpc.Channel:
    """A channel to `address`: TLS when `tls` names a CA or a client certificate, an API key on every call
    when `api_key_file` is given."""
    tls = tls or TLSSettings()
    if not tls.dials_tls and not api_key_file:
        return grpc.insecure_channel(address, options=list(options))
    if api_key_file and not tls.dials_tls:
        log.warning("sending the key of %s to %s over plaintext: anyone on the path can read it; give --tls-ca",
                    api_key_file, address)
    return ManagedChannel(address, tls, options, api_key_file)


def _first_key(contents: dict[str, bytes]) -> str:
    keys = parse_keys(contents["key"].decode("utf-8"))
    if not keys:
        raise ValueError("the API key file holds no key")
    return keys[0]


class ManagedChannel(grpc.Channel):
    def __init__(self, address: str, tls: TLSSettings, options=(), api_key_file: str | None = None,
                 retire_after_s: float = 120.0):
        if bool(tls.cert) != bool(tls.key):
            raise ValueError("--tls-cert and --tls-key go together (the client certificate and its key)")
        self.address = address
        self.tls = tls
        self.options = [*options, *channel_options(tls)]
        self.retire_after_s = retire_after_s
        self._tls_files = watch(tls) if tls.dials_tls else None
        self._key_file = WatchedFiles({"key": api_key_file}, _first_key) if api_key_file else None
        self._lock = threading.Lock()
        self._retired: list[tuple[grpc.Channel, float]] = []
        self._next_check = time.monotonic() + tls.reload_interval_s
        # (generation, channel, metadata added to each call), replaced whole so readers need no lock
        self._state = (0, self._build(), self._key_metadata())
        self.rebuilds = 0

    def _build(self) -> grpc.Channel:
        if self._tls_files is None:
            return grpc.insecure_channel(self.address, options=self.options)
        return grpc.secure_channel(self.address, channel_credentials(self._tls_files.contents), options=self.options)

    def _key_metadata(self) -> tuple:
        return bearer_metadata(_first_key(self._key_file.contents)) if self._key_file else ()

    def current(self) -> tuple:
        now = time.monotonic()
        if now >= self._next_check:
            self._refresh(now)
        return self._state

    def _refresh(self, now: float) -> None:
        with self._lock:
            if now < self._next_check:
                return
            self._next_check = now + self.tls.reload_interval_s
            while self._retired and self._retired[0][1] <= now:
                self._retired.pop(0)[0].close()
            generation, channel, metadata = self._state
            tls_changed = self._tls_files is not None and self._tls_files.poll() is not None
            key_changed = self._key_file is not None and self._key_file.poll() is not None
            if not (tls_changed or key_changed):
                return
            if tls_changed:
                self._retired.append((channel, now + self.retire_after_s))
                channel = self._build()
                self.rebuilds += 1
            self._state = (generation + 1, channel, self._key_metadata())

    def unary_unary(self, method, request_serializer=None, response_deserializer=None, **kwargs):
        return _UnaryUnary(self, "unary_unary", method, request_serializer, response_deserializer, kwargs)

    def unary_stream(self, method, request_serializer=None, response_deserializer=None, **kwargs):
        return _Streaming(self, "unary_stream", method, request_serializer, response_deserializer, kwargs)

    def stream_unary(self, method, request_serializer=None, response_deserializer=None, **kwargs):
        return _UnaryUnary(self, "stream_unary", method, request_serializer, response_deserializer, kwargs)

    def stream_stream(self, method, request_serializer=None, response_deserializer=None, **kwargs):
        return _Streaming(self, "stream_stream", method, request_serializer, response_deserializer, kwargs)

    def subscribe(self, callback, try_to_connect=False):
        self.current()[1].subscribe(callback, try_to_connect)

    def unsubscribe(self, callback):
        self.current()[1].unsubscribe(callback)

    def close(self):
        with self._lock:
            for channel, _ in self._retired:
                channel.close()
            self._retired.clear()
            self._state[1].close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class _Dispatch:
    """A multi-callable that resolves to the managed channel's current channel at each call."""

    def __init__(self, owner: ManagedChannel, kind: str, method, request_serializer, response_deserializer,
                 kwargs: dict):
        self._owner = owner
        self._make = (kind, method, request_serializer, response_deserializer, kwargs)
        self._bound = (-1, None)

    def _resolve(self, metadata):
        generation, channel, extra = self._owner.current()
        bound_generation, inner = self._bound
        if bound_generation != generation:
            kind, method, request_serializer, response_deserializer, kwargs = self._make
            inner = getattr(channel, kind)(method, request_serializer, response_deserializer, **kwargs)
            self._bound = (generation, inner)
        if extra:
            metadata = (*(metadata or ()), *extra)
        return inner, metadata


class _UnaryUnary(_Dispatch, grpc.UnaryUnaryMultiCallable, grpc.StreamUnaryMultiCallable):
    def __call__(self, request, timeout=None, metadata=None, credentials=None, wait_for_ready=None,
                 compression=None):
        inner, metadata = self._resolve(metadata)
        return inner(request, timeout=timeout, metadata=metadata, credentials=credentials,
                     wait_for_ready=wait_for_ready, compression=compression)

    def with_call(self, request, timeout=None, metadata=None, credentials=None, wait_for_ready=None,
                  compression=None):
        inner, metadata = self._resolve(metadata)
        return inner.with_call(request, timeout=timeout, metadata=metadata, credentials=credentials,
                               wait_for_ready=wait_for_ready, compression=compression)

    def future(self, request, timeout=None, metadata=None, credentials=None, wait_for_ready=None,
               compression=None):
        inner, metadata = self._resolve(metadata)
        return inner.future(request, timeout=timeout, metadata=metadata, credentials=credentials,
                            wait_for_ready=wait_for_ready, compression=compression)


class _Streaming(_Dispatch, grpc.UnaryStreamMultiCallable, grpc.StreamStreamMultiCallable):
    def __call__(self, request, timeout=None, metadata=None, credentials=None, wait_for_ready=None,
                 compression=None):
        inner, metadata = self._resolve(metadata)
        return inner(request, timeout=timeout, metadata=metadata, credentials=credentials,
                     wait_for_ready=wait_for_ready, compression=compression)
