"""The WebSocket client over loopback sockets, against aiohttp's server (what the control plane
runs) and a raw one that goes silent: pings answered, keepalive, the size limit and closes."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import uvloop
from aiohttp import web

from sidecar.control.websocket import Close, Message, accept_for
from sidecar.control.wsclient import WebSocket, connect
from sidecar.errors import ConnectError, FrameError, HandshakeError, PeerError
from tests.sidecar.conftest import LOCAL

Handler = Callable[[web.WebSocketResponse], Awaitable[None]]
SEEN = web.AppKey("seen", dict[str, Any])


@pytest.fixture
async def server() -> AsyncIterator[Callable[..., Awaitable[tuple[str, dict[str, Any]]]]]:
    """An aiohttp WebSocket server running ``handler``; its URL and what it saw."""
    runners: list[web.AppRunner] = []

    async def start(handler: Handler, **options: Any) -> tuple[str, dict[str, Any]]:
        seen: dict[str, Any] = {}

        async def stream(request: web.Request) -> web.StreamResponse:
            ws = web.WebSocketResponse(**options)
            await ws.prepare(request)
            seen["authorization"] = request.headers.get("Authorization")
            await handler(ws)
            seen["close_code"] = ws.close_code
            return ws

        app = web.Application()
        app.router.add_get("/s", stream)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, LOCAL, 0).start()
        return f"ws://{LOCAL}:{runner.addresses[0][1]}/s", seen

    yield start
    for runner in runners:
        await runner.cleanup()


async def open_ws(url: str, **options: Any) -> WebSocket:
    async with asyncio.timeout(5):
        return await connect(
            url, headers={"Authorization": "Bearer t"}, tls=None, max_message=1000, **options
        )


async def test_messages_both_ways_and_a_close_with_code_and_reason(server: Any) -> None:
    async def handler(ws: web.WebSocketResponse) -> None:
        msg = await ws.receive()
        await ws.send_str(f"got {msg.data}")
        await ws.close(code=4401, message=b"token revoked")

    url, seen = await server(handler)
    async with await open_ws(url) as ws:
        await ws.send_text("hello")
        assert await ws.receive() == Message("got hello")
        assert await ws.receive() == Close(4401, "token revoked")
        assert ws.closed
    await asyncio.sleep(0.05)  # the server's close() returns once our echo has come
    assert seen == {"authorization": "Bearer t", "close_code": 4401}


async def test_the_servers_pings_are_answered_while_receive_waits(server: Any) -> None:
    async def handler(ws: web.WebSocketResponse) -> None:
        await asyncio.sleep(0.5)  # five heartbeats, each wanting a pong within 0.05 s
        await ws.send_str("still here")
        await ws.receive()

    url, _ = await server(handler, heartbeat=0.1)
    async with await open_ws(url) as ws:
        assert await ws.receive() == Message("still here")


async def test_our_close_waits_for_the_servers_while_another_task_reads(server: Any) -> None:
    async def handler(ws: web.WebSocketResponse) -> None:
        async for _ in ws:
            pass

    url, seen = await server(handler)
    ws = await open_ws(url)
    reading = asyncio.create_task(ws.receive())
    await asyncio.sleep(0.05)
    async with asyncio.timeout(2):
        await ws.close(1000, "deregistered")
    assert await reading == Close(1000, "")
    await asyncio.sleep(0.05)
    assert seen["close_code"] == 1000
    with pytest.raises(ConnectionResetError):
        await ws.send_text("late")


async def test_a_message_over_the_limit_closes_with_1009(server: Any) -> None:
    async def handler(ws: web.WebSocketResponse) -> None:
        await ws.send_str("x" * 1001)
        await ws.receive()

    url, seen = await server(handler)
    async with await open_ws(url) as ws:
        with pytest.raises(FrameError, match="1001 bytes or more"):
            await ws.receive()
    await asyncio.sleep(0.05)
    assert seen["close_code"] == 1009


async def test_a_connection_that_ends_without_a_close_is_1006(server: Any) -> None:
    async def handler(ws: web.WebSocketResponse) -> None:
        await ws.send_str("bye")
        assert ws._req is not None
        assert ws._req.transport is not None
        ws._req.transport.abort()

    url, _ = await server(handler)
    async with await open_ws(url) as ws:
        assert await ws.receive() == Message("bye")
        assert await ws.receive() == Close(1006, "")


async def test_a_connection_reset_is_1006_and_the_close_after_it_raises_nothing() -> None:
    """A control plane killed with bytes of ours unread resets the connection: the stream
    ends as 1006, and leaving it sends nothing (uvloop raised RuntimeError on that write,
    which killed the sidecar's stream task for good)."""
    await _reset_by_the_server()


def test_a_connection_reset_under_uvloop_as_the_sidecar_runs() -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_reset_by_the_server())


async def _upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A raw server's side of the WebSocket handshake."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    key = next(ln.split(": ")[1] for ln in head.split("\r\n") if ln.startswith("Sec-WebSocket-Key"))
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        + f"Sec-WebSocket-Accept: {accept_for(key)}\r\n\r\n".encode()
    )


async def _reset_by_the_server() -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _upgrade(reader, writer)
        await asyncio.sleep(0.1)  # the client's message arrives, unread
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST

    srv = await asyncio.start_server(reset, LOCAL, 0)
    url = f"ws://{LOCAL}:{srv.sockets[0].getsockname()[1]}/s"
    async with srv:
        async with await open_ws(url) as ws:
            await ws.send_text("a heartbeat the server never reads")
            async with asyncio.timeout(2):
                assert await ws.receive() == Close(1006, "")
        with pytest.raises(ConnectionResetError):
            await ws.send_text("after the end")


async def test_keepalive_gives_up_on_a_server_that_stops_answering() -> None:
    """A server that upgrades and then reads without ever answering (a hung process)."""
    got = bytearray()
    finished = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _upgrade(reader, writer)
        while data := await reader.read(100):
            got.extend(data)
        writer.close()
        finished.set()

    srv = await asyncio.start_server(silent, LOCAL, 0)
    url = f"ws://{LOCAL}:{srv.sockets[0].getsockname()[1]}/s"
    async with srv, await open_ws(url, keepalive=0.1) as ws:
        with pytest.raises(PeerError, match=r"no answer to a keepalive ping within 0\.05 s"):
            async with asyncio.timeout(2):
                await ws.receive()
        await asyncio.wait_for(finished.wait(), 2)  # the client hung up
    assert got[0] == 0x89  # it was pinged first


async def test_an_upgrade_refused_or_unreachable() -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(refuse, LOCAL, 0)
    port = srv.sockets[0].getsockname()[1]
    async with srv:
        with pytest.raises(HandshakeError, match="HTTP 403 Forbidden") as raised:
            await open_ws(f"ws://{LOCAL}:{port}/s")
    assert raised.value.status == 403
    with pytest.raises(ConnectError, match=f"cannot connect to {LOCAL}:{port}"):
        await open_ws(f"ws://{LOCAL}:{port}/s")
    # an address a name resolved to: the error names both
    with pytest.raises(ConnectError, match=f"cannot connect to cp.test:{port} at {LOCAL}: "):
        await open_ws(f"ws://cp.test:{port}/s", address=LOCAL)
