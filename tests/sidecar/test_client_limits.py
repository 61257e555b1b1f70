"""What one client may take of a listener, and the clocks of a request: connections, a source
address's share, the pace of bodies both ways, pipelines, head sizes, silent streams and
tunnels, and timeouts that let a stream outlive ``timeout_ms``."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from sidecar.proxy.limits import MAX_PIPELINED
from sidecar.proxy.listener import Downstream
from tests.sidecar.conftest import (
    LOCAL,
    Mesh,
    RawUpstream,
    Upstream,
    get,
    read_head,
    read_response,
    request,
    service,
)

MakeMesh = Callable[..., Awaitable[Mesh]]
Upstreams = Callable[[str], Awaitable[Upstream]]
RawUpstreams = Callable[..., Awaitable[RawUpstream]]


async def open_from(source: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(LOCAL, port, local_addr=(source, 0))


async def closed(reader: asyncio.StreamReader, within: float = 2.0) -> bool:
    """The sidecar closed (or reset) the connection within ``within`` seconds."""
    try:
        async with asyncio.timeout(within):
            while await reader.read(65536):
                pass
    except ConnectionError:
        return True
    except TimeoutError:
        return False
    return True


# -- connections ------------------------------------------------------------------------------


async def test_connections_over_max_connections_are_closed_at_once(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    up = await upstreams("up")
    mesh = await make_mesh({"svc": service(up.port)}, max_connections=3)
    held = [await asyncio.open_connection(LOCAL, mesh.outbound) for _ in range(3)]
    reader, writer = await asyncio.open_connection(LOCAL, mesh.outbound)
    assert await closed(reader, 1.0)
    writer.close()
    tracker = mesh.sidecar.outbound
    assert tracker.counters.refused_max_connections == 1
    held.pop()[1].close()
    await asyncio.sleep(0.1)
    (resp,) = await request(mesh.outbound, get("/echo"))  # room again
    assert resp.status == 200
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{LOCAL}:{mesh.admin}/metrics") as r,
    ):
        text = await r.text()
    assert (
        'meshlet_listener_refused_total{direction="outbound",limit="max_connections"} 1.0' in text
    )
    assert 'meshlet_listener_connections{direction="outbound"} 2.0' in text
    for _, w in held:
        w.close()


async def test_one_source_address_holds_only_its_share_of_the_inbound(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    app = await upstreams("app")
    # the inbound's app route allows 1024 requests in flight; 0.002 of them is 2 per address
    mesh = await make_mesh({}, app_port=app.port, source_share=0.002, max_connections=2500)
    slow = get("/slow?delay=1", "tester")
    greedy = [await open_from("127.0.0.2", mesh.inbound) for _ in range(3)]
    for _, w in greedy:
        w.write(slow)
    await asyncio.sleep(0.3)
    refused = await read_response(greedy[2][0])
    assert (refused.status, refused.header("x-meshlet-error")) == (503, "overloaded")
    assert b"source_share" in refused.body
    reader, writer = await open_from("127.0.0.3", mesh.inbound)  # another address: room
    writer.write(get("/echo", "tester"))
    assert (await read_response(reader)).status == 200
    assert [(await read_response(r)).status for r, _ in greedy[:2]] == [200, 200]
    # 5 connections per address (0.002 of 2,500): the 6th is closed at once
    many = [await open_from("127.0.0.4", mesh.inbound) for _ in range(6)]
    assert await closed(many[-1][0], 1.0)
    counters = mesh.sidecar.inbound.counters
    assert (counters.refused_source_requests, counters.refused_source_connections) == (1, 1)
    for _, w in [*greedy, *many, (reader, writer)]:
        w.close()


# -- the pace of bodies -----------------------------------------------------------------------


async def test_a_request_body_below_the_minimum_rate_is_408(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    up = await upstreams("up")
    mesh = await make_mesh({"svc": service(up.port)}, min_data_rate=1000, data_rate_grace=0.3)
    reader, writer = await asyncio.open_connection(LOCAL, mesh.outbound)
    writer.write(b"POST /consume HTTP/1.1\r\nHost: svc\r\nContent-Length: 100000\r\n\r\n")
    started = time.monotonic()
    async with asyncio.timeout(3):
        while not reader.at_eof() and not reader._buffer:  # type: ignore[attr-defined]
            writer.write(b"x")  # a byte every 50 ms: 20 bytes/s
            await asyncio.sleep(0.05)
        resp = await read_response(reader)
    assert (resp.status, resp.header("x-meshlet-error")) == (408, "request-timeout")
    assert 0.3 <= time.monotonic() - started < 1.0
    assert mesh.sidecar.outbound.counters.request_body_rate == 1
    writer.close()


async def test_a_body_the_sidecar_is_not_reading_has_no_pace_to_keep(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    """A pipelined upload waits, unread, behind a slow answer: that time is not the
    client's."""
    up = await upstreams("up")
    mesh = await make_mesh({"svc": service(up.port)}, min_data_rate=1000, data_rate_grace=0.2)
    reader, writer = await asyncio.open_connection(LOCAL, mesh.outbound)
    writer.write(get("/slow?delay=0.8"))
    await asyncio.sleep(0.1)
    writer.write(b"POST /consume HTTP/1.1\r\nHost: svc\r\nContent-Length: 4000\r\n\r\n")
    await asyncio.sleep(0.5)  # the sidecar holds the POST: its body is not due yet
    writer.write(b"y" * 4000)
    first, second = await read_response(reader), await read_response(reader)
    assert (first.status, second.status) == (200, 200), second.body
    assert json.loads(second.body) == {"received": 4000}
    writer.close()


async def test_a_client_that_does_not_read_its_answer_is_cut(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    up = await upstreams("up")
    mesh = await make_mesh(
        {"svc": service(up.port, timeout_ms=10_000)}, min_data_rate=100_000, data_rate_grace=0.3
    )
    reader, writer = await asyncio.open_connection(LOCAL, mesh.outbound, limit=1 << 16)
    writer.write(get(f"/sized?size={64 * 1024 * 1024}"))
    await asyncio.sleep(1.0)  # read nothing
    assert mesh.sidecar.outbound.counters.response_rate == 1
    got = await drain(reader)
    assert 0 < got < 64 * 1024 * 1024
    writer.close()


async def drain(reader: asyncio.StreamReader) -> int:
    """Bytes read until the connection ends (closed or reset)."""
    got = 0
    try:
        while chunk := await reader.read(1 << 20):
            got += len(chunk)
    except ConnectionError:
        pass
    return got


# -- pipelines and heads ----------------------------------------------------------------------


async def test_answers_the_sidecar_makes_itself_wait_for_a_client_that_does_not_read(
    make_mesh: MakeMesh,
) -> None:
    mesh = await make_mesh({})
    reader, writer = await asyncio.open_connection(LOCAL, mesh.outbound, limit=1 << 16)
    writer.write(get("/", "nope") * 200_000)  # 6 MB of requests for 404s, never read
    try:
        for _ in range(500):  # until the sidecar has filled the client's socket (<= 10 s)
            await asyncio.sleep(0.02)
            conns = mesh.sidecar.outbound.connections
            if any(isinstance(ds, Downstream) and ds.write_paused for ds in conns):
                break
        (ds,) = mesh.sidecar.outbound.connections
        assert isinstance(ds, Downstream)
        assert ds.write_paused
        assert ds.transport is not None
        assert ds.transport.get_write_buffer_size() < 1024 * 1024
        assert len(ds._queue) <= MAX_PIPELINED
        counters = mesh.sidecar.outbound.counters
        assert counters.client_not_reading >= 1
        assert counters.pipeline_full >= 1
        # reading them all now gets every answer
        async with asyncio.timeout(30):
            first = await read_response(reader)
            one = len(first.body) + len(
                b"".join(f"{k}: {v}\r\n".encode() for k, v in first.headers)
            )
            one += len(b"HTTP/1.1 404 Not Found\r\n\r\n")
            rest = await reader.readexactly(one * (200_000 - 1))
        assert first.status == 404
        assert rest.count(b"HTTP/1.1 404 Not Found\r\n") == 200_000 - 1
    finally:
        writer.close()


async def test_a_read_ending_inside_a_head_counts_only_that_head(mesh_up: Mesh) -> None:
    body = b"b" * 70_000
    reader, writer = await asyncio.open_connection(LOCAL, mesh_up.outbound)
    writer.write(
        b"POST /consume HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        + b"GET /echo HTTP/1.1\r\nHo"
    )
    await asyncio.sleep(0.2)
    writer.write(b"st: svc\r\n\r\n")
    first, second = await read_response(reader), await read_response(reader)
    assert (first.status, json.loads(first.body)) == (200, {"received": 70_000})
    assert second.status == 200
    writer.close()


async def test_an_upstream_read_ending_after_a_chunk_header_is_no_protocol_error(
    raw_upstream: RawUpstreams, make_mesh: MakeMesh
) -> None:
    block = b"c" * 100_000

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n10\r\n"
            % (len(block), block)
        )
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b"0123456789abcdef\r\n0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    up = await raw_upstream(handler)
    mesh = await make_mesh({"svc": service(up.port)})
    (resp,) = await request(mesh.outbound, get("/"))
    assert (resp.status, resp.body) == (200, block + b"0123456789abcdef")


# -- streams and tunnels ----------------------------------------------------------------------


def events_handler(
    every: float, count: int, then_silent: float = 0.0
) -> Callable[..., Awaitable[None]]:
    """An event stream: ``count`` chunks ``every`` seconds apart, then (``then_silent``)
    silence before the end."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")
        writer.write(b"Transfer-Encoding: chunked\r\n\r\n")
        for i in range(count):
            event = b"data: %d\n\n" % i
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.sleep(every)
        await asyncio.sleep(then_silent)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    return handler


def events(count: int) -> bytes:
    return b"".join(b"data: %d\n\n" % i for i in range(count))


async def test_a_stream_outlives_the_route_timeout(
    raw_upstream: RawUpstreams, make_mesh: MakeMesh
) -> None:
    up = await raw_upstream(events_handler(0.1, 10))
    mesh = await make_mesh({"svc": service(up.port, timeout_ms=300, connect_timeout_ms=100)})
    (resp,) = await request(mesh.outbound, get("/events"))
    assert (resp.status, resp.body) == (200, events(10))


async def test_a_stream_silent_past_its_idle_timeout_is_cut(
    raw_upstream: RawUpstreams, make_mesh: MakeMesh
) -> None:
    up = await raw_upstream(events_handler(0.05, 3, then_silent=3))
    mesh = await make_mesh(
        {
            "svc": service(
                up.port, timeout_ms=200, connect_timeout_ms=100, stream_idle_timeout_ms=400
            )
        }
    )
    reader, writer = await asyncio.open_connection(LOCAL, mesh.outbound)
    writer.write(get("/events"))
    started = time.monotonic()
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        await read_response(reader)
    cut_after = time.monotonic() - started
    assert 0.15 + 0.4 <= cut_after < 0.15 + 0.4 * 2 + 0.2
    assert mesh.sidecar.outbound.counters.stream_idle == 1
    writer.close()


async def test_the_callers_deadline_bounds_the_whole_exchange_a_hops_the_head(
    raw_upstream: RawUpstreams, make_mesh: MakeMesh
) -> None:
    up = await raw_upstream(events_handler(0.1, 8))
    mesh = await make_mesh({"svc": service(up.port)})
    started = time.monotonic()
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        await request(mesh.outbound, get("/events", extra="x-meshlet-timeout-ms: 350\r\n"))
    assert time.monotonic() - started < 0.7
    # the same from another hop (x-meshlet-attempt): what it waits for the head
    hop = "x-meshlet-attempt: 1\r\nx-meshlet-deadline-ms: 350\r\n"
    (resp,) = await request(mesh.outbound, get("/events", extra=hop))
    assert resp.body == events(8)


async def test_a_silent_tunnel_is_closed(upstreams: Upstreams, make_mesh: MakeMesh) -> None:
    up = await upstreams("up")
    mesh = await make_mesh({"svc": service(up.port, tunnel_idle_timeout_ms=300)})
    url = f"http://{LOCAL}:{mesh.outbound}/ws"
    async with aiohttp.ClientSession() as http, http.ws_connect(url, headers={"Host": "svc"}) as ws:
        for i in range(8):  # busy for 0.8 s: open
            await asyncio.sleep(0.1)
            await ws.send_str(f"{i}")
            assert (await ws.receive(timeout=2)).data == f"echo: {i}"
        started = time.monotonic()
        msg = await ws.receive(timeout=3)  # then silent: closed
        assert msg.type in (
            aiohttp.WSMsgType.CLOSE,
            aiohttp.WSMsgType.CLOSED,
            aiohttp.WSMsgType.ERROR,
        )
        assert 0.3 <= time.monotonic() - started < 1.0
    assert mesh.sidecar.outbound.counters.tunnel_idle == 1


@pytest.fixture
async def mesh_up(upstreams: Upstreams, make_mesh: MakeMesh) -> Mesh:
    up = await upstreams("up")
    return await make_mesh({"svc": service(up.port, timeout_ms=10_000)})
