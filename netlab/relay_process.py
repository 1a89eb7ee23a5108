"""The delay relay as a process of its own: its command line (`python -m netlab.relay_process`), and the
handle a study uses to start it (inside a network namespace if asked), change its delay and stop it.

A separate process keeps the relay's timers off the caller's GIL. Control is a line protocol on a socket:
"delay MS" answers "ok MS".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from netlab.addresses import Address
from netlab.relay import DelayRelay, new_event_loop

READY = "ready"


async def _control(relay: DelayRelay, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while line := (await reader.readline()).decode().split():
        if line[0] == "delay" and len(line) == 2:
            relay.delay_ms = float(line[1])
            writer.write(f"ok {relay.delay_ms}\n".encode())
        else:
            writer.write(b"error: expected `delay MS`\n")
        await writer.drain()
    writer.close()


async def _serve(routes: list[tuple[str, str]], delay_ms: float, control: str | None) -> None:
    relay = DelayRelay(routes, delay_ms)
    bound = await relay.start()
    control_server = None
    if control:
        path = Address.parse(control).path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        control_server = await asyncio.start_unix_server(lambda r, w: _control(relay, r, w), path)
    for route, address in zip(routes, bound):
        print(f"route {route[0]} -> {route[1]} bound {address}", flush=True)
    print(READY, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    if control_server is not None:
        control_server.close()
    await relay.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--route", action="append", required=True, metavar="LISTEN=UPSTREAM",
                        help="HOST:PORT or unix:PATH on both sides; repeatable")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay added in each direction")
    parser.add_argument("--control", help="unix:PATH for `delay MS` commands")
    args = parser.parse_args(argv)
    routes = [tuple(r.split("=", 1)) for r in args.route]
    loop = new_event_loop()
    try:
        loop.run_until_complete(_serve(routes, args.delay_ms, args.control))
    finally:
        loop.close()


class RelayProcess:
    """A running relay process; `prefix` (e.g. ip netns exec NS) places it in another namespace."""

    def __init__(self, routes: list[tuple[str, str]], control_path: Path, delay_ms: float = 0.0,
                 prefix: list[str] = (), timeout_s: float = 20.0):
        self.control_path = control_path
        command = [*prefix, sys.executable, "-m", "netlab.relay_process", "--delay-ms", str(delay_ms),
                   "--control", f"unix:{control_path}"]
        for listen, upstream in routes:
            command += ["--route", f"{listen}={upstream}"]
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=env)
        self.bound: list[Address] = []
        output = []
        for line in self.process.stdout:  # blocks until ready or exit; the relay starts in well under a second
            output.append(line)
            if line.startswith("route "):
                self.bound.append(Address.parse(line.split(" bound ")[1].strip()))
            if line.strip() == READY:
                return
        self.process.wait(timeout_s)
        raise RuntimeError(f"relay exited with code {self.process.returncode}: {''.join(output)[-2000:]}")

    def set_delay(self, delay_ms: float) -> None:
        with socket.socket(socket.AF_UNIX) as control:
            control.settimeout(5)
            control.connect(str(self.control_path))
            control.sendall(f"delay {delay_ms}\n".encode())
            reply = control.makefile().readline().strip()
        if not reply.startswith("ok"):
            raise RuntimeError(f"relay refused delay {delay_ms}: {reply}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process.stdout.close()

    def __enter__(self) -> RelayProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    main()
