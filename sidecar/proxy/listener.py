"""The proxy listeners: one asyncio Protocol (``Downstream``) per client connection.

A Downstream parses requests (httptools), enforces the head limits, the timeouts and the
client limits (``limits``), and runs one ``Exchange`` per request (``exchange``), in order.
Bodies are never buffered whole: each side pauses reading the other when its write buffer
fills, and a client that does not read its answers is not read from either.

Requests on one connection are answered in order. A pipelined request waits, head and body
held in memory, while reading from the client is paused: at most ``MAX_PIPELINED`` parsed
requests wait, and the rest of their read waits unparsed.

One lazy timer per connection watches everything time-bound on it: the request head, the
keep-alive wait, the active exchange's deadline, the silence of a stream or a tunnel, and the
pace of a request body or of a client reading its answers.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, cast

import httptools

from sidecar.clock import wall
from sidecar.errors import Reason, error_response
from sidecar.http import http1
from sidecar.http.http1 import RequestHead
from sidecar.http.reader import HeadReader
from sidecar.proxy.client import Http1Answer
from sidecar.proxy.exchange import Exchange
from sidecar.proxy.limits import MAX_PIPELINED, Admission, ListenerCounters, ListenerLimits, Source
from sidecar.proxy.routing import Route, Router
from sidecar.resilience.tries import State
from sidecar.telemetry.accesslog import AccessLog
from sidecar.telemetry.stats import RequestStats

if TYPE_CHECKING:
    from control_plane.wire import Endpoint

log = logging.getLogger("meshlet.proxy")

#: seconds a closing connection keeps dropping what an unread client still sends
LINGER = 2.0
#: reads longer than this are parsed a message at a time, so that no more than
#: ``MAX_PIPELINED`` requests wait; one this long holds fewer (a head is at least 18 bytes:
#: ``GET / HTTP/1.0`` and two CRLFs), and a body of up to 16 KiB that came with its head is
#: parsed in one go
_WALK_ABOVE: Final = 16 * 1024
assert _WALK_ABOVE // 18 < MAX_PIPELINED
#: the shortest wait between two looks of the connection's timer, in seconds
_MIN_WAKE = 0.01


@dataclass(frozen=True, slots=True)
class Timeouts:
    head: float = 10.0
    """seconds a client has to send a whole request head"""
    idle: float = 60.0
    """seconds a keep-alive client connection may sit between requests"""


class _Wait(enum.Enum):
    """What a client connection's deadline is for."""

    HEAD = 0  # the client's request head
    ROUTE = 1  # the active exchange: its deadline, and its stream's silence
    IDLE = 2  # the next request on a keep-alive connection
    TUNNEL = 3  # a tunnel's silence


# The members as module constants for the hot path: on Python 3.11 each ``_Wait.X`` goes
# through EnumType.__getattr__ (~0.1 us in pure Python; compiled, both are static loads)
_WAIT_HEAD: Final = _Wait.HEAD
_WAIT_ROUTE: Final = _Wait.ROUTE
_WAIT_IDLE: Final = _Wait.IDLE
_WAIT_TUNNEL: Final = _Wait.TUNNEL


class Downstream(asyncio.Protocol):
    """One client connection: parses requests, runs their exchanges in order."""

    __slots__ = (
        "_active",
        "_body_base",
        "_body_left",
        "_body_paused",
        "_body_since",
        "_bytes_in",
        "_bytes_out",
        "_closing",
        "_corked",
        "_current",
        "_deadline",
        "_head",
        "_held",
        "_latest",
        "_limit_error",
        "_linger",
        "_moved_seen",
        "_parser",
        "_pauses",
        "_pending_reject",
        "_queue",
        "_quiet_since",
        "_reader",
        "_stalled_at",
        "_stalled_sent",
        "_starting",
        "_timer",
        "_timer_at",
        "_tunnel",
        "_unread",
        "_url",
        "_wait",
        "answer",
        "client_ip",
        "draining",
        "loop",
        "record",
        "route",
        "router",
        "source",
        "timeouts",
        "tracker",
        "transport",
        "write_paused",
    )

    def __init__(
        self,
        router: Router,
        tracker: ConnectionTracker,
        timeouts: Timeouts,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.router = router
        self.tracker = tracker
        # what an exchange asks of its client (``client.Client``), straight from where it is
        self.route = router.route
        self.record = tracker.record
        self.timeouts = timeouts
        # the listener passes its loop: asyncio.get_running_loop() makes a getpid() system
        # call on Python 3.11, and a client may open a connection per request
        self.loop = loop or asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.client_ip = b"unknown"
        self.source: Source | None = None  # inbound: this address's share (``limits``)
        self.draining = False
        self.answer = Http1Answer(self.write)
        self._parser = httptools.HttpRequestParser(self)
        self._reader = HeadReader()  # the head being read, and the limits of heads and trailers
        self._url = b""
        self._head: RequestHead | None = None  # the head being read, from its request line
        self._current: Exchange | None = None  # the exchange being parsed
        self._active: Exchange | None = None  # the exchange talking to the upstream
        self._queue: deque[Exchange] = deque()
        self._held: bytes | None = None  # read, not parsed: MAX_PIPELINED requests wait
        self._pauses: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._wait = _WAIT_HEAD
        self._deadline = 0.0
        self._tunnel: Exchange | None = None
        self._latest: Exchange | None = None  # the exchange whose head came last
        self._closing = False
        self._limit_error: tuple[Reason, str] | None = None
        self._pending_reject: bytes | None = None
        self._corked: list[bytes] | None = None
        self._body_left = -1  # bytes of the request body still to come (-1: chunked, none)
        self._starting = False  # _start_next is running (it loops; calls inside it return)
        self._unread = False  # the client may still be sending: linger before closing
        self._linger: asyncio.TimerHandle | None = None
        self.write_paused = False  # the client is not reading: keep upstreams paused
        # bytes either way, for the silence of streams and tunnels and the data rates
        self._bytes_in = 0
        self._bytes_out = 0
        self._moved_seen = -1  # _bytes_in + _bytes_out when the timer last looked
        self._quiet_since = 0.0  # loop time the timer last saw bytes move
        self._body_since: float | None = None  # loop time a request body began (rate)
        self._body_base = 0  # _bytes_in then
        self._body_paused: float | None = None  # loop time reading was paused, mid-body
        self._stalled_at = 0.0  # loop time writes were paused (the client stopped reading)
        self._stalled_sent = 0  # bytes the client had taken then

    def __repr__(self) -> str:
        state = "tunnel" if self._tunnel else "busy" if self._active else "idle"
        held = ", reading held" if self._held is not None else ""
        return f"<Downstream {self.client_ip.decode()} {state}, {len(self._queue)} queued{held}>"

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client_ip = str(peer[0]).encode()
        if not self.tracker.add(self):  # over the listener's limit, or its source's share
            self._closing = True
            self.transport.abort()
            return
        self.draining = self.tracker.draining
        self.expect(_WAIT_HEAD, self.timeouts.head)

    def data_received(self, data: bytes) -> None:
        n = len(data)
        self._bytes_in += n
        if self._tunnel is not None:
            self._tunnel.tunnel_from_client(data)
            return
        if self._closing:
            return
        if self._held is not None:  # (reading is paused: only bytes already on their way)
            self._held += data
            return
        if n > _WALK_ABOVE:
            self._parse_large(data)
        else:  # ``_parse``, inline: on the hot path a call costs as much as the rest
            reader = self._reader
            reader.read = n
            try:
                self._parser.feed_data(data)
            except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
                if not self._parse_failed(e, data):
                    return
            else:
                if (reader.in_head or reader.trailer_watch) and not self._count_section(n):
                    return
        if self._current is not None and self._body_since is None and not self._closing:
            self._body_started()
        # Exchanges start only once a whole read parsed cleanly: llhttp checks some of the
        # head (Transfer-Encoding) after its headers-complete callback.
        if self._active is None and self._queue:
            self._start_next()

    def _parse(self, data: bytes) -> bool:
        """Parse one read (or part of one); False when it was rejected."""
        reader = self._reader
        reader.read = n = len(data)
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            return self._parse_failed(e, data)
        return not (reader.in_head or reader.trailer_watch) or self._count_section(n)

    def _count_section(self, n: int) -> bool:
        """The read (of ``n`` bytes) ended inside a head or what may be trailers (``reader``).
        False when it is too large (rejected)."""
        if self._reader.read_ended(n):
            return True
        what = "head" if self._reader.in_head else "trailer section"
        self._reject(Reason.HEAD_TOO_LARGE, f"{what} larger than {http1.MAX_HEAD_BYTES} bytes")
        return False

    def _parse_failed(self, e: Exception, data: bytes) -> bool:
        """httptools stopped: at an upgrade (True: go on), or at an error (False: the
        request is rejected)."""
        if isinstance(e, httptools.HttpParserUpgrade):
            self._upgrade(data[e.args[0] :])
            return True
        if isinstance(e, httptools.HttpParserCallbackError):
            reason, detail = self._limit_error or (Reason.BAD_REQUEST, "request rejected")
            self._reject(reason, detail)
        else:
            self._reject(Reason.BAD_REQUEST, str(e) or type(e).__name__)
        return False

    def _parse_large(self, data: bytes) -> None:
        """A read long enough to hold more heads than may wait: parse it a message at a
        time (a head up to its blank line, a body by its length), and once
        ``MAX_PIPELINED`` requests wait, hold the rest unparsed (reading paused) until
        they have been answered."""
        pos, end = 0, len(data)
        while pos < end:
            if self._current is not None and not self._reader.in_head and self._body_left > 0:
                cut = pos + self._body_left  # (a chunked body: to its next blank line)
            elif self._current is None and len(self._queue) >= MAX_PIPELINED:
                self._held = data[pos:]
                self.tracker.counters.pipeline_full += 1
                self.pause_reading("held", True)
                return
            else:
                found = data.find(b"\r\n\r\n", pos)
                cut = end if found < 0 else found + 4
            if cut > end:
                cut = end
            if not self._parse(data[pos:cut] if pos or cut < end else data):
                return
            pos = cut
            if self._tunnel is not None:  # an upgrade: the rest is the tunnel's
                if pos < end:
                    self._tunnel.tunnel_from_client(data[pos:])
                return
            if self._closing:
                return

    def _feed_held(self) -> None:
        """The requests that waited have been answered: parse what was held back."""
        held, self._held = self._held, None
        if held is None or self._closing:
            return
        if len(held) > _WALK_ABOVE:
            self._parse_large(held)
        elif not self._parse(held):
            return
        if not self._holding():
            self.pause_reading("held", False)
        if self._current is not None and self._body_since is None and not self._closing:
            self._body_started()
        if self._active is None and self._queue:
            self._start_next()

    # No eof_received: a client's FIN is taken as a disconnect (as nginx and Envoy do), so its
    # upstream request is cancelled rather than left running for nobody.

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._held = None
        self._cancel_timer()
        if self._linger is not None:
            self._linger.cancel()
        for ex in (self._active, self._tunnel, *self._queue):
            if ex is not None:
                ex.cancel()  # a client gone: its upstream requests go too
        self._active = self._tunnel = None
        self._queue.clear()
        self.tracker.discard(self)

    def pause_writing(self) -> None:
        """The client is not reading: stop the upstream, and reading more requests."""
        self.write_paused = True
        ex = self._active or self._tunnel
        if ex is not None:
            ex.pause_upstream(True)
        transport = self.transport
        if transport is None or self._closing or self._tunnel is not None:
            return  # (a tunnel's two ways are independent: its upstream waits, paused)
        self.tracker.counters.client_not_reading += 1
        now = self.loop.time()
        self._stalled_at = now
        self._stalled_sent = self._bytes_out - transport.get_write_buffer_size()
        self.pause_reading("write", True)
        self._arm_at(self.tracker.limits.min_rate.deadline(now, 0))

    def resume_writing(self) -> None:
        self.write_paused = False
        ex = self._active or self._tunnel
        if ex is not None:
            ex.pause_upstream(False)
        self.pause_reading("write", False)
        if self._active is None and self._queue and not self._closing:
            self._start_next()

    # -- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._head = None
        self._reader.message_begin()
        if self._active is None:
            self.expect(_WAIT_HEAD, self.timeouts.head)

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._current is None:  # a line of the head: read as it comes
            head = self._head or self._begin_head()
            try:
                head.add(name, value)
            except ValueError as e:
                self._limit_error = (Reason.BAD_REQUEST, str(e))
                raise
            return
        too_large = self._reader.trailer(name, value)  # after the head: a chunked body's
        if too_large:
            self._limit_error = (Reason.HEAD_TOO_LARGE, too_large)
            raise ValueError(too_large)
        self._current.request_trailer(name, value)

    def _begin_head(self) -> RequestHead:
        """The request line is whole (a header line came, or the head's end): its head."""
        parser = self._parser
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            self._limit_error = (Reason.BAD_REQUEST, f"HTTP/{version} is not supported")
            raise ValueError("version")
        try:
            self._head = http1.request_head(parser.get_method(), self._url, version)
        except ValueError as e:
            self._limit_error = (Reason.BAD_REQUEST, str(e))
            raise
        return self._head

    def on_headers_complete(self) -> None:
        head = self._head or self._begin_head()
        self._head = None
        reader = self._reader
        too_large = reader.head_complete(
            head.lines, head.unlisted, len(self._url) + head.unlisted_bytes
        )
        if too_large:
            self._limit_error = (Reason.HEAD_TOO_LARGE, too_large)
            raise ValueError(too_large)
        head.complete(self._parser.should_keep_alive())
        if head.authority is None and head.version == "1.1":
            self._limit_error = (Reason.BAD_REQUEST, "HTTP/1.1 request without Host")
            raise ValueError("no host")
        ex = Exchange(self, head)
        self._body_left = head.content_length
        self._current = self._latest = ex
        self._queue.append(ex)
        if self._active is not None:
            self.pause_reading("pipeline", True)

    def on_body(self, data: bytes) -> None:
        self._reader.body()
        self._body_left -= len(data)
        if self._current is not None:
            self._current.request_body(data)

    def on_chunk_header(self) -> None:
        self._reader.chunk_header()

    def on_chunk_complete(self) -> None:
        self._reader.chunk_complete()

    def on_message_complete(self) -> None:
        ex, self._current = self._current, None
        self._body_since = None
        if ex is not None:
            ex.request_complete()

    # -- exchanges ------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        self._bytes_out += len(data)
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
                if self._body_since is not None:  # the body's pace does not count meanwhile
                    self._body_paused = self.loop.time()
            self._pauses.add(reason)
        elif reason in self._pauses:
            self._pauses.discard(reason)
            if not self._pauses:
                transport.resume_reading()
                if self._body_since is not None and self._body_paused is not None:
                    self._body_since += self.loop.time() - self._body_paused
                    self._body_paused = None

    def _holding(self) -> bool:
        """Bytes wait unparsed. (A method, not ``self._held is None`` after a call that may
        set it: mypy would keep the narrowing from before the call, and mypyc compile it.)"""
        return self._held is not None

    # -- the rest of what an exchange asks of its client (``client.Client``) ----------------

    def source_allows(self, max_requests: int) -> bool:
        source = self.source
        if source is None or source.in_flight < self.tracker.source_limit(max_requests):
            return True
        self.tracker.counters.refused_source_requests += 1
        return False

    def reading_paused(self) -> bool:
        """The sidecar, not the client, holds up the request (upstream or pipeline)."""
        return bool(self._pauses)

    def exchange_done(self, ex: object, *, close: bool, abort: bool) -> None:
        self.pause_reading("upstream", False)  # (one call from the exchange, not three)
        self.pause_reading("pending", False)
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
        elif self._reader.in_head:
            self.expect(_WAIT_HEAD, self.timeouts.head)
        else:
            self.expect(_WAIT_IDLE, self.timeouts.idle)

    def _start_next(self) -> None:
        """Start queued exchanges in order. A loop, not recursion: exchanges that are answered
        at once (a pipeline of 404s) finish inside ``start``, and their ``exchange_done``
        calls back in here. A client that does not read its answers gets no more of them
        (``resume_writing`` goes on)."""
        if self._starting:
            return
        self._starting = True
        try:
            while (
                self._active is None
                and self._queue
                and not self.write_paused
                and not self._closing_now()
            ):
                nxt = self._queue.popleft()
                self._active = nxt
                if not self._queue:
                    self.pause_reading("pipeline", False)
                    if self._held is not None:  # parse the next pipeline's worth, not in here
                        self.loop.call_soon(self._feed_held)
                nxt.start()
        finally:
            self._starting = False
        if self._active is None and not self._queue:
            self._idle()

    def _closing_now(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def become_tunnel(self) -> None:
        """The upstream answered 101: bytes now flow both ways unparsed, until either side
        closes or both are silent for the route's ``tunnel_idle_timeout_ms``."""
        self._active = None
        self._wait = _WAIT_TUNNEL
        self._deadline = math.inf
        self.pause_reading("upgrade", False)
        idle = self._silence_limit(self._tunnel)
        if idle < math.inf:
            self._arm_at(self.loop.time() + min(self.timeouts.head, idle / 2))

    def drain(self) -> None:
        """Finish what is in flight, then close; close at once if idle."""
        self.draining = True
        if (  # (requests may wait for a client that reads slowly: they are answered first)
            self._active is None
            and self._tunnel is None
            and not self._reader.in_head
            and not self._queue
        ):
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
        self._held = None
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
        self._held = None
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
        if (self._unread or self._reader.in_head or self._current is not None) and (
            transport.can_write_eof()
        ):
            # Lingering close: the client may still be sending what we will not read. Closing
            # now could reset the connection before it reads our answer; instead say we are
            # done, drop what it sends, and close on its EOF or after LINGER seconds.
            transport.write_eof()
            self._pauses.clear()
            transport.resume_reading()
            self._linger = self.loop.call_later(LINGER, self._linger_over)
        else:
            self._linger_over()

    def _linger_over(self) -> None:
        """Close; what the client has not read yet gets as long as the minimum data rate
        allows, then the connection is cut (a client that never reads holds nothing)."""
        transport = self.transport
        if transport is None:
            return
        transport.close()
        left = transport.get_write_buffer_size()
        if left:
            flush = self.tracker.limits.min_rate.deadline(0.0, left)
            if flush < math.inf:
                self._linger = self.loop.call_later(flush, transport.abort)

    def expect_route_at(self, when: float) -> None:
        """The active exchange's deadline (loop time): its route timeout or its try's."""
        self._wait = _WAIT_ROUTE
        self._deadline = when
        if self._timer is not None and self._timer_at <= when:
            return  # it wakes in time (and re-arms), as ``expect`` explains
        now = self.loop.time()
        at = now + self.timeouts.head  # (min(), inline: cheaper in pure Python)
        if when < at:
            at = when
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
        when = now + self.timeouts.head  # (min(), inline)
        if self._deadline < when:
            when = self._deadline
        if self._timer is None or when < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(when, self._on_timer)
            self._timer_at = when

    def _arm_at(self, when: float) -> None:
        """Make the timer wake no later than ``when`` (loop time)."""
        if self._closing or when == math.inf:
            return
        if self._timer is None or when < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(when, self._on_timer)
            self._timer_at = when

    def _on_timer(self) -> None:
        self._timer = None
        if self._closing:
            return
        now = self.loop.time()
        if self._too_slow(now):
            return
        wait = self._wait
        if wait is _WAIT_ROUTE or wait is _WAIT_TUNNEL:
            if self._went_silent(now):
                return
            if wait is _WAIT_ROUTE and now >= self._deadline and self._active is not None:
                self._active.route_timeout()  # (it sets the next deadline, or ends)
        elif now >= self._deadline:
            if wait is _WAIT_HEAD:
                self._head_timeout()
            else:
                self._close(abort=False)  # idle keep-alive
            return
        if not self._closing:
            self._arm_at(max(self._next_look(now), now + _MIN_WAKE))

    def _next_look(self, now: float) -> float:
        """When the timer must look again: the nearest deadline of what it watches, and
        at most ``timeouts.head`` from now (half a silence limit, when that is shorter)."""
        at = now + self.timeouts.head
        wait = self._wait
        if wait is not _WAIT_TUNNEL and now < self._deadline < at:
            at = self._deadline  # (one passed is the exchange's to move, or gone with it)
        if wait is _WAIT_ROUTE or wait is _WAIT_TUNNEL:
            idle = self._silence_limit(self._active if wait is _WAIT_ROUTE else self._tunnel)
            if idle < math.inf:
                at = min(at, self._quiet_since + idle, now + idle / 2)
        rate = self.tracker.limits.min_rate
        if self._body_since is not None and self._body_paused is None:
            at = min(at, rate.deadline(self._body_since, self._bytes_in - self._body_base))
        if self.write_paused and self._tunnel is None:
            at = min(at, rate.deadline(self._stalled_at, self._client_took()))
        return at

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timeout(self) -> None:
        if self._reader.in_head:
            self.write(
                error_response(
                    Reason.REQUEST_TIMEOUT, "request head not received in time", close=True
                )
            )
            self.tracker.rejected(Reason.REQUEST_TIMEOUT, self.timeouts.head)
        self._close(abort=False)

    # -- the client's pace and the silence of streams ----------------------------------------

    def _body_started(self) -> None:
        """A request body is still coming after its read: from now on it has a pace."""
        now = self.loop.time()
        self._body_since = now
        self._body_base = self._bytes_in
        self._body_paused = now if self._pauses else None
        self._arm_at(self.tracker.limits.min_rate.deadline(now, 0))

    def _client_took(self) -> int:
        """Bytes the client has read since it stopped reading (its writes were paused)."""
        buffered = self.transport.get_write_buffer_size() if self.transport is not None else 0
        return self._bytes_out - buffered - self._stalled_sent

    def _too_slow(self, now: float) -> bool:
        """The minimum data rate, both ways: a request body that comes too slowly is
        answered 408; a client that reads its answers too slowly is cut."""
        rate = self.tracker.limits.min_rate
        counters = self.tracker.counters
        if self._body_since is not None and self._body_paused is None:
            moved = self._bytes_in - self._body_base
            if now >= rate.deadline(self._body_since, moved):
                counters.request_body_rate += 1
                detail = (
                    f"the request body came slower than {rate.bytes_per_s:g} bytes/s "
                    f"({moved} bytes in {now - self._body_since:.1f} s)"
                )
                ex = self._current
                if ex is not None and ex is self._active and ex.state is not State.RESPONDING:
                    ex.fail(Reason.REQUEST_TIMEOUT, detail)
                elif ex is not None and ex is self._active:
                    self._close(abort=True)  # too late for a 408
                else:
                    self._reject(Reason.REQUEST_TIMEOUT, detail)
                return True
        if (  # (a tunnel's client may be slow: its upstream waits, paused, until it idles)
            self.write_paused
            and self._tunnel is None
            and now >= rate.deadline(self._stalled_at, self._client_took())
        ):
            counters.response_rate += 1
            self._close(abort=True)
            return True
        return False

    def _silence_limit(self, ex: Exchange | None) -> float:
        """Seconds the stream (or tunnel) of ``ex`` may go without a byte either way."""
        if ex is None or ex.route is None:
            return math.inf
        policy = ex.route.policy
        ms = (
            policy.tunnel_idle_timeout_ms
            if ex.state is State.TUNNEL
            else policy.stream_idle_timeout_ms
        )
        return ms / 1000 if ms else math.inf

    def _went_silent(self, now: float) -> bool:
        """Nothing moved either way for the stream's (or tunnel's) idle timeout: end it."""
        moved = self._bytes_in + self._bytes_out
        if moved != self._moved_seen:
            self._moved_seen = moved
            self._quiet_since = now
            return False
        ex = self._active if self._wait is _WAIT_ROUTE else self._tunnel
        idle = self._silence_limit(ex)
        if ex is None or now - self._quiet_since < idle:
            return False
        counters = self.tracker.counters
        if ex.state is State.TUNNEL:
            counters.tunnel_idle += 1
        else:
            counters.stream_idle += 1
        ex.idle_timeout(idle, client_stalled=not self._pauses)
        return True


class ConnectionTracker:
    """The client connections of one listener, for draining and statistics, and what they
    may take of it (``limits``)."""

    def __init__(
        self,
        direction: str = "outbound",
        service: str = "",
        *,
        metrics: bool = True,
        access_log: AccessLog | None = None,
        limits: ListenerLimits | None = None,
    ) -> None:
        self.direction = direction
        #: the service every request here is for (inbound: this sidecar's); "": by route
        self.service = service
        self.connections: set[Downstream] = set()
        self.draining = False
        #: requests answered before they had a service (no route, malformed), for /metrics
        self.unrouted = RequestStats() if metrics else None
        self.access_log = access_log
        self.limits = limits or ListenerLimits()
        self.counters = ListenerCounters()
        self.admission = Admission(self.limits, self.counters)

    def __repr__(self) -> str:
        return (
            f"<ConnectionTracker {self.direction} [{len(self.connections)} connections, "
            f"{self.admission.sources()} sources{', draining' if self.draining else ''}]>"
        )

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
            started = wall() - seconds
            entry = (started, self.direction, service, head, status, seconds, endpoint)
            self.access_log.add((*entry, attempts, error))

    def rejected(self, reason: Reason, seconds: float) -> None:
        """A request the connection answered itself before it became an exchange."""
        self.record(None, None, reason.status, seconds, error=reason.code)

    def add(self, ds: Downstream) -> bool:
        """A new connection: False when a limit refuses it (it is to be closed at once)."""
        admitted, ds.source = self.admission.admit(ds.client_ip)
        if admitted:
            self.connections.add(ds)
        return admitted

    def discard(self, ds: Downstream) -> None:
        if ds in self.connections:
            self.connections.remove(ds)
            self.admission.release(ds.source)

    def source_limit(self, max_requests: int) -> int:
        """Requests of ``max_requests`` one source address may have in flight."""
        return self.limits.per_source(max_requests)

    def drain(self) -> None:
        self.draining = True
        for ds in list(self.connections):
            ds.drain()
