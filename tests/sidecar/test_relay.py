"""An opaque TCP stream relayed unparsed (``proxy.relay``), over loopback: a listener whose
connections are handed to a ``Relay`` at once, as the sidecar does with an intercepted
connection that is not HTTP."""

from __future__ import annotations

import asyncio
import functools
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import cast

import pytest
import uvloop

from sidecar.proxy.intercept import Interception
from sidecar.proxy.relay import HOLD, Relay
from tests.sidecar.conftest import LOCAL

Relaying = Callable[..., Awaitable[tuple[int, list[Relay], asyncio.Event]]]
DEFAULT = Interception()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Sends back what it reads; at the client's EOF, says ``bye`` and closes."""
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write(b"bye")
    await writer.drain()
    writer.close()


class _Handover(asyncio.Protocol):
    def __init__(
        self, destination: tuple[str, int], interception: Interception, relays: list[Relay]
    ) -> None:
        self.destination, self.interception, self.relays = destination, interception, relays
        self.ended = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        relay = Relay(
            transport,
            self.destination,
            self.interception,
            asyncio.get_running_loop(),
            self.ended.set,
        )
        self.relays.append(relay)
        relay.start(b"first:")


@pytest.fixture
async def relaying() -> AsyncIterator[Relaying]:
    servers: list[asyncio.Server] = []

    async def start(
        destination: tuple[str, int], interception: Interception = DEFAULT
    ) -> tuple[int, list[Relay], asyncio.Event]:
        relays: list[Relay] = []
        handover = _Handover(destination, interception, relays)
        server = await asyncio.get_running_loop().create_server(lambda: handover, LOCAL, 0)
        servers.append(server)
        return server.sockets[0].getsockname()[1], relays, handover.ended

    yield start
    for server in servers:
        server.close()


async def test_bytes_go_both_ways_and_a_half_close_is_passed_on(relaying: Relaying) -> None:
    target = await asyncio.start_server(echo, LOCAL, 0)
    port, relays, ended = await relaying(target.sockets[0].getsockname()[:2])
    reader, writer = await asyncio.open_connection(LOCAL, port)
    big = bytes(range(256)) * (4 * HOLD // 256)  # more than is held while it connects
    writer.write(b"hello " + big)
    await writer.drain()
    expected = b"first:hello " + big
    async with asyncio.timeout(10):
        assert await reader.readexactly(len(expected)) == expected
        writer.write_eof()  # our way closes; the echo answers on the other way
        assert await reader.read() == b"bye"
        await ended.wait()  # both ways closed
    # (what the client sent before the relay took over is not counted: it was read already)
    assert relays[0].moved == 2 * len(expected) - len(b"first:") + len(b"bye")
    writer.close()
    target.close()


async def test_a_destination_that_refuses_closes_the_client(relaying: Relaying) -> None:
    probe = await asyncio.start_server(echo, LOCAL, 0)
    closed = probe.sockets[0].getsockname()[:2]
    probe.close()
    await probe.wait_closed()
    port, _, ended = await relaying(closed)
    reader, writer = await asyncio.open_connection(LOCAL, port)
    async with asyncio.timeout(10):
        assert await reader.read() == b""
        await ended.wait()
    writer.close()


async def test_a_silent_stream_is_closed_after_the_idle_timeout(relaying: Relaying) -> None:
    target = await asyncio.start_server(echo, LOCAL, 0)
    port, _, ended = await relaying(
        target.sockets[0].getsockname()[:2], Interception(idle_timeout=0.2)
    )
    reader, writer = await asyncio.open_connection(LOCAL, port)
    async with asyncio.timeout(10):
        assert await reader.readexactly(6) == b"first:"
        assert await reader.read() == b""  # nothing more moved: closed
        await ended.wait()
    writer.close()
    target.close()


def test_a_destination_that_speaks_first_is_heard_by_the_client() -> None:
    """A server that writes as it accepts (MySQL, SMTP), in another thread as it would be in
    another process: under uvloop its greeting can come before the relay's connect returns, and
    it goes to the client, never back to the server (71 of 200 did before the fix)."""
    heard: list[bytes] = []
    listener = socket.create_server((LOCAL, 0))
    listener.settimeout(10)

    def serve() -> None:
        for _ in range(100):
            conn, _ = listener.accept()
            conn.settimeout(10)
            with conn:
                conn.sendall(b"hello\n")
                conn.shutdown(socket.SHUT_WR)  # said all it says: each way ends on its own
                heard.append(b"".join(iter(functools.partial(conn.recv, 4096), b"")))

    async def clients() -> list[bytes]:
        loop = asyncio.get_running_loop()
        destination = listener.getsockname()[:2]

        class Handover(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                client = cast(asyncio.Transport, transport)  # (uvloop's is not a subclass)
                Relay(client, destination, DEFAULT, loop, lambda: None).start(b"first:")

        server = await loop.create_server(Handover, LOCAL, 0)
        port = server.sockets[0].getsockname()[1]
        greetings = []
        for _ in range(100):
            reader, writer = await asyncio.open_connection(LOCAL, port)
            async with asyncio.timeout(10):
                greetings.append(await reader.read())
            writer.close()
        server.close()
        return greetings

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        greetings = uvloop.run(clients())
    finally:
        listener.close()
        thread.join(10)
    assert greetings == [b"hello\n"] * 100
    assert heard == [b"first:"] * 100  # what the client sent, and never the greeting
