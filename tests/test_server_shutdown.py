"""A service stopped by SIGTERM exits: promptly when idle, and within its deadline even when a handler
never returns (the interpreter's exit would otherwise join that handler's thread forever)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import grpc

from local_stack.processes import REPO_ROOT, wait_healthy

SERVER = textwrap.dedent("""
    import sys, threading
    import grpc
    from service_common.server import start_server

    def add(servicer, server):
        def stuck(request, context):
            threading.Event().wait()  # never returns, whatever the deadline or the drain
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "test.Stuck", {"Call": grpc.unary_unary_rpc_method_handler(stuck)}),))

    running = start_server([(add, None)], ["test.Stuck"], port=0, host="127.0.0.1")
    print(running.port, flush=True)
    running.wait_for_termination(exit_deadline_s=float(sys.argv[1]))
""")


def _serve(exit_deadline_s: float) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen([sys.executable, "-c", SERVER, str(exit_deadline_s)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, cwd=REPO_ROOT,
                               env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "GRPC_VERBOSITY": "ERROR"})
    port = int(process.stdout.readline())
    wait_healthy(f"127.0.0.1:{port}", 30, process)
    return process, port


def _stop(process: subprocess.Popen) -> float:
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    return time.monotonic() - started


def test_an_idle_service_exits_cleanly_on_sigterm():
    process, _ = _serve(exit_deadline_s=20.0)
    took = _stop(process)
    assert process.returncode == 0 and took < 10, (process.returncode, took)


def test_a_service_with_a_handler_that_never_returns_still_exits_after_its_deadline():
    process, port = _serve(exit_deadline_s=2.0)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_unary("/test.Stuck/Call")
    threading.Thread(target=lambda: _ignore_errors(call), daemon=True).start()
    time.sleep(1.0)  # the call is in its handler
    took = _stop(process)
    channel.close()
    # the drain gives up after its 5 s grace; the interpreter would then wait for the stuck handler's
    # thread forever: the watchdog ends the process 2 s after the signal, with exit code 1
    assert process.returncode == 1 and 1.5 < took < 15, (process.returncode, took)


def _ignore_errors(call) -> None:
    try:
        call(b"x", timeout=120)
    except grpc.RpcError:
        pass
