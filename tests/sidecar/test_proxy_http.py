"""HTTP/1.1 correctness through the proxy, with real upstreams and raw-socket clients."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from sidecar.proxy.watch import Timeouts
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


@pytest.fixture
async def mesh(upstreams: Upstreams, make_mesh: MakeMesh) -> Mesh:
    up = await upstreams("up")
    return await make_mesh({"svc": service(up.port, timeout_ms=3000)})


def seen_headers(body: bytes) -> list[tuple[str, str]]:
    return [(k, v) for k, v in json.loads(body)["headers"]]


# -- bodies -----------------------------------------------------------------------------------


async def test_content_length_and_chunked_request_bodies(mesh: Mesh) -> None:
    body = b"z" * 100_000
    (resp,) = await request(
        mesh.outbound,
        b"POST /echo HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
    )
    assert json.loads(resp.body)["body_length"] == 100_000
    chunked = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    (resp,) = await request(
        mesh.outbound,
        b"POST /echo HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked,
    )
    seen = json.loads(resp.body)
    assert (seen["body_length"], seen["body_sample"]) == (11, "hello world")


async def test_chunked_response_with_trailers_both_ways(
    raw_upstream: RawUpstreams, make_mesh: MakeMesh
) -> None:
    got: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        body = await reader.readuntil(b"0\r\n")
        trailer = await reader.readuntil(b"\r\n\r\n")
        got.append(head + body + trailer)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
            b"3\r\nabc\r\n3\r\ndef\r\n0\r\nX-Checksum: 42\r\n\r\n"
        )

    up = await raw_upstream(handler)
    mesh = await make_mesh({"svc": service(up.port)})
    (resp,) = await request(
        mesh.outbound,
        b"POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\nTrailer: X-Req\r\n\r\n"
        b"2\r\nhi\r\n0\r\nX-Req: yes\r\n\r\n",
    )
    assert resp.body == b"abcdef"
    assert resp.trailers == [("X-Checksum", "42")]
    assert b"2\r\nhi\r\n0\r\nX-Req: yes\r\n\r\n" in got[0]


async def test_read_until_close_response_is_rechunked_for_http11(
    raw_upstream: RawUpstreams, make_mesh: MakeMesh
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil-close")

    up = await raw_upstream(handler)
    mesh = await make_mesh({"svc": service(up.port)})
    r1, r2 = await request(mesh.outbound, get("/") + get("/"), count=2)
    assert r1.header("transfer-encoding") == "chunked"
    assert (r1.body, r2.body) == (b"until-close", b"until-close")  # and the client stayed
    # an HTTP/1.0 client gets the body delimited by the close
    raw = await exchange(mesh.outbound, b"GET / HTTP/1.0\r\nHost: svc\r\n\r\n")
    assert raw.endswith(b"\r\n\r\nuntil-close")
    assert b"transfer-encoding" not in raw.lower()


async def test_head_204_304_and_100_continue(mesh: Mesh) -> None:
    (head,) = await request(
        mesh.outbound, b"HEAD /sized?size=5000 HTTP/1.1\r\nHost: svc\r\n\r\n", head_request=True
    )
    assert (head.status, head.header("content-length"), head.body) == (200, "5000", b"")
    # the connection stays usable after a HEAD
    reader, writer = await asyncio.open_connection(LOCAL, mesh.outbound)
    writer.write(b"HEAD /sized?size=10 HTTP/1.1\r\nHost: svc\r\n\r\n" + get("/sized?size=3"))
    first = await read_response(reader, head_request=True)
    second = await read_response(reader)
    writer.close()
    assert (first.body, second.body) == (b"", b"xxx")

    no_content, not_modified = await request(
        mesh.outbound, get("/status/204") + get("/status/304"), count=2
    )
    assert (no_content.status, no_content.body) == (204, b"")
    assert (not_modified.status, not_modified.body) == (304, b"")

    reader, writer = await asyncio.open_connection(LOCAL, mesh.outbound)
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: svc\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = await read_response(reader)
    assert interim.status == 100
    writer.write(b"body")
    final = await read_response(reader)
    writer.close()
    assert (final.status, json.loads(final.body)["body_length"]) == (200, 4)


async def test_large_bodies_stream(mesh: Mesh) -> None:
    """Tens of MB both ways through the in-process proxy (the 1 GiB runs are in integration)."""
    size = 20 * 1024 * 1024
    (resp,) = await request(mesh.outbound, get(f"/sized?size={size}"))
    assert len(resp.body) == size
    (resp,) = await request(mesh.outbound, get(f"/chunked?size={size}"))
    assert len(resp.body) == size

    reader, writer = await asyncio.open_connection(LOCAL, mesh.outbound)
    writer.write(b"POST /consume HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n" % size)
    block = b"u" * 65536
    for _ in range(size // len(block)):
        writer.write(block)
        await writer.drain()
    resp = await read_response(reader)
    writer.close()
    assert json.loads(resp.body) == {"received": size}


# -- connections ------------------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order(mesh: Mesh) -> None:
    raw = (
        get("/slow?delay=0.2")
        + b"POST /echo/2 HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n\r\nabc"
        + get("/echo/3")
    )
    slow, second, third = await request(mesh.outbound, raw, count=3)
    assert slow.body == b"slow"
    assert json.loads(second.body)["path"] == "/echo/2"
    assert json.loads(second.body)["body_length"] == 3
    assert json.loads(third.body)["path"] == "/echo/3"


async def test_http10_clients(mesh: Mesh) -> None:
    raw = await exchange(mesh.outbound, b"GET /sized?size=4 HTTP/1.0\r\nHost: svc\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200")
    assert raw.endswith(b"\r\n\r\nxxxx")
    assert b"connection: close" in raw.lower()
    r1, r2 = await request(
        mesh.outbound,
        b"GET /sized?size=2 HTTP/1.0\r\nHost: svc\r\nConnection: keep-alive\r\n\r\n" * 2,
        count=2,
    )
    assert r1.header("connection") == "keep-alive"
    assert (r1.body, r2.body) == (b"xx", b"xx")


async def test_each_pipelined_request_has_its_own_version(mesh: Mesh) -> None:
    """The version is read off the read's first request line only: an HTTP/1.0 request
    behind an HTTP/1.1 one, the same up to the version, in the same read, stays HTTP/1.0."""
    line = b"GET /sized?size=2 HTTP/1.%d\r\nHost: svc\r\nConnection: keep-alive\r\n\r\n"
    r1, r2, r3 = await request(mesh.outbound, line % 1 + line % 0 + line % 1, count=3)
    # an HTTP/1.0 client is told the connection stays open; an HTTP/1.1 one need not be
    assert [r.header("connection") for r in (r1, r2, r3)] == [None, "keep-alive", None]
    assert (r1.body, r2.body, r3.body) == (b"xx", b"xx", b"xx")


# -- headers ----------------------------------------------------------------------------------


async def test_hop_by_hop_and_forwarding_headers(mesh: Mesh) -> None:
    raw = (
        b"GET /echo HTTP/1.1\r\nHost: svc\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\n"
        b"Keep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X-T\r\nProxy-Authorization: p\r\n"
        b"Upgrade: h2c\r\nX-Forwarded-For: 10.1.1.1\r\nX-Forwarded-Proto: https\r\n"
        b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n"
        b"tracestate: congo=t61rcWkgMzE\r\nX-A: 1\r\nX-B: 2\r\nX-A: 3\r\n\r\n"
    )
    (resp,) = await request(mesh.outbound, raw)
    headers = seen_headers(resp.body)
    names = [k.lower() for k, _ in headers]
    for gone in (
        "connection",
        "x-secret",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "upgrade",
    ):
        assert gone not in names, gone
    got = {k.lower(): v for k, v in headers}
    assert got["x-forwarded-for"] == "10.1.1.1, 127.0.0.1"
    assert got["x-forwarded-proto"] == "http"
    assert got["traceparent"] == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert got["tracestate"] == "congo=t61rcWkgMzE"
    assert [(k, v) for k, v in headers if k.startswith("X-") and k in ("X-A", "X-B")] == [
        ("X-A", "1"),
        ("X-B", "2"),
        ("X-A", "3"),
    ]
    request_id = got["x-request-id"]
    assert len(request_id) == 36
    (resp,) = await request(mesh.outbound, get("/echo", extra="X-Request-Id: mine\r\n"))
    assert {k.lower(): v for k, v in seen_headers(resp.body)}["x-request-id"] == "mine"


async def test_response_headers_keep_order_and_repeats(mesh: Mesh) -> None:
    (resp,) = await request(mesh.outbound, get("/cookies"))
    assert resp.all("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
    names = [k for k, _ in resp.headers]
    assert names.index("X-Order-1") < names.index("X-Order-2")
    assert resp.header("keep-alive") is None


async def test_websocket_becomes_a_tunnel(mesh: Mesh) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"http://{LOCAL}:{mesh.outbound}/ws", headers={"Host": "svc"}) as ws,
    ):
        for text in ("one", "two"):
            await ws.send_str(text)
            msg = await ws.receive(timeout=5)
            assert msg.data == f"echo: {text}"


# -- malformed requests --------------------------------------------------------------------------

MALFORMED = {
    "cl and te": b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "differing cl": b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n"
    b"Content-Length: 6\r\n\r\n",
    "te not chunked": b"POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: gzip\r\n\r\n",
    "te chunked not last": b"POST / HTTP/1.1\r\nHost: svc\r\n"
    b"Transfer-Encoding: chunked, gzip\r\n\r\n",
    "bad chunk size": b"POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: svc\r\nX-A: b\r\n c\r\n\r\n",
    "bare lf": b"GET / HTTP/1.1\nHost: svc\n\n",
    "bare cr": b"GET / HTTP/1.1\r\nHost: svc\rX: y\r\n\r\n",
    "nul in header": b"GET / HTTP/1.1\r\nHost: svc\r\nX: a\x00b\r\n\r\n",
    "bad method": b"G@T / HTTP/1.1\r\nHost: svc\r\n\r\n",
    "bad version": b"GET / HTTP/3.7\r\nHost: svc\r\n\r\n",
    "http/2.0": b"GET / HTTP/2.0\r\nHost: svc\r\n\r\n",
    "http/0.9": b"GET / HTTP/0.9\r\nHost: svc\r\n\r\n",
    "two hosts": b"GET / HTTP/1.1\r\nHost: svc\r\nHost: other\r\n\r\n",
    "two hosts, absolute-form": b"GET http://svc/ HTTP/1.1\r\nHost: svc\r\nhost: svc\r\n\r\n",
    "no host": b"GET / HTTP/1.1\r\n\r\n",
    "bad target": b"GET https://svc/ HTTP/1.1\r\nHost: svc\r\n\r\n",
    "connect": b"CONNECT svc:443 HTTP/1.1\r\nHost: svc\r\n\r\n",  # (a mesh service)
    "connect without a port": b"CONNECT example.com HTTP/1.1\r\nHost: example.com\r\n\r\n",
    "connect to a path": b"CONNECT /x:443 HTTP/1.1\r\nHost: x\r\n\r\n",
    "connect with userinfo": b"CONNECT u@example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_malformed_requests_get_400_and_a_closed_connection(mesh: Mesh, name: str) -> None:
    raw = await exchange(mesh.outbound, MALFORMED[name] + get("/echo"))
    assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n"), raw[:200]
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"x-meshlet-error: bad-request" in head
    assert b"connection: close" in head
    length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
    assert body[length:] == b""  # nothing after it was served: closed


async def test_oversized_heads_get_431(mesh: Mesh) -> None:
    big = b"GET / HTTP/1.1\r\nHost: svc\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    raw = await exchange(mesh.outbound, big)
    assert raw.startswith(b"HTTP/1.1 431 ")
    many = b"GET / HTTP/1.1\r\nHost: svc\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101))
    raw = await exchange(mesh.outbound, many + b"\r\n")
    assert raw.startswith(b"HTTP/1.1 431 ")
    assert b"more than 100 headers" in raw
    ok = b"GET /echo HTTP/1.1\r\nHost: svc\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(99))
    (resp,) = await request(mesh.outbound, ok + b"\r\n")
    assert resp.status == 200


# -- timeouts and failures ------------------------------------------------------------------------


async def test_head_and_idle_timeouts(upstreams: Upstreams, make_mesh: MakeMesh) -> None:
    up = await upstreams("up")
    mesh = await make_mesh({"svc": service(up.port)}, timeouts=Timeouts(head=0.3, idle=0.3))
    raw = await exchange(mesh.outbound, b"GET / HTTP/1.1\r\nHost: sv")
    assert raw.startswith(b"HTTP/1.1 408 ")
    reader, writer = await asyncio.open_connection(LOCAL, mesh.outbound)
    writer.write(get("/echo"))
    await read_response(reader)
    async with asyncio.timeout(2):
        assert await reader.read() == b""  # the idle keep-alive connection was closed
    writer.close()


async def test_a_head_begun_after_a_request_has_the_head_timeout_however_it_trickles(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    up = await upstreams("up")
    mesh = await make_mesh({"svc": service(up.port)}, timeouts=Timeouts(head=0.3, idle=30))
    reader, writer = await asyncio.open_connection(LOCAL, mesh.outbound)
    writer.write(get("/echo"))
    await read_response(reader)  # (the connection waits idle: 30 s)
    began = asyncio.get_running_loop().time()
    writer.write(b"GET / HTTP/1.1\r\nHo")
    answer = b""
    async with asyncio.timeout(3):
        while not answer:
            try:  # a byte of the head every 0.1 s does not move its deadline
                answer = await asyncio.wait_for(reader.read(100), 0.1)
            except TimeoutError:
                writer.write(b"x")
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert asyncio.get_running_loop().time() - began < 2
    writer.close()


async def test_connect_failures(raw_upstream: RawUpstreams, make_mesh: MakeMesh) -> None:
    import socket

    refused = socket.socket()
    refused.bind((LOCAL, 0))
    port = refused.getsockname()[1]
    refused.close()  # nothing listens there now
    mesh = await make_mesh({"svc": service(port, connect_timeout_ms=300)})
    (resp,) = await request(mesh.outbound, get("/"))
    assert (resp.status, resp.header("x-meshlet-error")) == (502, "upstream-connect-failure")
    assert f"127.0.0.1:{port}".encode() in resp.body


async def test_connect_timeout(make_mesh: MakeMesh) -> None:
    import socket

    full = socket.socket()
    full.bind((LOCAL, 0))
    full.listen(0)
    filler = socket.create_connection(full.getsockname())  # the backlog is full now
    mesh = await make_mesh(
        {"svc": service(full.getsockname()[1], connect_timeout_ms=200, timeout_ms=3000)}
    )
    (resp,) = await request(mesh.outbound, get("/"))
    assert (resp.status, resp.header("x-meshlet-error")) == (502, "upstream-connect-failure")
    assert b"timed out after 200 ms" in resp.body
    filler.close()
    full.close()


async def test_route_timeout_is_504(upstreams: Upstreams, make_mesh: MakeMesh) -> None:
    up = await upstreams("up")
    mesh = await make_mesh({"svc": service(up.port, timeout_ms=200, connect_timeout_ms=100)})
    (resp,) = await request(mesh.outbound, get("/slow?delay=2"))
    assert (resp.status, resp.header("x-meshlet-error")) == (504, "upstream-timeout")
    assert b"200 ms" in resp.body


async def test_upstream_reset_before_response(
    raw_upstream: RawUpstreams, make_mesh: MakeMesh
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.transport.abort()

    up = await raw_upstream(handler)
    mesh = await make_mesh({"svc": service(up.port)})
    (resp,) = await request(mesh.outbound, get("/"))
    assert (resp.status, resp.header("x-meshlet-error")) == (502, "upstream-reset")


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    ],
)
async def test_an_upstream_answer_with_a_length_and_chunks_is_refused(
    raw_upstream: RawUpstreams, make_mesh: MakeMesh, answer: bytes
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(answer)  # (in one read: the pure build classifies such a head whole)
        await writer.drain()

    up = await raw_upstream(handler)
    mesh = await make_mesh({"svc": service(up.port)})
    (resp,) = await request(mesh.outbound, get("/"))
    assert (resp.status, resp.header("x-meshlet-error")) == (502, "upstream-protocol-error")


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_upstream_closing_mid_body_never_looks_complete(
    raw_upstream: RawUpstreams, make_mesh: MakeMesh, framing: str
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        if framing == "length":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\npartial\r\n")
        await writer.drain()
        writer.transport.abort()

    up = await raw_upstream(handler)
    mesh = await make_mesh({"svc": service(up.port)})
    raw = await exchange(mesh.outbound, get("/"))
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    if framing == "length":
        assert body == b"partial"  # 7 of 100 bytes, then the connection closed
    else:
        assert body == b"7\r\npartial\r\n"  # no last chunk
        assert not body.endswith(b"0\r\n\r\n")


async def test_client_disconnect_cancels_the_upstream_request(
    raw_upstream: RawUpstreams, make_mesh: MakeMesh
) -> None:
    upstream_saw_close = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        try:
            if await reader.read(1) == b"":
                upstream_saw_close.set()
        except ConnectionResetError:
            upstream_saw_close.set()

    up = await raw_upstream(handler)
    mesh = await make_mesh({"svc": service(up.port)})
    _reader, writer = await asyncio.open_connection(LOCAL, mesh.outbound)
    writer.write(get("/"))
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    async with asyncio.timeout(2):
        await upstream_saw_close.wait()
