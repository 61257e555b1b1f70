"""Regressions from the data-path review: smuggling, desync, framing, limits, back-pressure."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest

from tests.sidecar.conftest import (
    LOCAL,
    Mesh,
    RawUpstream,
    Upstream,
    exchange,
    get,
    read_head,
    read_response,
    request,
    service,
)

MakeMesh = Callable[..., Awaitable[Mesh]]
Upstreams = Callable[[str], Awaitable[Upstream]]
RawUpstreams = Callable[..., Awaitable[RawUpstream]]


def no_callback_errors(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


async def test_connection_cannot_strip_framing_headers(
    raw_upstream: RawUpstreams, make_mesh: MakeMesh
) -> None:
    """``Connection: content-length`` once forwarded the body without its framing: the body
    became a second request upstream, and the next client's request was glued to it."""
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_head(reader)
            seen.append(head.split(b"\r\n")[0])
            found = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            if found:
                await reader.readexactly(int(found.group(1)))
            body = b"answer to " + head.split(b"\r\n")[0]
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    up = await raw_upstream(handler)
    mesh = await make_mesh({"svc": service(up.port)})
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: svc\r\nX: "
    (resp,) = await request(
        mesh.outbound,
        b"POST /a HTTP/1.1\r\nHost: svc\r\nConnection: content-length, host, x-request-id\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(smuggled), smuggled),
    )
    assert resp.body == b"answer to POST /a HTTP/1.1"
    (victim,) = await request(mesh.outbound, get("/victim"))
    assert victim.body == b"answer to GET /victim HTTP/1.1"
    assert seen == [b"POST /a HTTP/1.1", b"GET /victim HTTP/1.1"]


@pytest.mark.parametrize(
    "extra",
    [b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nPOISON", b"HTTP/1.1 200 OK\r\nContent-Le"],
    ids=["whole", "partial"],
)
@pytest.mark.parametrize("pipelined", [True, False])
async def test_bytes_after_a_complete_response_never_reach_the_next_request(
    raw_upstream: RawUpstreams, make_mesh: MakeMesh, pipelined: bool, extra: bytes
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            line = (await read_head(reader)).split(b"\r\n")[0]
            if b"/first" in line:  # a broken app: a 204, then (the start of) an extra response
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n" + extra)
            else:
                body = b"real " + line
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    up = await raw_upstream(handler)
    mesh = await make_mesh({"svc": service(up.port)})
    if pipelined:
        first, second = await request(mesh.outbound, get("/first") + get("/second"), count=2)
    else:
        (first,) = await request(mesh.outbound, get("/first"))
        (second,) = await request(mesh.outbound, get("/second"))
    assert (first.status, first.body) == (204, b"")
    assert (second.status, second.body) == (200, b"real GET /second HTTP/1.1")


async def test_a_read_until_close_body_cut_by_a_reset_does_not_look_complete(
    raw_upstream: RawUpstreams, make_mesh: MakeMesh
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\npartial")
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST, not FIN

    up = await raw_upstream(handler)
    mesh = await make_mesh({"svc": service(up.port)})
    reader, writer = await asyncio.open_connection(LOCAL, mesh.outbound)
    writer.write(get("/"))
    async with asyncio.timeout(5):
        raw = await reader.read()  # the sidecar cuts the client connection too
    writer.close()
    assert not raw.endswith(b"0\r\n\r\n")  # no last chunk: it does not look complete


async def test_an_unasked_101_is_a_502_without_errors(
    raw_upstream: RawUpstreams, make_mesh: MakeMesh, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\nRAW"
        )
        await asyncio.sleep(1)

    up = await raw_upstream(handler)
    mesh = await make_mesh({"svc": service(up.port)})
    (resp,) = await request(mesh.outbound, get("/"))
    assert (resp.status, resp.header("x-meshlet-error")) == (502, "upstream-protocol-error")
    await asyncio.sleep(0.1)
    no_callback_errors(caplog)


async def test_a_thousand_pipelined_local_errors(make_mesh: MakeMesh) -> None:
    mesh = await make_mesh({})
    responses = await request(mesh.outbound, get("/", "nope") * 1000, count=1000)
    assert [r.status for r in responses] == [404] * 1000


async def test_an_upstream_that_accepts_and_hangs_up_is_a_prompt_502(
    raw_upstream: RawUpstreams, make_mesh: MakeMesh, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()

    up = await raw_upstream(handler)
    mesh = await make_mesh({"svc": service(up.port, timeout_ms=10_000)})
    for _ in range(20):
        async with asyncio.timeout(2):  # never the 10 s route timeout
            (resp,) = await request(mesh.outbound, get("/"))
        assert (resp.status, resp.header("x-meshlet-error")) == (502, "upstream-reset")
    no_callback_errors(caplog)


async def test_one_huge_header_line_is_431(mesh_up: Mesh) -> None:
    reader, writer = await asyncio.open_connection(LOCAL, mesh_up.outbound)
    writer.write(b"GET / HTTP/1.1\r\nHost: svc\r\nX-Huge: ")
    sent = 0
    try:
        for _ in range(400):  # up to 4 MB, in pieces; the sidecar must stop it at ~64 KiB
            writer.write(b"a" * 10_000)
            await writer.drain()
            sent += 10_000
            await asyncio.sleep(0)
    except ConnectionError:
        pass
    async with asyncio.timeout(5):
        answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert b"head larger than 65536 bytes" in answer


async def test_huge_request_trailers_are_431(mesh_up: Mesh) -> None:
    trailers = b"".join(b"X-T%d: %s\r\n" % (i, b"t" * 1000) for i in range(90))
    raw = await exchange(
        mesh_up.outbound,
        b"POST /echo HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nhi\r\n0\r\n" + trailers + b"\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 431 ")
    assert b"trailer section larger than" in raw
    many = b"".join(b"X-T%d: 1\r\n" % i for i in range(101))
    raw = await exchange(
        mesh_up.outbound,
        b"POST /echo HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nhi\r\n0\r\n" + many + b"\r\n",
    )
    assert raw.startswith(b"HTTP/1.1 431 ")
    assert b"too many trailers" in raw


async def test_huge_upstream_heads_and_trailers(
    raw_upstream: RawUpstreams, make_mesh: MakeMesh
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = (await read_head(reader)).split(b"\r\n")[0]
        if b"/head" in line:
            writer.write(b"HTTP/1.1 200 OK\r\nX-Huge: ")
            for _ in range(100):
                writer.write(b"h" * 10_000)
                await writer.drain()
        else:
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: "
            )
            for _ in range(100):
                writer.write(b"t" * 10_000)
                await writer.drain()
        await asyncio.sleep(1)

    up = await raw_upstream(handler)
    mesh = await make_mesh({"svc": service(up.port)})
    (resp,) = await request(mesh.outbound, get("/head"))
    assert (resp.status, resp.header("x-meshlet-error")) == (502, "upstream-protocol-error")
    raw = await exchange(mesh.outbound, get("/trailers"))
    assert b"0\r\n" not in raw  # cut: the response never looks complete
    assert b"X-T" not in raw


async def test_upstream_framing_header_problems(
    raw_upstream: RawUpstreams, make_mesh: MakeMesh
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = (await read_head(reader)).split(b"\r\n")[0]
        if b"/listed" in line:
            writer.write(
                b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 2\r\n\r\nok"
            )
            await read_head(reader)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nGZIPPED")
            writer.close()

    up = await raw_upstream(handler)
    mesh = await make_mesh({"svc": service(up.port)})
    (listed,) = await request(mesh.outbound, get("/listed"))
    assert (listed.header("content-length"), listed.body) == ("2", b"ok")
    (coded,) = await request(mesh.outbound, get("/coded"))
    assert coded.header("transfer-encoding") == "gzip, chunked"
    assert coded.body == b"GZIPPED"


async def test_route_timeout_counts_from_the_end_of_the_request(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    up = await upstreams("up")
    mesh = await make_mesh(
        {"svc": service(up.port, timeout_ms=300, connect_timeout_ms=100)},
        min_data_rate=5,
        data_rate_grace=0.3,
    )
    reader, writer = await asyncio.open_connection(LOCAL, mesh.outbound)
    writer.write(b"POST /consume HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\n")
    for _ in range(10):  # a steady upload (10 bytes/s) longer than the timeout
        await asyncio.sleep(0.1)
        writer.write(b"x")
    resp = await read_response(reader)
    assert (resp.status, json.loads(resp.body)) == (200, {"received": 10})
    # a stalled upload (under 5 bytes/s after 0.3 s) is the client's fault: 408
    writer.write(b"POST /consume HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\nxx")
    resp = await read_response(reader)
    writer.close()
    assert (resp.status, resp.header("x-meshlet-error")) == (408, "request-timeout")


async def test_an_early_response_reaches_a_client_still_uploading(
    raw_upstream: RawUpstreams, make_mesh: MakeMesh
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\n\r\ntoo big!")
        await asyncio.sleep(2)

    up = await raw_upstream(handler)
    mesh = await make_mesh({"svc": service(up.port)})
    reader, writer = await asyncio.open_connection(LOCAL, mesh.outbound)
    size = 8 * 1024 * 1024
    writer.write(b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n" % size)
    block = b"u" * 65536
    try:
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()
    except ConnectionError:
        pass
    resp = await read_response(reader)  # not a reset: the sidecar lingers
    writer.close()
    assert (resp.status, resp.body) == (413, b"too big!")
    assert resp.header("connection") == "close"


async def test_a_paused_client_keeps_the_next_pipelined_upstream_paused(mesh_up: Mesh) -> None:
    size = 20 * 1024 * 1024
    reader, writer = await asyncio.open_connection(LOCAL, mesh_up.outbound, limit=1 << 16)
    writer.write(get(f"/sized?size={size}") + get(f"/sized?size={size}"))
    await asyncio.sleep(1.0)  # read nothing
    (ds,) = mesh_up.sidecar.outbound.connections
    assert ds.transport is not None
    assert ds.transport.get_write_buffer_size() < 4 * 1024 * 1024
    first = await read_response(reader)
    await asyncio.sleep(1.0)  # read nothing again, now that the second exchange is active
    assert ds.transport.get_write_buffer_size() < 4 * 1024 * 1024
    second = await read_response(reader)
    writer.close()
    assert len(first.body) == len(second.body) == size


@pytest.fixture
async def mesh_up(upstreams: Upstreams, make_mesh: MakeMesh) -> Mesh:
    up = await upstreams("up")
    return await make_mesh({"svc": service(up.port, timeout_ms=10_000)})
