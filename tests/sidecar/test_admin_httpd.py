"""The admin ports' own HTTP/1.1 server, with a stand-in answer and raw sockets: keep-alive and
pipelining, and the bounds that keep a client from growing memory or holding connections.
Also: the admin modules load neither aiohttp nor prometheus_client."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import uvloop

from sidecar.admin.httpd import Limits, Port
from sidecar.admin.messages import Request, Response, json_response
from tests.sidecar.conftest import LOCAL, read_response

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
StartPort = Callable[..., Awaitable[Port]]
Connect = Callable[[Port], Awaitable[Streams]]
BIG = b"x" * (1 << 20)


def answer(request: Request) -> Response:
    """What a request looked like, as JSON; ``/big``: 1 MiB; ``/bug``: raises."""
    if request.path == "/big":
        return Response(200, BIG, "application/octet-stream")
    if request.path == "/bug":
        raise RuntimeError("a bug")
    return json_response(
        {
            "method": request.method,
            "path": request.path,
            "format": request.arg("format", "json"),
            "host": request.headers.get("host"),
            "peer": request.peer,
            "body": request.body.decode(),
        }
    )


@pytest.fixture
async def start_port() -> AsyncIterator[StartPort]:
    ports: list[Port] = []

    async def start(**limits: float) -> Port:
        port = Port("admin", answer, Limits(**limits))  # type: ignore[arg-type]
        ports.append(port)
        await port.start(LOCAL, 0)
        return port

    yield start
    for port in ports:
        await port.close()


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[Port], Awaitable[Streams]]]:
    """Client connections to a port, closed at the end of the test."""
    writers: list[asyncio.StreamWriter] = []

    async def open_to(port: Port) -> Streams:
        assert port.address is not None
        reader, writer = await asyncio.open_connection(LOCAL, port.address[1])
        writers.append(writer)
        return reader, writer

    yield open_to
    for writer in writers:
        writer.close()


async def closed(reader: asyncio.StreamReader) -> bool:
    async with asyncio.timeout(5):
        return await reader.read(1) == b""


async def test_keep_alive_and_pipelined_requests_in_order(
    start_port: StartPort, connect: Connect
) -> None:
    port = await start_port()
    reader, writer = await connect(port)
    writer.write(b"GET /a?format=text HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    first = await read_response(reader)
    assert first.status == 200
    assert first.header("Content-Type") == "application/json; charset=utf-8"
    assert json.loads(first.body) == {
        "method": "GET",
        "path": "/a",
        "format": "text",
        "host": "127.0.0.1",
        "peer": LOCAL,
        "body": "",
    }
    body = b'{"why": "deploy"}'
    writer.write(
        b"POST /b%%20c HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
        + b"HEAD /d HTTP/1.1\r\nHost: h\r\n\r\nGET /e HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    second = json.loads((await read_response(reader)).body)
    assert (second["path"], second["body"]) == ("/b c", body.decode())
    head = await read_response(reader, head_request=True)
    assert head.status == 200
    assert int(head.header("Content-Length") or 0) > 0  # the length a GET would have had
    assert json.loads((await read_response(reader)).body)["path"] == "/e"
    assert port.statistics().answered == 4


async def test_http_1_0_and_connection_close_close_after_the_answer(
    start_port: StartPort,
    connect: Connect,
) -> None:
    port = await start_port()
    for raw in (b"GET / HTTP/1.0\r\n\r\n", b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"):
        reader, writer = await connect(port)
        writer.write(raw)
        resp = await read_response(reader)
        assert (resp.status, resp.header("Connection")) == (200, "close")
        assert await closed(reader)


async def test_a_head_split_anywhere_is_read_whole(start_port: StartPort, connect: Connect) -> None:
    port = await start_port()
    reader, writer = await connect(port)
    raw = b"GET /split HTTP/1.1\r\nHost: h\r\n\r\n"
    for i in range(len(raw)):
        writer.write(raw[i : i + 1])
        await writer.drain()
    assert json.loads((await read_response(reader)).body)["path"] == "/split"


@pytest.mark.parametrize(
    ("raw", "status", "error"),
    [
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 70000 + b"\r\n\r\n", 431, "request head"),
        (b"GET / HTTP/1.1\r\n" + b"X: 1\r\n" * 101 + b"\r\n", 431, "more than 100 headers"),
        (b"POST / HTTP/1.1\r\nContent-Length: 65537\r\n\r\n", 413, "at most 65536 bytes"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411, "chunked"),
        (b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400, ""),
        (b"NOT HTTP AT ALL\r\n\r\n", 400, ""),
        (b"GET / HTTP/2.0\r\n\r\n", 400, "HTTP/2.0 is not supported"),
        (b"GET ftp://x/ HTTP/1.1\r\n\r\n", 400, "not origin-form"),
    ],
)
async def test_a_bad_request_is_a_json_error_and_the_connection_closes(
    start_port: StartPort, connect: Connect, raw: bytes, status: int, error: str
) -> None:
    port = await start_port()
    reader, writer = await connect(port)
    writer.write(raw)
    resp = await read_response(reader)
    assert resp.status == status
    assert resp.header("Content-Type") == "application/json; charset=utf-8"
    assert error in json.loads(resp.body)["error"]
    assert b"Traceback" not in resp.body
    assert await closed(reader)
    assert port.statistics().bad_requests == 1


async def test_a_head_without_its_end_is_refused_at_the_limit(
    start_port: StartPort, connect: Connect
) -> None:
    """The bytes of an unfinished head are counted as they come, not when it ends."""
    port = await start_port()
    reader, writer = await connect(port)
    writer.write(b"GET / HTTP/1.1\r\nX: ")
    for _ in range(70):
        writer.write(b"a" * 1024)
    resp = await read_response(reader)
    assert resp.status == 431


async def test_an_answer_that_raises_is_a_json_500(
    start_port: StartPort, connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    port = await start_port()
    reader, writer = await connect(port)
    writer.write(b"GET /bug HTTP/1.1\r\nHost: h\r\n\r\nGET /after HTTP/1.1\r\nHost: h\r\n\r\n")
    resp = await read_response(reader)
    assert (resp.status, json.loads(resp.body)) == (500, {"error": "internal error"})
    assert json.loads((await read_response(reader)).body)["path"] == "/after"
    assert "admin port: GET /bug failed" in caplog.text


async def test_expect_100_continue_is_answered_before_the_body(
    start_port: StartPort, connect: Connect
) -> None:
    port = await start_port()
    reader, writer = await connect(port)
    writer.write(
        b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = await read_response(reader)
    assert interim.status == 100
    writer.write(b"{}")
    assert json.loads((await read_response(reader)).body)["body"] == "{}"


async def test_an_idle_connection_is_closed(start_port: StartPort, connect: Connect) -> None:
    port = await start_port(idle_timeout=0.2)
    reader, writer = await connect(port)
    writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert (await read_response(reader)).status == 200
    assert await closed(reader)
    assert port.statistics().connections == 0


async def test_a_request_that_does_not_finish_is_answered_408(
    start_port: StartPort, connect: Connect
) -> None:
    port = await start_port(request_timeout=0.2)
    reader, writer = await connect(port)
    writer.write(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n{")
    resp = await read_response(reader)
    assert resp.status == 408
    assert "did not arrive within 0.2 s" in json.loads(resp.body)["error"]
    assert await closed(reader)


async def test_connections_over_the_limit_are_closed_at_once(
    start_port: StartPort, connect: Connect
) -> None:
    port = await start_port(max_connections=2)
    kept = [await connect(port) for _ in range(2)]
    for reader, writer in kept:  # (both accepted and answering)
        writer.write(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        assert (await read_response(reader)).status == 200
    reader, writer = await connect(port)
    assert await closed(reader)
    assert port.statistics().refused_connections == 1


async def test_a_client_that_does_not_read_its_answers_is_not_answered_further(
    start_port: StartPort,
    connect: Connect,
) -> None:
    """Thirty 1 MiB answers asked for at once: while the client reads none, the sidecar stops
    reading (the kernel's buffers hold a few answers, the sidecar about one), and what the
    client sends meanwhile waits in the kernel, not in the sidecar; then all come."""
    port = await start_port()
    reader, writer = await connect(port)
    ask = b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n"
    writer.write(ask * 30)
    await asyncio.sleep(0.3)
    assert port.statistics().answered < 20
    for _ in range(100):  # and asking for more meanwhile holds no more than a read of it
        writer.write(b"GET /small HTTP/1.1\r\nHost: h\r\n\r\n" * 1000)
        await asyncio.sleep(0)
    await asyncio.sleep(0.3)
    assert port.statistics().answered < 20
    assert port.statistics().buffered < 300_000
    for _ in range(30):
        resp = await read_response(reader)
        assert resp.body == BIG
    for _ in range(10):  # then the rest, in order
        assert json.loads((await read_response(reader)).body)["path"] == "/small"


class Streamed:
    """An answer written as it is produced: ``pieces`` of 64 KiB, counted as they are taken;
    any other path is ``answer``'s."""

    PIECE = b"y" * (64 * 1024)

    def __init__(self, pieces: int) -> None:
        self.pieces = pieces
        self.taken = 0

    def answer(self, request: Request) -> Response:
        if request.path != "/stream":
            return answer(request)
        return Response(200, content_type="text/plain", stream=self.produce())

    def produce(self) -> Iterator[bytes]:
        for _ in range(self.pieces):
            self.taken += 1
            yield self.PIECE


@pytest.fixture
async def streamed_port() -> AsyncIterator[tuple[Port, Streamed]]:
    streamed = Streamed(256)  # 16 MiB: more than the kernel's buffers on the way hold
    port = Port("metrics", streamed.answer)
    await port.start(LOCAL, 0)
    yield port, streamed
    await port.close()


async def test_a_streamed_answer_is_produced_as_the_client_takes_it_in(
    streamed_port: tuple[Port, Streamed], connect: Connect
) -> None:
    """Chunked, a piece whenever the transport's buffer has room: while the client reads
    nothing, most of it is not produced yet; pipelined requests wait for its end."""
    port, streamed = streamed_port
    reader, writer = await connect(port)
    writer.write(b"GET /stream HTTP/1.1\r\nHost: h\r\n\r\nGET /after HTTP/1.1\r\nHost: h\r\n\r\n")
    await asyncio.sleep(0.3)
    assert 0 < streamed.taken < streamed.pieces / 2
    assert port.statistics().answered == 1
    resp = await read_response(reader)
    assert (resp.status, resp.header("Transfer-Encoding"), resp.header("Content-Length")) == (
        200,
        "chunked",
        None,
    )
    assert resp.body == Streamed.PIECE * streamed.pieces
    assert json.loads((await read_response(reader)).body)["path"] == "/after"


async def test_a_streamed_answer_to_http_1_0_or_a_head_request(
    streamed_port: tuple[Port, Streamed], connect: Connect
) -> None:
    """HTTP/1.0 reads no chunked body: it gets the stream up to the close. HEAD gets the
    head a GET would have had, and nothing is produced."""
    port, streamed = streamed_port
    reader, writer = await connect(port)
    writer.write(b"HEAD /stream HTTP/1.1\r\nHost: h\r\n\r\n")
    head = await read_response(reader, head_request=True)
    assert (head.status, head.header("Transfer-Encoding")) == (200, "chunked")
    assert streamed.taken == 0
    reader, writer = await connect(port)
    writer.write(b"GET /stream HTTP/1.0\r\n\r\n")
    resp = await read_response(reader)
    assert (resp.header("Connection"), resp.header("Transfer-Encoding")) == ("close", None)
    assert resp.body == Streamed.PIECE * streamed.pieces


def test_under_uvloop_as_a_sidecar_process_runs_it() -> None:
    async def scenario() -> list[int]:
        port = Port("admin", answer)
        _, number = await port.start(LOCAL, 0)
        reader, writer = await asyncio.open_connection(LOCAL, number)
        try:
            writer.write(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n" * 3 + b"GET / HTTP/9.9\r\n\r\n")
            async with asyncio.timeout(5):
                return [(await read_response(reader)).status for _ in range(4)]
        finally:
            writer.close()
            await port.close()

    assert uvloop.run(scenario()) == [200, 200, 200, 400]


def test_a_streamed_answer_under_uvloop() -> None:
    """uvloop's transport, too, pauses the writer from within ``write``: the stream is
    produced as the client reads it."""

    async def scenario() -> tuple[int, int, bytes]:
        streamed = Streamed(256)
        port = Port("metrics", streamed.answer)
        _, number = await port.start(LOCAL, 0)
        reader, writer = await asyncio.open_connection(LOCAL, number)
        try:
            writer.write(b"GET /stream HTTP/1.1\r\nHost: h\r\n\r\n")
            await asyncio.sleep(0.3)
            taken = streamed.taken
            async with asyncio.timeout(10):
                body = (await read_response(reader)).body
            return taken, streamed.pieces, body
        finally:
            writer.close()
            await port.close()

    taken, pieces, body = uvloop.run(scenario())
    assert 0 < taken < pieces / 2
    assert body == Streamed.PIECE * pieces


def test_the_admin_modules_load_neither_aiohttp_nor_prometheus_client() -> None:
    """About 17 MB of an idle sidecar is those two (tests/benchmarks/bench_memory.py)."""
    code = (
        "import sys, sidecar.admin.server, sidecar.admin.metrics, sidecar.admin.httpd; "
        "print(sorted(m for m in ('aiohttp', 'prometheus_client') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == "[]\n"
