"""The app health check over a loopback socket: statuses, an interim 100, a refused port, an
app that does not answer in time."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from sidecar.control.health import AppHealth
from sidecar.control.httpclient import get_status
from tests.sidecar.conftest import LOCAL

Answer = Callable[[bytes], bytes | None]
App = Callable[[Answer], Awaitable[str]]


@pytest.fixture
async def app() -> AsyncIterator[App]:
    """A raw HTTP server answering each request head with ``answer(head)`` (None: never);
    its health URL."""
    servers: list[asyncio.Server] = []

    async def start(answer: Answer) -> str:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            said = answer(head)
            if said is None:
                await reader.read()  # until the client gives up
            else:
                writer.write(said)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, LOCAL, 0)
        servers.append(server)
        return f"http://{LOCAL}:{server.sockets[0].getsockname()[1]}/healthz"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def status(code: int) -> Answer:
    return lambda _: f"HTTP/1.1 {code} X\r\nContent-Length: 2\r\n\r\nok".encode()


async def test_the_status_and_the_request_that_asked_for_it(app: App) -> None:
    heads: list[bytes] = []

    def answer(head: bytes) -> bytes | None:
        heads.append(head)
        return status(503)(head)

    url = await app(answer)
    assert await get_status(url) == 503
    lines = heads[0].decode().split("\r\n")
    assert lines[0] == "GET /healthz HTTP/1.1"
    assert {f"Host: {url.split('/')[2]}", "Connection: close"} <= set(lines)


async def test_an_interim_100_is_skipped(app: App) -> None:
    url = await app(lambda _: b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
    assert await get_status(url) == 204


async def test_health_falls_on_errors_a_user_can_read(app: App) -> None:
    changes: list[bool] = []
    ok = AppHealth(await app(status(200)), changes.append, interval=0.01)
    task = asyncio.create_task(ok.run())
    for _ in range(100):
        if changes:
            break
        await asyncio.sleep(0.01)
    await stop(task)
    assert changes == [True]

    with socket.socket() as s:
        s.bind((LOCAL, 0))
        port = s.getsockname()[1]  # nobody listens there
    for url, says in [
        (await app(status(500)), "status 500"),
        (await app(lambda _: None), "no answer within 50 ms"),
        (f"http://{LOCAL}:{port}/healthz", f"cannot connect to {LOCAL}:{port}"),
        (await app(lambda _: b"SSH-2.0-x\r\n\r\n"), "not an HTTP/1.1 answer"),
    ]:
        changes.clear()
        health = AppHealth(url, changes.append, interval=0.01, timeout=0.05)
        health.record(True)
        task = asyncio.create_task(health.run())
        for _ in range(200):
            if changes[1:]:
                break
            await asyncio.sleep(0.01)
        await stop(task)
        assert changes == [True, False], url
        assert health.last_error.startswith(says), health.last_error
