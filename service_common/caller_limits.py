"""A limit on calls in flight per caller, so that one caller cannot hold every handler thread.

gRPC's Python server gives each call one thread of its pool (`--max-workers`) for as long as the handler
runs: a unary call until it returns, a server stream (Generate) until the stream ends. The pool hands
threads out first come, first served, and the calls waiting for one sit in gRPC's own queue, where
nothing behind (the model worker's fair order, a GetInfo that does no work) ever sees them. One caller
with more calls outstanding than the pool has threads shuts everyone else out.

`CallerLimitInterceptor` counts each caller's calls in flight and answers RESOURCE_EXHAUSTED at once to
a call beyond `max_calls_per_caller`: the refusal holds a thread for microseconds, and the request is not
parsed (the handler it sees reads raw bytes; an admitted call's bytes are parsed after the check). With
the limit below the pool's size, no single caller can take the whole pool.

The caller (service_common/callers.py): the names on a client certificate, else the peer host (an IPv6 peer by
its /64). On the orchestrator's public API with API keys on, the API key comes first (as its SHA-256):
a key is a client, whichever address it calls from. Without a key file the key is not checked, so any
string would do and it is not used (a client could otherwise pose as any number of callers).

A slot is held until the call ends: for a stream, until the handler's generator finishes, fails, or is
closed because the client cancelled (gRPC drops the generator; its `finally` runs). Health checks and
reflection are exempt: probes must get through a flood.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import defaultdict

import grpc

from service_common.callers import caller_of
from transport.api_keys import OPEN_SERVICES, presented_key

log = logging.getLogger(__name__)

DEFAULT_MAX_WORKERS = 256  # handler threads; gRPC's pool starts them as calls need them


def default_max_calls_per_caller(max_workers: int) -> int:
    """Half the handler threads: a caller never holds more than half of them."""
    return max(1, max_workers // 2)


class CallerSlots:
    """Calls in flight per caller key, at most `limit` each (0: no limit)."""

    def __init__(self, limit: int):
        if limit < 0:
            raise ValueError(f"--max-calls-per-caller must be >= 0 (0: no limit), got {limit}")
        self.limit = limit
        self._in_flight: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self.refused = 0

    def acquire(self, key: str) -> bool:
        with self._lock:
            held = self._in_flight[key]
            if self.limit and held >= self.limit:
                self.refused += 1
                if not held:
                    del self._in_flight[key]
                return False
            self._in_flight[key] = held + 1
            return True

    def release(self, key: str) -> None:
        with self._lock:
            held = self._in_flight.get(key, 0) - 1
            if held > 0:
                self._in_flight[key] = held
            else:
                self._in_flight.pop(key, None)

    def in_flight(self, key: str | None = None) -> int:
        with self._lock:
            if key is None:
                return sum(self._in_flight.values())
            return self._in_flight.get(key, 0)


class CallerLimitInterceptor(grpc.ServerInterceptor):
    """RESOURCE_EXHAUSTED at once for a caller's call beyond `max_calls_per_caller` in flight.

    `by_api_key`: the caller is the call's API key (SHA-256 of `authorization: Bearer <key>`) when it
    has one; set it only where keys are checked before this interceptor runs (ApiKeyInterceptor)."""

    def __init__(self, max_calls_per_caller: int, by_api_key: bool = False, refusal_log_interval_s: float = 5.0):
        self.slots = CallerSlots(max_calls_per_caller)
        self.by_api_key = by_api_key
        self._log_interval_s = refusal_log_interval_s
        self._next_log = 0.0
        self._unlogged = 0
        self._log_lock = threading.Lock()

    @property
    def limit(self) -> int:
        return self.slots.limit

    def caller_key(self, metadata, context: grpc.ServicerContext) -> str:
        if self.by_api_key:
            key = presented_key(metadata)
            if key is not None:
                return "api-key:" + hashlib.sha256(key.encode("utf-8")).hexdigest()
        return caller_of(context) or "unknown"

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self.slots.limit or method.startswith(OPEN_SERVICES):
            return handler
        metadata = handler_call_details.invocation_metadata
        deserialize = handler.request_deserializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, deserialize, method, metadata),
                request_deserializer=None, response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, deserialize, method, metadata),
                request_deserializer=None, response_serializer=handler.response_serializer)
        # Client streaming (none in this system's services but reflection, which is exempt): the requests
        # are parsed as they are read, after the check.
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=self._unary(handler.stream_unary, None, method, metadata))
        if handler.stream_stream is not None:
            return handler._replace(stream_stream=self._stream(handler.stream_stream, None, method, metadata))
        return handler

    def _admit(self, method: str, metadata, context: grpc.ServicerContext) -> str:
        """The caller's key, its slot taken; or the call is aborted with RESOURCE_EXHAUSTED."""
        key = self.caller_key(metadata, context)
        if self.slots.acquire(key):
            return key
        self._log_refusal(method, key)
        who = "this API key" if key.startswith("api-key:") else f"this caller ({key})"
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"too many calls in flight: {who} already has {self.slots.limit}, the server's limit "
                      "per caller (--max-calls-per-caller / SPECDEC_MAX_CALLS_PER_CALLER); wait for some to "
                      "finish or retry with backoff, or ask the operator to raise the limit")
        raise AssertionError("unreachable: context.abort raises")

    def _unary(self, behavior, deserialize, method: str, metadata):
        def limited(request, context):
            key = self._admit(method, metadata, context)
            try:
                if deserialize is not None:
                    request = _parse(deserialize, request, method, context)
                return behavior(request, context)
            finally:
                self.slots.release(key)
        return limited

    def _stream(self, behavior, deserialize, method: str, metadata):
        # The slot is taken when gRPC starts the generator and given back in its `finally`: when the stream
        # ends, fails, or is closed after the client cancelled (gRPC lets go of the generator, which closes it).
        def limited(request, context):
            key = self._admit(method, metadata, context)
            try:
                if deserialize is not None:
                    request = _parse(deserialize, request, method, context)
                yield from behavior(request, context)
            finally:
                self.slots.release(key)
        return limited

    def _log_refusal(self, method: str, key: str) -> None:
        now = time.monotonic()
        with self._log_lock:
            if now < self._next_log:
                self._unlogged += 1
                return
            self._next_log = now + self._log_interval_s
            unlogged, self._unlogged = self._unlogged, 0
        more = f" ({unlogged} more refusals since the last report)" if unlogged else ""
        log.warning("refused %s from %s: %d calls already in flight (--max-calls-per-caller)%s",
                    method, key[:24] + "..." if key.startswith("api-key:") else key, self.slots.limit, more)


def _parse(deserialize, body, method: str, context: grpc.ServicerContext):
    """The request from its bytes. The servers' deserializers (service_common/errors.py) never raise; a bare
    one that does means a body that does not parse, the caller's error."""
    try:
        return deserialize(body)
    except Exception as error:  # noqa: BLE001 - whatever the parser raises
        context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                      f"the request body of {method} does not parse: {str(error)[:200] or type(error).__name__}")
