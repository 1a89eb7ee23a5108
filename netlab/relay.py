"""A stream relay that holds every chunk D ms in each direction, preserving order: injected one-way delay
where the kernel has no netem qdisc.

Each direction of a connection is a reader that stamps chunks with a due time (arrival + D) into a FIFO and
a sender that writes each one when it falls due, so a stream of chunks is delayed D, not D per chunk, and
bytes never reorder. Connection setup itself is not delayed (gRPC keeps its connections open). The delay
can change while connections are open; it applies to chunks read from then on.

A timer fires late (here about 0.2 ms: timer slack, the loop's own turn, a busy CPU), which would add that
much to every hold. The relay asks to be woken `lead` earlier and nudges the lead a 50 us step up after every
late wake-up and a step down after every early one, so half the holds end late and half early: the
median hold is the delay asked for, however skewed the lateness of a busy machine (a mean-tracking
correction would make typical holds short there: one wake-up late by a descheduled vCPU's few ms
drags it). 50 us steps reach this VM's ~0.3-0.7 ms lateness in about ten chunks; 10 us steps needed
~50, and short exchanges (a test's 9 round trips) saw every hold run late. No CPU spins. new_event_loop() uses select(), whose
timeout is in microseconds.

Knows bytes and time, nothing of what flows through (HTTP/2 passes untouched).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
import socket
from dataclasses import dataclass

from netlab.addresses import Address

CHUNK = 1 << 16
MAX_HELD_CHUNKS = 512  # backpressure: past this, stop reading until the sender catches up
MAX_LEAD_S = 0.002
LEAD_STEP_S = 0.00005


def new_event_loop() -> asyncio.AbstractEventLoop:
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


def _no_delay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _open(address: Address):
    if address.is_unix:
        return await asyncio.open_unix_connection(address.path)
    return await asyncio.open_connection(address.host, address.port)


@dataclass
class Route:
    listen: Address
    upstream: Address
    bound: Address | None = None


class DelayRelay:
    def __init__(self, routes: list[tuple[str, str]], delay_ms: float = 0.0):
        self.routes = [Route(Address.parse(a), Address.parse(b)) for a, b in routes]
        self.delay_ms = delay_ms
        self.lead_s = 0.0  # how much earlier than due to ask the timer for, learnt from its wake-ups
        self._servers: list[asyncio.AbstractServer] = []
        self._connections: set[asyncio.Task] = set()

    async def start(self) -> list[Address]:
        """Listen on every route; returns the bound addresses (port 0 becomes the port chosen)."""
        for route in self.routes:
            handler = self._handler(route.upstream)
            if route.listen.is_unix:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(route.listen.path)
                server = await asyncio.start_unix_server(handler, route.listen.path)
                route.bound = route.listen
            else:
                server = await asyncio.start_server(handler, route.listen.host, route.listen.port)
                host, port = server.sockets[0].getsockname()[:2]
                route.bound = Address(host, port)
            self._servers.append(server)
        return [route.bound for route in self.routes]

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()

    def _handler(self, upstream: Address):
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            self._connections.add(task)
            try:
                await self._connect(upstream, reader, writer)
            finally:
                self._connections.discard(task)
        return handle

    async def _connect(self, upstream: Address, client_reader, client_writer) -> None:
        try:
            upstream_reader, upstream_writer = await _open(upstream)
        except OSError:
            client_writer.close()  # the caller sees a reset, as it would without the relay
            return
        _no_delay(client_writer)
        _no_delay(upstream_writer)
        pumps = [asyncio.create_task(self._pump(client_reader, upstream_writer)),
                 asyncio.create_task(self._pump(upstream_reader, client_writer))]
        try:
            done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            if not all(task.result() for task in done):
                # A broken side: drop the other too, or its reader would wait for bytes that never come.
                for writer in (client_writer, upstream_writer):
                    writer.close()
            await asyncio.wait(pumps)
        finally:
            for task in pumps:
                task.cancel()
            for writer in (client_writer, upstream_writer):
                writer.close()

    async def _sleep_until(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        wake = due - self.lead_s
        if wake <= loop.time():
            return
        await asyncio.sleep(wake - loop.time())
        step = LEAD_STEP_S if loop.time() > due else -LEAD_STEP_S
        self.lead_s = min(MAX_LEAD_S, max(0.0, self.lead_s + step))

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Copy one direction, each chunk written delay_ms after it was read, then EOF. False if a side broke."""
        loop = asyncio.get_running_loop()
        held: asyncio.Queue = asyncio.Queue(MAX_HELD_CHUNKS)

        async def send_when_due() -> None:
            while True:
                due, data = await held.get()
                await self._sleep_until(loop, due)
                if data is None:
                    break
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

        sender = asyncio.create_task(send_when_due())
        clean = True
        try:
            while data := await reader.read(CHUNK):
                await held.put((loop.time() + self.delay_ms / 1000, data))
        except (ConnectionError, OSError):
            clean = False
        await held.put((loop.time() + self.delay_ms / 1000, None))
        try:
            await sender
        except (ConnectionError, OSError):
            clean = False
        return clean
