"""A small HTTP/1.1 server for the admin and metrics ports (not the hot path): an asyncio
Protocol around httptools' request parser, keep-alive, each request answered by a plain
function (``Answer``) that returns a ``Response`` at once, or a coroutine of one (``Deferred``:
a lock call the sidecar forwards). The port owns the task that awaits a deferred answer and
cancels it when the client goes or the port closes; the connection parses nothing more until
the answer is written (it holds at most one more request's bytes, and sees a hang-up), and its
timers wait meanwhile (the answer bounds its own time). A response may also be produced as it is
written (``Response.stream``: the metrics of a large table are megabytes): a piece whenever the
transport's buffer is below its high-water mark, chunked (or, to an HTTP/1.0 client or one that
asked to close, up to the close), so that a large answer is never held whole.

No client can grow the sidecar's memory or hold its connections:
  1. a head (request line and headers) is read up to its blank line, at most
     ``max_head_bytes`` and ``max_headers`` headers (431 above);
  2. a body only with a ``Content-Length`` of at most ``max_body_bytes`` (413 above; a
     chunked body is refused with 411: no endpoint needs one);
  3. a request must arrive whole within ``request_timeout`` of its first byte (408), the next
     one within ``idle_timeout`` of the last answer (the connection closes);
  4. pipelined requests are parsed one at a time; while the client does not read its answers
     (the transport's buffer is over its high-water mark) nothing more is read;
  5. at most ``max_connections`` connections per port; more are closed at once.
A request that does not parse is answered 400 (or the status above) with a JSON ``error`` and
the connection closes; it is logged on one line within a ``LogBudget``. An answer that raises
is a bug: a JSON 500, logged with its traceback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, replace
from typing import Any, cast
from urllib.parse import unquote

import httptools

from control_plane.flags import LogBudget, escape
from sidecar.admin.messages import Answer, Deferred, Request, Response, json_response
from sidecar.clock import wall
from sidecar.http import http1

log = logging.getLogger("meshlet.admin")


@dataclass(frozen=True, slots=True)
class Limits:
    max_head_bytes: int = http1.MAX_HEAD_BYTES
    """bytes of a request line and its headers (431 above)"""
    max_headers: int = http1.MAX_HEADERS
    max_body_bytes: int = 64 * 1024
    """bytes of a request body (413 above): the admin port's only body is a small JSON one"""
    request_timeout: float = 10.0
    """seconds from a request's first byte to its last (408 and closed after)"""
    idle_timeout: float = 75.0
    """seconds a kept-alive connection may wait for its next request (aiohttp's default)"""
    max_connections: int = 64
    """connections open at once on one port"""

    def __post_init__(self) -> None:
        for name in ("max_head_bytes", "max_headers", "max_body_bytes", "max_connections"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("request_timeout", "idle_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be more than 0 seconds, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class PortStatistics:
    connections: int
    """open now"""
    answered: int
    refused_connections: int
    """closed at once: ``max_connections`` were open"""
    bad_requests: int
    """answered 4xx by the server itself (did not parse, too large, too slow)"""
    buffered: int
    """bytes read and not parsed yet, over all connections (``Connection.buffered``)"""


class Port:
    """One listening admin or metrics port: its server, its connections, its counters."""

    def __init__(self, name: str, answer: Answer, limits: Limits | None = None) -> None:
        self.name = name
        self.answer = answer
        self.limits = limits or Limits()
        self.connections: set[Connection] = set()
        self.answered = self.refused_connections = self.bad_requests = 0
        self.budget = LogBudget()
        """for lines about what clients did (bad requests, connections over the limit)"""
        self.address: tuple[str, int] | None = None
        """(host, port) once listening"""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        """deferred answers being awaited (one per connection at most)"""

    def __repr__(self) -> str:
        s = self.statistics()
        where = "" if self.address is None else f" {self.address[0]}:{self.address[1]}"
        return (
            f"<Port {self.name}{where} [{s.connections} open, {s.answered} answered, "
            f"{s.bad_requests} bad requests, {s.refused_connections} connections refused]>"
        )

    def statistics(self) -> PortStatistics:
        return PortStatistics(
            len(self.connections),
            self.answered,
            self.refused_connections,
            self.bad_requests,
            sum(c.buffered for c in self.connections),
        )

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen; the address bound (``port`` 0: a free one)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self), host, port, reuse_address=True
        )
        bound = self._server.sockets[0].getsockname()
        self.address = str(bound[0]), int(bound[1])
        return self.address

    async def close(self) -> None:
        """Stop listening, cut every connection and cancel the answers awaited."""
        if self._server is None:
            return
        self._server.close()
        for connection in list(self.connections):
            connection.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``work`` as a task this port owns (``close`` cancels it)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def admit(self, connection: Connection) -> bool:
        if len(self.connections) >= self.limits.max_connections:
            self.refused_connections += 1
            self.note(
                logging.WARNING,
                f"{self.name} port: {len(self.connections)} connections open, closing one from "
                f"{connection.peer}",
            )
            return False
        self.connections.add(connection)
        return True

    def note(self, level: int, message: str) -> None:
        """A line about a client's doing, within the port's log budget."""
        if log.isEnabledFor(level) and (suffix := self.budget.take()) is not None:
            log.log(level, "%s%s", message, suffix)


class _Refused(Exception):
    """A request the server answers itself (status, JSON error) and then closes."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


class Connection(asyncio.Protocol):
    """One client connection: heads are cut at their blank line and bodies at their length
    before httptools sees them, so that each parse holds at most one request."""

    def __init__(self, port: Port) -> None:
        self.port = port
        self.limits = port.limits
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._head = bytearray()
        """the head being read, up to its blank line"""
        self._body_left = 0
        """body bytes still to come (0: the next bytes are a head)"""
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._request: Request | None = None
        """the head parsed (its body still to come)"""
        self._complete: Request | None = None
        """a whole request, to answer once the parser returns"""
        self._held = b""
        """bytes read while the answers wait for the client (reading paused)"""
        self._write_paused = False
        self._closing = False
        self._timer: asyncio.TimerHandle | None = None
        self._pending: asyncio.Task[None] | None = None
        """awaiting a deferred answer: read nothing more until it is written"""
        self._stream: Iterator[bytes] | None = None
        """the pieces of an answer being written (``Response.stream``): read nothing more
        until the last is written"""
        self._chunked = False
        """the stream is written chunked (else up to the close)"""

    def __repr__(self) -> str:
        state = (
            "closing"
            if self._closing
            else "answering"
            if self._pending is not None or self._stream is not None
            else "request"
            if self._busy()
            else "idle"
        )
        return f"<Connection {self.port.name} {self.peer} [{state}]>"

    # -- transport events -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # (uvloop's is not one)
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, tuple) else None
        if not self.port.admit(self):
            self._closing = True
            transport.abort()
            return
        self._arm(self.limits.idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        if self._pending is not None:  # nobody is left to answer
            self._pending.cancel()
        self._stream = None
        self.port.connections.discard(self)

    def pause_writing(self) -> None:
        """The client is not reading its answers: read nothing more until it does."""
        self._write_paused = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._stream is not None:
            self._pump()
        self._read_on()

    def _answering(self) -> bool:
        """An answer is still awaited or being written, or the client is not reading its
        answers: the next request waits."""
        return self._write_paused or self._pending is not None or self._stream is not None

    def _read_on(self) -> None:
        """Resume reading (and parse what was held) unless ``_answering``."""
        if self._closing or self.transport is None or self._answering():
            return
        self.transport.resume_reading()
        held, self._held = self._held, b""
        if held:
            self._consume(held)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        if self._answering():  # (reading is paused, or an answer is awaited or being
            self._held += data  # written: the next request waits, bounded)
            if len(self._held) > self.limits.max_head_bytes + self.limits.max_body_bytes:
                self.port.note(
                    logging.WARNING,
                    f"{self.port.name} port: {self.peer} sent more than a request while its "
                    "answer was awaited; closing",
                )
                self.abort()
            return
        self._consume(data)

    @property
    def buffered(self) -> int:
        """Bytes read and not parsed yet: a head in progress, requests held back."""
        return len(self._head) + len(self._held)

    def abort(self) -> None:
        self._closing = True
        if self.transport is not None:
            self.transport.abort()

    # -- reading ----------------------------------------------------------------------------

    def _consume(self, data: bytes) -> None:
        """Parse ``data`` a head or a body at a time, answering each request as it ends."""
        pos, end = 0, len(data)
        while pos < end and not self._closing:
            if self._answering():  # wait for the client, or for the answer
                self._held = data[pos:]
                return
            if self._body_left:
                n = min(self._body_left, end - pos)
                self._body_left -= n
                piece = data[pos : pos + n]
                pos += n
            else:
                if not self._head:
                    self._arm(self.limits.request_timeout)  # a request begins
                cut = self._head_end(data, pos)
                size = len(self._head) + (end if cut < 0 else cut) - pos
                if size > self.limits.max_head_bytes:
                    self._refuse(
                        _Refused(
                            431, f"request head larger than {self.limits.max_head_bytes} bytes"
                        )
                    )
                    return
                if cut < 0:
                    self._head += data[pos:]
                    return
                piece = data[pos:cut]
                if self._head:
                    piece = bytes(self._head) + piece
                    self._head.clear()
                pos = cut
            self._feed(piece)

    def _head_end(self, data: bytes, pos: int) -> int:
        """Where in ``data`` the head being read ends (after its blank line), or -1; its start
        may be in ``_head`` already, and the blank line across the two."""
        if self._head:
            tail = self._head[-3:]
            seam = bytes(tail) + data[pos : pos + 3]
            found = seam.find(b"\r\n\r\n")
            if found >= 0:
                return pos + found + 4 - len(tail)
        found = data.find(b"\r\n\r\n", pos)
        return found + 4 if found >= 0 else -1

    def _feed(self, piece: bytes) -> None:
        upgrade = False
        try:
            self._parser.feed_data(piece)
        except httptools.HttpParserUpgrade:
            upgrade = True  # (CONNECT, or an Upgrade header: answered, then closed)
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, _Refused):  # (what a callback raised)
                self._refuse(e.__context__)
            else:  # a bug in a callback
                log.error("%s port: parsing failed", self.port.name, exc_info=e.__context__)
                self._refuse(_Refused(500, "internal error"))
            return
        except httptools.HttpParserError as e:
            self._refuse(_Refused(400, str(e) or type(e).__name__))
            return
        request, self._complete = self._complete, None
        if request is not None:
            self._respond(request, upgrade)
        elif upgrade:
            self._close()

    # -- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._body = []
        self._request = None

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self._headers) >= self.limits.max_headers:
            raise _Refused(431, f"more than {self.limits.max_headers} headers")
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        version = parser.get_http_version()
        if version not in ("1.0", "1.1"):
            raise _Refused(400, f"HTTP/{version} is not supported")
        headers: dict[str, str] = {}
        for name, value in self._headers:
            headers.setdefault(
                name.decode("latin-1").lower(), value.decode("utf-8", "surrogateescape")
            )
        if "transfer-encoding" in headers:
            raise _Refused(
                411, "a request body needs a Content-Length (chunked bodies are not read)"
            )
        length = int(headers.get("content-length", "0"))  # (llhttp lets only digits through)
        if length > self.limits.max_body_bytes:
            raise _Refused(
                413, f"a body of at most {self.limits.max_body_bytes} bytes is read here"
            )
        method = parser.get_method().decode("ascii", "replace")
        try:
            target, _ = http1.split_target(parser.get_method(), self._url)
        except ValueError as e:
            raise _Refused(400, str(e)) from None
        path, _, query = target.decode("utf-8", "replace").partition("?")
        self._request = Request(
            method,
            unquote(path),
            query,
            headers,
            self.peer,
            b"",
            version,
            parser.should_keep_alive(),
        )
        self._body_left = length
        if length and headers.get("expect", "").lower() == "100-continue":
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        request, self._request = self._request, None
        assert request is not None
        if self._body:
            request = replace(request, body=b"".join(self._body))
            self._body = []
        self._complete = request

    # -- answering --------------------------------------------------------------------------

    def _respond(self, request: Request, upgrade: bool) -> None:
        try:
            answer = self.port.answer(request)
        except Exception:
            log.exception("%s port: %s %s failed", self.port.name, request.method, request.path)
            answer = json_response({"error": "internal error"}, 500)
        if isinstance(answer, Response):
            self._send(request, answer, upgrade)
            return
        if self._timer is not None:  # the answer bounds its own time
            self._timer.cancel()
            self._timer = None
        # reading goes on (held, not parsed) so that a client that hangs up is seen at once
        self._pending = self.port.spawn(self._await(request, answer, upgrade))

    async def _await(self, request: Request, answer: Deferred, upgrade: bool) -> None:
        try:
            response = await answer
        except Exception:
            log.exception("%s port: %s %s failed", self.port.name, request.method, request.path)
            response = json_response({"error": "internal error"}, 500)
        self._pending = None
        if self._closing:
            return
        self._send(request, response, upgrade)
        self._read_on()

    def _send(self, request: Request, response: Response, upgrade: bool) -> None:
        self.port.answered += 1
        # (an HTTP/1.0 client reads no chunked body: a stream to it ends with the connection)
        streamed = response.stream is not None and request.method != "HEAD"
        keep_alive = request.keep_alive and not upgrade
        if response.stream is not None and request.version == "1.0":
            keep_alive = False
        head = _head(response, keep_alive, request.version)
        if streamed:
            self._write(head)
            self._stream, self._chunked = response.stream, keep_alive
            # a client that stops taking it in is cut (``_timed_out``), as one that does
            # not read a whole answer is
            self._arm(self.limits.idle_timeout)
            self._pump()
            return
        self._write(head + (b"" if request.method == "HEAD" else response.body))
        self._sent(keep_alive)

    def _sent(self, keep_alive: bool) -> None:
        """An answer is written whole: close, or wait for the next request."""
        if not keep_alive:
            self._close()
        elif not self._busy():
            self._arm(self.limits.idle_timeout)

    def _pump(self) -> None:
        """Write the stream's next pieces until the client's buffer is full (``pause_writing``
        comes from within ``write``) or there are no more; then its end, and what was held of
        the next requests is read."""
        stream = self._stream
        assert stream is not None
        while not self._write_paused:
            if self.transport is None or self.transport.is_closing():  # the client went
                self._stream = None
                return
            try:
                piece = next(stream, None)
            except Exception:  # a bug: the head is sent, so the connection is cut
                log.exception("%s port: writing an answer failed", self.port.name)
                self._stream = None
                self.abort()
                return
            if piece is None:  # the end
                self._stream = None
                if self._chunked:
                    self._write(b"0\r\n\r\n")
                self._sent(self._chunked)
                self._read_on()
                return
            self._write(b"%x\r\n%b\r\n" % (len(piece), piece) if self._chunked else piece)

    def _refuse(self, refused: _Refused) -> None:
        """Answer a request the server will not pass on, and close."""
        self.port.bad_requests += 1
        self._head.clear()
        self.port.note(
            logging.INFO,
            f"bad request from {self.peer} to the {self.port.name} port: {refused.status} "
            f"{escape(refused.error)}",
        )
        response = json_response({"error": refused.error}, refused.status)
        self._write(_head(response, False, "1.1") + response.body)
        self._close()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _close(self) -> None:
        """Close once what was written is sent; cut it if the client does not take it within
        ``request_timeout``."""
        self._closing = True
        if self.transport is not None:
            self.transport.close()
        self._arm(self.limits.request_timeout)

    def _busy(self) -> bool:
        """A request has begun and is not answered yet."""
        return bool(self._head) or self._body_left > 0

    def _arm(self, seconds: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(seconds, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        if self._closing or self._write_paused:  # a client that does not read: cut it
            self.abort()
        elif self._busy():
            self._refuse(
                _Refused(408, f"the request did not arrive within {self.limits.request_timeout} s")
            )
        else:  # idle
            self._close()


def _head(response: Response, keep_alive: bool, version: str) -> bytes:
    status = response.status
    if response.stream is None:
        framing = b"Content-Length: %d\r\n" % len(response.body)
    else:  # (HEAD too: the header a GET would have had)
        framing = b"Transfer-Encoding: chunked\r\n" if keep_alive else b""
    lines = [
        b"HTTP/1.1 %d %s\r\n" % (status, http1.reason_phrase(status, b"")),
        b"Content-Type: %s\r\n%bDate: %s\r\n"
        % (
            response.content_type.encode(),
            framing,
            http1.http_date(wall()),
        ),
    ]
    lines += [b"%s: %s\r\n" % (name.encode(), value.encode()) for name, value in response.headers]
    if not keep_alive:
        lines.append(b"Connection: close\r\n")
    elif version == "1.0":
        lines.append(b"Connection: keep-alive\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)
