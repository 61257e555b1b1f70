"""An in-process sidecar on free loopback ports, real upstream servers, raw-socket clients."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from sidecar.app import Sidecar
from sidecar.config import Listen, SidecarConfig
from sidecar.proxy.watch import Timeouts

LOCAL = "127.0.0.1"
NAME = web.AppKey("name", str)
HITS = web.AppKey("hits", list[int])
MODE = web.AppKey("mode", list[str])


# -- upstreams ----------------------------------------------------------------------------


async def echo(request: web.Request) -> web.StreamResponse:
    """What the upstream saw: method, path, headers in order, body size."""
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path": request.path_qs,
            "version": f"{request.version.major}.{request.version.minor}",
            "headers": [[k.decode(), v.decode()] for k, v in request.raw_headers],
            "body_length": len(body),
            "body_sample": body[:64].decode(errors="replace"),
            "server": request.app[NAME],
        }
    )


async def sized(request: web.Request) -> web.StreamResponse:
    """?size=N bytes, with a Content-Length (/sized) or chunked (/chunked)."""
    size = int(request.query.get("size", "1024"))
    resp = web.StreamResponse()
    if request.path == "/chunked":
        resp.enable_chunked_encoding()
    else:
        resp.content_length = size
    await resp.prepare(request)
    block = (b"x" if request.path == "/sized" else b"y") * 65536
    left = size
    while left > 0:
        await resp.write(block[: min(left, len(block))])
        left -= min(left, len(block))
    await resp.write_eof()
    return resp


async def cookies(request: web.Request) -> web.StreamResponse:
    resp = web.Response(text="ok")
    resp.headers.add("Set-Cookie", "a=1; Path=/")
    resp.headers.add("Set-Cookie", "b=2; Path=/")
    resp.headers["Keep-Alive"] = "timeout=5"
    resp.headers["X-Order-1"] = "first"
    resp.headers["X-Order-2"] = "second"
    return resp


async def status(request: web.Request) -> web.StreamResponse:
    code = int(request.match_info["code"])
    if code in (204, 304):
        return web.Response(status=code)
    return web.Response(status=code, text=f"status {code}")


async def busy(request: web.Request) -> web.StreamResponse:
    """503 with Retry-After from an upstream named ``busy``; 200 from the others."""
    if request.app[NAME] == "busy":
        return web.Response(status=503, headers={"Retry-After": "30"}, text="busy")
    return web.Response(text=request.app[NAME])


async def behave(request: web.Request) -> web.StreamResponse:
    """``/behave``: by the upstream's name (or ``behave_as``), ``fail*`` answers 500,
    ``stall*`` waits 5 s, ``late*`` 150 ms, ``busy*`` answers 503, ``limit*`` 429 (no
    Retry-After); the others answer their name and the mesh headers they got. Each
    upstream counts its hits."""
    name = request.app[MODE][0]
    request.app[HITS][0] += 1
    if name.startswith("fail"):
        return web.Response(status=500, text=name)
    if name.startswith("stall"):
        await asyncio.sleep(5)
    if name.startswith("late"):
        await asyncio.sleep(0.15)
    if name.startswith("busy"):
        return web.Response(status=503, text=name)
    if name.startswith("limit"):
        return web.Response(status=429, text=name)
    seen = {k: v for k, v in request.headers.items() if k.lower().startswith("x-meshlet")}
    return web.json_response({"server": name, "mesh": seen})


async def slow(request: web.Request) -> web.StreamResponse:
    await asyncio.sleep(float(request.query.get("delay", "1")))
    return web.Response(text="slow")


async def consume(request: web.Request) -> web.StreamResponse:
    """Counts a streamed upload without keeping it."""
    total = 0
    async for chunk in request.content.iter_any():
        total += len(chunk)
    return web.json_response({"received": total})


async def websocket(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        await ws.send_str(f"echo: {msg.data}")
    return ws


def upstream_app(name: str) -> web.Application:
    app = web.Application()
    app[NAME] = name
    app[HITS] = [0]
    app[MODE] = [name]
    app.router.add_route("*", "/behave", behave)
    app.router.add_route("*", "/echo", echo)
    app.router.add_route("*", "/echo/{tail:.*}", echo)
    app.router.add_get("/sized", sized)
    app.router.add_get("/chunked", sized)
    app.router.add_get("/cookies", cookies)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/slow", slow)
    app.router.add_get("/busy", busy)
    app.router.add_post("/consume", consume)
    app.router.add_put("/consume", consume)
    app.router.add_get("/ws", websocket)
    return app


@dataclass
class Upstream:
    name: str
    port: int
    runner: web.AppRunner

    @property
    def hits(self) -> int:
        """Requests to ``/behave`` so far."""
        return self.runner.app[HITS][0]

    def behave_as(self, mode: str) -> None:
        """How ``/behave`` answers from now on (``fail``, ``stall``, ``busy``, other: fine)."""
        self.runner.app[MODE][0] = mode


@pytest.fixture
async def upstreams() -> AsyncIterator[Callable[[str], Awaitable[Upstream]]]:
    runners: list[web.AppRunner] = []

    async def start(name: str) -> Upstream:
        runner = web.AppRunner(upstream_app(name), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, LOCAL, 0)
        await site.start()
        runners.append(runner)
        return Upstream(name, runner.addresses[0][1], runner)

    yield start
    for runner in runners:
        await runner.cleanup()


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class RawUpstream:
    """A scripted upstream: ``handler`` runs once per accepted connection."""

    port: int
    server: asyncio.Server
    connections: int = 0
    closed: list[bool] = field(default_factory=list)


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[RawHandler], Awaitable[RawUpstream]]]:
    servers: list[asyncio.Server] = []
    tasks: set[asyncio.Task[None]] = set()

    async def start(handler: RawHandler) -> RawUpstream:
        raw: RawUpstream

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            raw.connections += 1
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            except asyncio.CancelledError:
                pass  # the fixture's teardown: end quietly (asyncio logs cancelled callbacks)
            finally:
                writer.close()
                tasks.discard(task)

        server = await asyncio.start_server(on_connect, LOCAL, 0)
        servers.append(server)
        raw = RawUpstream(server.sockets[0].getsockname()[1], server)
        return raw

    yield start
    for task in list(tasks):
        task.cancel()
    for server in servers:
        server.close()
        await server.wait_closed()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


# -- the sidecar ------------------------------------------------------------------------------

FAST = Timeouts(head=0.5, idle=0.5)


@dataclass
class Mesh:
    sidecar: Sidecar
    table_path: Path

    @property
    def outbound(self) -> int:
        return self.sidecar.addresses["outbound"].port

    @property
    def inbound(self) -> int:
        return self.sidecar.addresses["inbound"].port

    @property
    def admin(self) -> int:
        return self.sidecar.addresses["admin"].port

    @property
    def metrics(self) -> int:
        return self.sidecar.addresses["metrics"].port

    def write_table(self, services: dict[str, Any]) -> None:
        tmp = self.table_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump({"services": services}))
        tmp.replace(self.table_path)


def service(*ports: int, **policy: Any) -> dict[str, Any]:
    return {
        "policy": policy,
        "endpoints": [{"address": LOCAL, "port": p} for p in ports],
    }


NO_OUTLIER = {"consecutive_failures": 0, "failure_rate_percent": 0}


def svc(*ups: Upstream | int, **policy: Any) -> dict[str, Any]:
    """A table of one service, ``svc``, round robin unless the policy says otherwise."""
    ports = [u if isinstance(u, int) else u.port for u in ups]
    return {"svc": service(*ports, **{"lb": "round_robin", **policy})}


async def each(mesh: Mesh, raw: bytes, n: int) -> list[Response]:
    """``n`` requests, one at a time, each on its own connection."""
    return [(await request(mesh.outbound, raw))[0] for _ in range(n)]


@pytest.fixture
async def make_mesh(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Mesh]]]:
    started: list[Sidecar] = []

    async def make(
        services: dict[str, Any],
        *,
        app_port: int = 9,
        timeouts: Timeouts | None = None,
        **config: Any,
    ) -> Mesh:
        table = tmp_path / f"table-{len(started)}.yaml"
        table.write_text(json.dumps({"services": services}))
        cfg = SidecarConfig(
            service="tester",
            app=Listen(LOCAL, app_port),
            outbound=Listen(LOCAL, 0),
            inbound=Listen(LOCAL, 0),
            admin=Listen(LOCAL, 0),
            metrics_listen=Listen(LOCAL, 0),
            table=str(table),
            drain_timeout=2,
            table_poll_interval=0.05,
        )
        sidecar = Sidecar(replace(cfg, **config), timeouts or Timeouts())
        await sidecar.start()
        started.append(sidecar)
        return Mesh(sidecar, table)

    yield make
    for sidecar in started:
        await sidecar.stop()


# -- raw clients ------------------------------------------------------------------------------


async def exchange(port: int, data: bytes) -> bytes:
    """Send bytes, read until the sidecar closes the connection."""
    reader, writer = await asyncio.open_connection(LOCAL, port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read(-1)
    finally:
        writer.close()


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


async def read_response(reader: asyncio.StreamReader, *, head_request: bool = False) -> Response:
    """One response off a raw connection (Content-Length, chunked or until close)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")
    status = int(lines[0].split()[1])
    headers = [(k, v.strip()) for k, _, v in (line.partition(":") for line in lines[1:] if line)]
    resp = Response(status, headers, b"")
    if head_request or status in (204, 304) or 100 <= status < 200:
        return resp
    te = resp.header("transfer-encoding")
    if te and "chunked" in te.lower():
        body = bytearray()
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
            k, _, v = line.decode().partition(":")
            resp.trailers.append((k, v.strip()))
        resp.body = bytes(body)
    elif (length := resp.header("content-length")) is not None:
        resp.body = await reader.readexactly(int(length))
    else:
        resp.body = await reader.read(-1)
    return resp


async def request(
    port: int, raw: bytes, *, count: int = 1, head_request: bool = False
) -> list[Response]:
    reader, writer = await asyncio.open_connection(LOCAL, port)
    try:
        writer.write(raw)
        async with asyncio.timeout(10):
            return [await read_response(reader, head_request=head_request) for _ in range(count)]
    finally:
        writer.close()


def get(path: str, host: str = "svc", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()
