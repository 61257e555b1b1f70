"""A clean end to a warm-up: keep-alive connections that close with nothing in flight.

wrk stops by closing its connections with requests in flight. A proxy then cancels those
exchanges and closes their upstream connections half-way through a response (Envoy does the
same), so the target wrk just left has lost some of its pooled connections: how many depends
on how many answers were on their way when wrk exited (measured at 50 connections on the
meshlet pairs: from none to 46 of 50). The next wrk run opens them again inside its measured
window (a mesh TLS handshake each).

``settle`` ends that state the same way for every target: it opens ``conns`` keep-alive
connections, sends a request on each at once, reads every answer in full, a few times over,
and closes the connections only with nothing in flight. A proxy that pools upstream
connections holds as many as ``conns`` requests at once need when it returns. Stdlib only;
bounded in passes and in time.
"""

from __future__ import annotations

import asyncio
import os

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def settle(
    port: int, host: str, conns: int, core: str, *, passes: int = 3, timeout: float = 10.0
) -> None:
    """``passes`` rounds of ``conns`` requests at once to 127.0.0.1:``port`` (``Host:
    host``), each answered 200 in full, with this thread on CPU ``core`` (the load
    generator's) meanwhile. RuntimeError when an answer is not 200, TimeoutError after
    ``timeout`` seconds."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(core)})  # (0: this thread, on Linux)
    try:
        asyncio.run(asyncio.wait_for(_settle(port, host, conns, passes), timeout))
    finally:
        os.sched_setaffinity(0, before)


async def _settle(port: int, host: str, conns: int, passes: int) -> None:
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    streams: list[Streams] = []
    try:
        for _ in range(conns):  # (one by one: those open so far are closed if one fails)
            streams.append(await asyncio.open_connection("127.0.0.1", port))  # noqa: PERF401
        for _ in range(passes):
            # every request written before any answer is read: ``conns`` in flight
            for _, writer in streams:
                writer.write(request)
            await asyncio.gather(*(read_response(reader) for reader, _ in streams))
    finally:
        for _, writer in streams:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for _, w in streams), return_exceptions=True)


async def read_response(reader: asyncio.StreamReader) -> None:
    """One response, read to its end (Content-Length or chunked)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *lines = head.split("\r\n")
    if status_line.split(" ", 2)[1] != "200":
        raise RuntimeError(f"settle: the answer was {status_line!r}")
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    if fields.get("transfer-encoding", "").lower() == "chunked":
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await reader.readexactly(size + 2)  # the chunk and its CRLF
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then the end
            pass
    else:
        await reader.readexactly(int(fields.get("content-length", "0")))
