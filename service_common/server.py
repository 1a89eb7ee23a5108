"""Create, register (plus health and reflection), bind, start, wait, drain and stop gracefully on SIGTERM.

Binding, TLS, API keys and the plaintext health port are transport/'s: every role listens through it."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service_common.caller_limits import DEFAULT_MAX_WORKERS, CallerLimitInterceptor, default_max_calls_per_caller
from service_common.errors import StatusInterceptor
from service_common.health import HealthServicer
from telemetry.server_spans import server_interceptors
from transport import ApiKeyInterceptor, ApiKeys, TLSSettings, listen, serve_health

log = logging.getLogger(__name__)

# Replies can be large (a dense [33, 152k] float32 target_probs matrix is ~20 MB): channels that receive
# them, and servers that send them, allow this much.
MAX_MESSAGE_BYTES = 256 << 20
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# Requests are token ids and short text: a server refuses a larger one (RESOURCE_EXHAUSTED, from gRPC
# itself) before it is parsed. 4 MiB is ~800k token ids on the wire.
DEFAULT_MAX_REQUEST_MB = 4.0


def server_options(max_request_mb: float = DEFAULT_MAX_REQUEST_MB) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", int(max_request_mb * (1 << 20)))]


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: Sequence[str]
    health_server: grpc.Server | None = None  # the plaintext health port, when there is one
    health_port: int | None = None
    caller_limit: CallerLimitInterceptor | None = None  # calls in flight per caller (its .slots)
    on_stop: list[Callable[[], None]] = field(default_factory=list)  # after the calls drained, in order
    on_drain: list[Callable[[], None]] = field(default_factory=list)  # told it is draining, in order
    busy: Callable[[], bool] | None = None  # whether work it holds is still going on (None: never busy)
    _cut_drain: threading.Event = field(default_factory=threading.Event, repr=False)

    def drain(self, timeout_s: float, poll_s: float = 0.1) -> bool:
        """Stop taking new work while work in flight goes on: health turns NOT_SERVING for every service
        name and "" (main port and plaintext health port: they share one health servicer), so probes fail
        and Kubernetes routes no more to this pod; the on_drain hooks are told (the role refuses new
        sessions); then it waits while `busy()` says work remains, up to `timeout_s`. The server keeps
        serving calls throughout: stopping is `stop`'s. True when the work ended before the timeout."""
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        for hook in self.on_drain:
            hook()
        deadline = time.monotonic() + timeout_s
        while self.busy is not None and self.busy():
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning("drain: work still in flight after %.0f s; stopping anyway", timeout_s)
                return False
            if self._cut_drain.wait(min(poll_s, left)):
                log.warning("drain cut short by a second signal")
                return False
        return True

    def stop(self, grace: float | None = 5.0) -> None:
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.server.stop(grace).wait()
        if self.health_server is not None:
            self.health_server.stop(None).wait()
        for release in self.on_stop:
            release()

    def _set_health(self, status) -> None:
        for name in (*self.service_names, ""):
            self.health.set(name, status)

    def wait_for_termination(self, exit_deadline_s: float = 15.0, drain_timeout_s: float = 20.0) -> None:
        """Block until SIGTERM / SIGINT, then drain (up to `drain_timeout_s`), then stop: in-flight calls
        get a short grace, then the on_stop hooks run. A second signal cuts the drain short.

        The wait is a loop of short waits: Python runs signal handlers only in the main thread, between
        bytecodes, so a main thread parked in one untimed lock wait may never run them. Once stopping,
        a watchdog ends the process if the drain overruns `drain_timeout_s` + `exit_deadline_s`, or the
        stop, the exporters' flush or the interpreter's exit (which joins the server's worker threads) is
        not done `exit_deadline_s` after the drain: a service being stopped must stop. Before the loop,
        a draft service sent SIGTERM right after it came up twice in ~20 test runs never stopped: py-spy
        showed its main thread still in the untimed Event.wait, the handler never run (the signal had
        gone to one of the other threads)."""
        stopped = threading.Event()

        def on_signal(signum, _frame):
            if stopped.is_set():
                self._cut_drain.set()
                return
            log.info("signal %s: draining (up to %.0f s), then stopping", signum, drain_timeout_s)
            stopped.set()

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
        while not stopped.wait(0.5):
            pass
        watchdog = _watchdog(drain_timeout_s + exit_deadline_s, "after the signal")  # a hook or busy() that hangs
        self.drain(drain_timeout_s)
        watchdog.cancel()
        _watchdog(exit_deadline_s, "after the drain")
        self.stop()


def _watchdog(after_s: float, since: str) -> threading.Timer:
    timer = threading.Timer(after_s, _exit_stuck, args=(after_s, since))
    timer.daemon = True
    timer.start()
    return timer


def _exit_stuck(after_s: float, since: str) -> None:
    log.error("still not stopped %.0f s %s: exiting now", after_s, since)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os._exit(1)


def start_server(
    registrations: Sequence[tuple[Callable, object]],
    service_names: Sequence[str],
    port: int = 0,
    host: str = "[::]",
    max_workers: int = DEFAULT_MAX_WORKERS,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    max_concurrent_rpcs: int | None = None,
    *,
    tls: TLSSettings | None = None,
    api_key_file: str | None = None,
    health_port: int | None = None,
    max_request_mb: float = DEFAULT_MAX_REQUEST_MB,
    max_calls_per_caller: int | None = None,
    caller_by_api_key: bool = False,
) -> RunningServer:
    """`tls` with a certificate and key: TLS (mTLS with require_client_cert); `api_key_file`: calls need a
    key from it (health and reflection stay open); `health_port` (0: a free one): the health service
    alone, in plaintext, there too; `max_request_mb`: larger requests are refused unparsed.

    `max_workers` handler threads (gRPC starts them as calls need them); one caller may have at most
    `max_calls_per_caller` calls in flight (None: half of `max_workers`; 0: no limit), so that no caller
    can hold every thread (service_common/caller_limits.py). `caller_by_api_key`: with `api_key_file`, the API
    key is the caller (the orchestrator's public API)."""
    if max_workers < 1:
        raise ValueError(f"--max-workers must be at least 1, got {max_workers}")
    if max_calls_per_caller is None:
        max_calls_per_caller = default_max_calls_per_caller(max_workers)
    if max_calls_per_caller < 0:
        raise ValueError(f"--max-calls-per-caller must be >= 0 (0: no limit), got {max_calls_per_caller}")
    if max_calls_per_caller == 0 or max_calls_per_caller >= max_workers:
        log.warning("--max-calls-per-caller %s with --max-workers %d: one caller can hold every handler thread "
                    "and shut other callers out", max_calls_per_caller or "0 (no limit)", max_workers)
    if tls is not None:
        tls.check()  # before anything is built: a bad flag is the operator's to fix
        if tls.serves_tls and health_port and health_port == port:
            raise ValueError("--health-port must differ from --port with TLS on: probes need a plaintext port")
    # The key check comes first: a refused call opens no span and reaches no handler.
    auth = [ApiKeyInterceptor(ApiKeys(api_key_file))] if api_key_file else []
    # Then the limit per caller: a refused call opens no span and its request is not parsed. The API key is
    # the caller only where keys are checked (above); unchecked, any string would pass as a new caller.
    limit = CallerLimitInterceptor(max_calls_per_caller, by_api_key=caller_by_api_key and bool(api_key_file))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=[*auth, limit, *server_interceptors(), *interceptors, StatusInterceptor()],
        options=server_options(max_request_mb),
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    for add, servicer in registrations:
        add(servicer, server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in (*service_names, ""):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = listen(server, host, port, tls)
    server.start()
    health_server = plain_health_port = None
    if health_port is not None and health_port != bound:  # the same port: health is already there
        try:
            health_server, plain_health_port = serve_health(health_servicer, host, health_port)
        except OSError:
            server.stop(None)
            raise
    log.info("serving %s on port %d (%s%s)%s; %d handler threads, %s calls in flight per caller",
             ", ".join(service_names), bound,
             "mTLS" if tls and tls.require_client_cert else "TLS" if tls and tls.serves_tls else "plaintext",
             ", API keys" if api_key_file else "",
             f"; plaintext health on port {plain_health_port}" if health_server else "",
             max_workers, max_calls_per_caller or "unlimited")
    return RunningServer(server, bound, health_servicer, service_names, health_server, plain_health_port,
                         caller_limit=limit)
