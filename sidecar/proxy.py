"""The proxy listeners: one asyncio Protocol (``Downstream``) per client connection.

A Downstream parses requests (httptools), enforces the head limits and timeouts, and runs one
``Exchange`` per request (``exchange``), in order. Bodies are never buffered whole: each side
pauses reading the other when its write buffer fills.

Requests on one connection are answered in order. A pipelined request waits, head and body
held in memory, while reading from the client is paused, so at most one read's worth waits.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import httptools

from sidecar import http1
from sidecar.accesslog import AccessLog
from sidecar.errors import Reason, error_response
from sidecar.exchange import Exchange, State
from sidecar.http1 import Headers, RequestHead
from sidecar.metrics import RequestStats
from sidecar.routing import Route, Router

if TYPE_CHECKING:
    from control_plane.wire import Endpoint

log = logging.getLogger("meshlet.proxy")

#: seconds a closing connection keeps dropping what an unread client still sends
LINGER = 2.0


@dataclass(frozen=True, slots=True)
class Timeouts:
    head: float = 10.0
    """seconds a client has to send a whole request head"""
    idle: float = 60.0
    """seconds a keep-alive client connection may sit between requests"""


class _Wait(enum.Enum):
    """What a client connection's deadline is for."""

    HEAD = 0  # the client's request head
    ROUTE = 1  # the active exchange's route timeout
    IDLE = 2  # the next request on a keep-alive connection
    NONE = 3  # nothing (a tunnel)


class Downstream(asyncio.Protocol):
    """One client connection: parses requests, runs their exchanges in order."""

    def __init__(
        self,
        router: Router,
        tracker: ConnectionTracker,
        timeouts: Timeouts,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.router = router
        self.tracker = tracker
        self.timeouts = timeouts
        # the listener passes its loop: asyncio.get_running_loop() makes a getpid() system
        # call on Python 3.11, and a client may open a connection per request
        self.loop = loop or asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.client_ip = b"unknown"
        self.version = "1.1"
        self.draining = False
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: Headers = []
        self._trailer_size = 0
        self._in_head = False
        self._current: Exchange | None = None  # the exchange being parsed
        self._active: Exchange | None = None  # the exchange talking to the upstream
        self._queue: deque[Exchange] = deque()
        self._pauses: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._wait = _Wait.HEAD
        self._deadline = 0.0
        self._tunnel: Exchange | None = None
        self._latest: Exchange | None = None  # the exchange whose head came last
        self._closing = False
        self._limit_error: tuple[Reason, str] | None = None
        self._pending_reject: bytes | None = None
        self._corked: list[bytes] | None = None
        self._trailers = 0
        self._read = 0  # the size of the read being parsed
        self._raw_count = 0  # bytes read while in a head, or in what may be trailers
        self._trailer_watch = False  # after a chunk header with no data since
        self._starting = False  # _start_next is running (it loops; calls inside it return)
        self._unread = False  # the client may still be sending: linger before closing
        self._linger: asyncio.TimerHandle | None = None
        self.write_paused = False  # the client is not reading: keep upstreams paused

    def __repr__(self) -> str:
        state = "tunnel" if self._tunnel else "busy" if self._active else "idle"
        return f"<Downstream {self.client_ip.decode()} {state}, {len(self._queue)} queued>"

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client_ip = str(peer[0]).encode()
        self.tracker.add(self)
        self.draining = self.tracker.draining
        self.expect(_Wait.HEAD, self.timeouts.head)

    def data_received(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel.tunnel_from_client(data)
            return
        if self._closing:
            return
        self._read = len(data)
        try:
            self._parser.feed_data(data)
            if self._in_head or self._trailer_watch:
                # httptools joins a header line before it calls back: count what was read
                self._raw_count += len(data)
                if self._raw_count > http1.MAX_HEAD_BYTES:
                    what = "head" if self._in_head else "trailer section"
                    self._reject(
                        Reason.HEAD_TOO_LARGE, f"{what} larger than {http1.MAX_HEAD_BYTES} bytes"
                    )
                    return
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade(data[upgrade.args[0] :])
        except httptools.HttpParserCallbackError:
            reason, detail = self._limit_error or (Reason.BAD_REQUEST, "request rejected")
            self._reject(reason, detail)
            return
        except httptools.HttpParserError as e:
            self._reject(Reason.BAD_REQUEST, str(e) or type(e).__name__)
            return
        # Exchanges start only once a whole read parsed cleanly: llhttp checks some of the
        # head (Transfer-Encoding) after its headers-complete callback.
        if self._active is None and self._queue:
            self._start_next()

    # No eof_received: a client's FIN is taken as a disconnect (as nginx and Envoy do), so its
    # upstream request is cancelled rather than left running for nobody.

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self.tracker.discard(self)
        self._cancel_timer()
        if self._linger is not None:
            self._linger.cancel()
        for ex in (self._active, self._tunnel, *self._queue):
            if ex is not None:
                ex.cancel()  # a client gone: its upstream requests go too
        self._active = self._tunnel = None
        self._queue.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        ex = self._active or self._tunnel
        if ex is not None and ex.conn is not None:
            ex.conn.pause_reading(True)

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self._active or self._tunnel
        if ex is not None and ex.conn is not None:
            ex.conn.pause_reading(False)

    # -- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._trailer_size = 0
        self._raw_count = 0
        self._in_head = True
        if self._active is None:
            self.expect(_Wait.HEAD, self.timeouts.head)

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._current is not None:  # after the head: a chunked body's trailers
            self._trailer_watch = True
            self._trailers += 1
            self._trailer_size += len(name) + len(value) + 4
            if self._trailers > http1.MAX_HEADERS:
                self._limit_error = (Reason.HEAD_TOO_LARGE, "too many trailers")
                raise ValueError("too many trailers")
            if self._trailer_size > http1.MAX_HEAD_BYTES:
                self._limit_error = (
                    Reason.HEAD_TOO_LARGE,
                    f"trailer section larger than {http1.MAX_HEAD_BYTES} bytes",
                )
                raise ValueError("trailers too large")
            self._current.request_trailer(name, value)
            return
        self._headers.append((name, value))  # limits: checked once, when the head is whole

    def on_headers_complete(self) -> None:
        headers = self._headers
        if len(headers) > http1.MAX_HEADERS:
            self._limit_error = (Reason.HEAD_TOO_LARGE, f"more than {http1.MAX_HEADERS} headers")
            raise ValueError("too many headers")
        if (  # the head took at most the reads before this one and all of this one
            self._raw_count + self._read > http1.MAX_HEAD_BYTES
            and len(self._url) + http1.head_size(headers) > http1.MAX_HEAD_BYTES
        ):
            self._limit_error = (
                Reason.HEAD_TOO_LARGE,
                f"head larger than {http1.MAX_HEAD_BYTES} bytes",
            )
            raise ValueError("head too large")
        self._in_head = False
        self._raw_count = 0
        self._trailer_size = 0
        self._trailers = 0
        parser = self._parser
        self.version = parser.get_http_version()
        try:
            head = http1.parse_request_head(
                parser.get_method(),
                self._url,
                self.version,
                self._headers,
                parser.should_keep_alive(),
            )
        except ValueError as e:
            self._limit_error = (Reason.BAD_REQUEST, str(e))
            raise
        if head.authority is None and self.version == "1.1":
            self._limit_error = (Reason.BAD_REQUEST, "HTTP/1.1 request without Host")
            raise ValueError("no host")
        ex = Exchange(self, head)
        self._current = self._latest = ex
        self._queue.append(ex)
        if self._active is not None:
            self.pause_reading("pipeline", True)

    def on_body(self, data: bytes) -> None:
        self._trailer_watch = False
        self._raw_count = 0
        if self._current is not None:
            self._current.request_body(data)

    def on_chunk_header(self) -> None:
        self._trailer_watch = True  # data resets it; a last chunk's trailers do not

    def on_chunk_complete(self) -> None:
        self._trailer_watch = False
        self._raw_count = 0

    def on_message_complete(self) -> None:
        ex, self._current = self._current, None
        if ex is not None:
            ex.request_complete()

    # -- exchanges ------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self._corked is not None:
            self._corked.append(data)
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def cork(self) -> None:
        """Hold writes until ``uncork``: a response head and body read together from the
        upstream go out in one send instead of several."""
        if self._corked is None:
            self._corked = []

    def uncork(self) -> None:
        held, self._corked = self._corked, None
        if held and self.transport is not None and not self.transport.is_closing():
            self.transport.write(held[0] if len(held) == 1 else b"".join(held))

    def pause_reading(self, reason: str, paused: bool) -> None:
        if not paused and reason not in self._pauses:
            return  # the common case: nothing to resume
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if paused:
            if not self._pauses:
                transport.pause_reading()
            self._pauses.add(reason)
        elif reason in self._pauses:
            self._pauses.discard(reason)
            if not self._pauses:
                transport.resume_reading()

    def exchange_done(self, ex: Exchange, *, close: bool, abort: bool) -> None:
        if ex is self._active:
            self._active = None
        if ex is self._tunnel:  # an upgrade ends the connection, whatever the answer was
            self._tunnel = None
            close = True
        if close:
            self._close(abort=abort)
        elif self._queue:
            self._start_next()
        elif not self._starting:
            self._idle()

    def _idle(self) -> None:
        """Nothing in flight: close if asked to, else wait for the next request."""
        if self._closing or self.draining:
            self._close(abort=False)
        elif self._in_head:
            self.expect(_Wait.HEAD, self.timeouts.head)
        else:
            self.expect(_Wait.IDLE, self.timeouts.idle)

    def _start_next(self) -> None:
        """Start queued exchanges in order. A loop, not recursion: exchanges that are answered
        at once (a pipeline of 404s) finish inside ``start``, and their ``exchange_done``
        calls back in here."""
        if self._starting:
            return
        self._starting = True
        try:
            while self._active is None and self._queue and not self._closing_now():
                nxt = self._queue.popleft()
                self._active = nxt
                if not self._queue:
                    self.pause_reading("pipeline", False)
                nxt.start()
        finally:
            self._starting = False
        if self._active is None and not self._queue:
            self._idle()

    def _closing_now(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def become_tunnel(self, ex: Exchange) -> None:
        """The upstream answered 101: bytes now flow both ways unparsed."""
        self._active = None
        self._wait = _Wait.NONE
        self.pause_reading("upgrade", False)

    def drain(self) -> None:
        """Finish what is in flight, then close; close at once if idle."""
        self.draining = True
        if self._active is None and self._tunnel is None and not self._in_head:
            self._close(abort=False)

    # -- internals ------------------------------------------------------------------------

    def _upgrade(self, rest: bytes) -> None:
        """httptools stopped at the end of an upgrade (or CONNECT) head; no more HTTP follows
        on this connection. Bytes after the head wait for the upstream's 101."""
        ex, self._current = self._latest, None
        if self._active is None and self._queue:
            self._start_next()
        if ex is None or ex.state is State.DONE:
            return  # already answered (CONNECT) and closing
        self._tunnel = ex
        self.pause_reading("upgrade", True)
        if rest:
            ex.tunnel_from_client(rest)

    def _reject(self, reason: Reason, detail: str) -> None:
        """A malformed request: answer 400 (or 431) after the complete requests before it,
        then close."""
        self._closing = True
        self._unread = True
        self.pause_reading("rejected", True)
        self.tracker.rejected(reason, 0.0)
        broken, self._current = self._current, None
        self._queue = deque(ex for ex in self._queue if ex.request_done and ex is not broken)
        active = self._active
        if active is not None and (active is broken or not active.request_done):
            # the broken request is already on its way upstream: call it off
            self._active = None
            responding = active.state is State.RESPONDING
            active.cancel()
            if responding:  # too late for a 400
                self._close(abort=True)
                return
        self._pending_reject = error_response(reason, detail, close=True)
        if self._active is None:
            if self._queue:
                self._start_next()
            else:
                self._close(abort=False)

    def _close(self, *, abort: bool) -> None:
        self._closing = True
        self._cancel_timer()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if abort:
            self._corked = None
            transport.abort()
            return
        self.uncork()
        if self._pending_reject is not None:
            transport.write(self._pending_reject)
            self._pending_reject = None
        if (self._unread or self._in_head or self._current is not None) and (
            transport.can_write_eof()
        ):
            # Lingering close: the client may still be sending what we will not read. Closing
            # now could reset the connection before it reads our answer; instead say we are
            # done, drop what it sends, and close on its EOF or after LINGER seconds.
            transport.write_eof()
            self._pauses.clear()
            transport.resume_reading()
            self._linger = self.loop.call_later(LINGER, transport.close)
        else:
            transport.close()

    def expect_route_at(self, when: float) -> None:
        """The active exchange's deadline (loop time): its route timeout or its try's."""
        self._wait = _Wait.ROUTE
        self._deadline = when
        if self._timer is not None and self._timer_at <= when:
            return  # it wakes in time (and re-arms), as ``expect`` explains
        now = self.loop.time()
        at = min(when, now + self.timeouts.head)
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(at, self._on_timer)
        self._timer_at = at

    def expect(self, wait: _Wait, seconds: float) -> None:
        """From now on the connection waits for ``wait``, at most ``seconds``.

        The timer is lazy: it wakes no later than the deadline, and when it wakes early it
        re-arms. A deadline that moves later touches no timer, so most requests cost none.
        """
        now = self.loop.time()
        self._wait = wait
        self._deadline = now + seconds
        when = min(self._deadline, now + self.timeouts.head)
        if self._timer is None or when < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(when, self._on_timer)
            self._timer_at = when

    def _on_timer(self) -> None:
        self._timer = None
        if self._closing or self._wait is _Wait.NONE:
            return
        now = self.loop.time()
        if now < self._deadline:
            when = min(self._deadline, now + self.timeouts.head)
            self._timer = self.loop.call_at(when, self._on_timer)
            self._timer_at = when
        elif self._wait is _Wait.ROUTE:
            if self._active is not None:
                self._active.route_timeout()
        elif self._wait is _Wait.HEAD:
            self._head_timeout()
        else:
            self._close(abort=False)  # idle keep-alive

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timeout(self) -> None:
        if self._in_head:
            self.write(
                error_response(
                    Reason.REQUEST_TIMEOUT, "request head not received in time", close=True
                )
            )
            self.tracker.rejected(Reason.REQUEST_TIMEOUT, self.timeouts.head)
        self._close(abort=False)


class ConnectionTracker:
    """The client connections of one listener, for draining and statistics."""

    def __init__(
        self,
        direction: str = "outbound",
        service: str = "",
        *,
        metrics: bool = True,
        access_log: AccessLog | None = None,
    ) -> None:
        self.direction = direction
        #: the service every request here is for (inbound: this sidecar's); "": by route
        self.service = service
        self.connections: set[Downstream] = set()
        self.draining = False
        #: requests answered before they had a service (no route, malformed), for /metrics
        self.unrouted = RequestStats() if metrics else None
        self.access_log = access_log

    def record(
        self,
        route: Route | None,
        head: RequestHead | None,
        status: int,
        seconds: float,
        endpoint: Endpoint | None = None,
        attempts: int = 0,
        error: str = "",
    ) -> None:
        """A request answered (``status`` 0: the client left first): into the metrics (its
        route's service, else ``unrouted``) and the access log."""
        stats = route.service.requests if route is not None else self.unrouted
        if stats is not None:
            stats.record(status, seconds)
        if self.access_log is not None:
            service = self.service or (route.name if route is not None else "")
            started = time.time() - seconds
            entry = (started, self.direction, service, head, status, seconds, endpoint)
            self.access_log.add((*entry, attempts, error))

    def rejected(self, reason: Reason, seconds: float) -> None:
        """A request the connection answered itself before it became an exchange."""
        self.record(None, None, reason.status, seconds, error=reason.code)

    def add(self, ds: Downstream) -> None:
        self.connections.add(ds)

    def discard(self, ds: Downstream) -> None:
        self.connections.discard(ds)

    def drain(self) -> None:
        self.draining = True
        for ds in list(self.connections):
            ds.drain()
