"""bench_proxy's settle pass does what the measured run relies on: ``conns`` requests in flight
at once on as many keep-alive connections, every answer read in full (sized or chunked) before
the connections close; an answer other than 200 is an error."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.benchmarks import settle

BODY = b"b" * 1024


@dataclass
class Seen:
    connections: int = 0
    requests: int = 0
    in_flight: int = 0
    most_in_flight: int = 0
    cut: int = 0
    """connections that ended in the middle of a request"""
    all_in: asyncio.Event = field(default_factory=asyncio.Event)


class Server:
    """An HTTP/1.1 server on a thread of its own; it holds each answer until ``wait_for``
    requests are in flight (or a second went by), then answers by turns sized and chunked."""

    def __init__(self, wait_for: int, status: int = 200) -> None:
        self.wait_for, self.status = wait_for, status
        self.seen = Seen()
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    def __enter__(self) -> Server:
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)
        assert not self._thread.is_alive()

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()
        # (asyncio.run then cancels the connections still served: each closes its own)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._answer_all(reader, writer)
        finally:
            writer.close()

    async def _answer_all(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen = self.seen
        seen.connections += 1
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as e:
                seen.cut += bool(e.partial)
                return
            seen.requests += 1
            seen.in_flight += 1
            seen.most_in_flight = max(seen.most_in_flight, seen.in_flight)
            if seen.in_flight >= self.wait_for:
                seen.all_in.set()
            with contextlib.suppress(TimeoutError):  # (then most_in_flight tells)
                await asyncio.wait_for(seen.all_in.wait(), 1.0)
            answer = self._answer(chunked=seen.requests % 2 == 0)
            seen.in_flight -= 1
            writer.write(answer)
            if seen.in_flight == 0:
                seen.all_in.clear()

    def _answer(self, *, chunked: bool) -> bytes:
        head = f"HTTP/1.1 {self.status} X\r\n".encode()
        if chunked:
            return head + b"Transfer-Encoding: chunked\r\n\r\n400\r\n" + BODY + b"\r\n0\r\n\r\n"
        return head + b"Content-Length: 1024\r\n\r\n" + BODY


@pytest.fixture
def core() -> Iterator[str]:
    before = os.sched_getaffinity(0)
    yield str(min(before))
    assert os.sched_getaffinity(0) == before  # settle gave the thread its CPUs back


def test_every_connection_carries_a_request_at_once_and_closes_answered(core: str) -> None:
    with Server(wait_for=20) as server:
        settle.settle(server.port, "backend", 20, core, passes=3)
    seen = server.seen
    assert seen.connections == 20
    assert seen.requests == 60
    assert seen.most_in_flight == 20
    assert seen.in_flight == 0
    assert seen.cut == 0


def test_an_answer_other_than_200_is_an_error(core: str) -> None:
    with Server(wait_for=1, status=503) as server, pytest.raises(RuntimeError, match="503"):
        settle.settle(server.port, "backend", 2, core, passes=1)
