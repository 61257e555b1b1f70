"""The proxy listeners: one asyncio Protocol (``Downstream``) per client connection.

A Downstream parses requests (httptools), enforces the head limits, the timeouts and the
client limits (``limits``), and runs one ``Exchange`` per request (``exchange``), in order.
Bodies are never buffered whole: each side pauses reading the other when its write buffer
fills, and a client that does not read its answers is not read from either.

Requests on one connection are answered in order. A pipelined request waits, head and body
held in memory, while reading from the client is paused: at most ``MAX_PIPELINED`` parsed
requests wait, and the rest of their read waits unparsed.

What is time-bound on a connection (the request head, the keep-alive wait, the active
exchange's deadline, the silence of streams, the pace of bodies) is watched by one lazy timer
(``watch``); the connections of a listener are counted by its ``tracker``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Final, cast

import httptools

from sidecar.errors import Reason, error_response
from sidecar.http import http1
from sidecar.http.http1 import MAX_HEAD_BYTES, MAX_HEADERS, RequestHead
from sidecar.proxy.client import Http1Answer
from sidecar.proxy.exchange import Exchange
from sidecar.proxy.intercept import Interception, looks_like_http, original_destination
from sidecar.proxy.limits import MAX_PIPELINED, Source
from sidecar.proxy.relay import Relay
from sidecar.proxy.routing import Route, Router
from sidecar.proxy.tlslayer import TlsLayer
from sidecar.proxy.tracker import ConnectionTracker
from sidecar.proxy.watch import WAIT_HEAD, WAIT_IDLE, WAIT_TUNNEL, Timeouts, Watch
from sidecar.resilience.tries import State
from sidecar.tls import MESH_ALPN_H2

if TYPE_CHECKING:  # (imported when the first HTTP/2 connection comes: ``_start_h2``)
    from sidecar.proxy.h2conn import H2Downstream

log = logging.getLogger("meshlet.proxy")

#: seconds a closing connection keeps dropping what an unread client still sends
LINGER = 2.0
#: reads longer than this are parsed a message at a time, so that no more than
#: ``MAX_PIPELINED`` requests wait; one this long holds fewer (a head is at least 18 bytes:
#: ``GET / HTTP/1.0`` and two CRLFs), and a body of up to 16 KiB that came with its head is
#: parsed in one go
_WALK_ABOVE: Final = 16 * 1024
#: a CONNECT's answer once its stream is open
CONNECTED: Final = b"HTTP/1.1 200 Connection Established\r\n\r\n"
assert _WALK_ABOVE // 18 < MAX_PIPELINED


class Downstream(Watch):
    """One client connection: parses requests, runs their exchanges in order (its timer and
    what it watches: ``Watch``)."""

    __slots__ = (
        "_body_left",
        "_corked",
        "_fresh",
        "_h2",
        "_head",
        "_held",
        "_held_writes",
        "_hold",
        "_latest",
        "_limit_error",
        "_linger",
        "_mesh_tails",
        "_parser",
        "_pending_reject",
        "_queue",
        "_relay",
        "_send",
        "_sniffing",
        "_starting",
        "_tail",
        "_tls_first",
        "_unread",
        "_url",
        "answer",
        "client_ip",
        "draining",
        "on_message_begin",
        "original",
        "peer",
        "peer_line",
        "record",
        "route",
        "router",
        "source",
    )

    def __init__(
        self,
        router: Router,
        tracker: ConnectionTracker,
        timeouts: Timeouts,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        # the listener passes its loop: asyncio.get_running_loop() makes a getpid() system
        # call on Python 3.11, and a client may open a connection per request
        super().__init__(tracker, timeouts, loop or asyncio.get_running_loop())
        self.router = router
        # what an exchange asks of its client (``client.Client``), straight from where it is
        self.route = router.route
        self.record = tracker.record
        self.client_ip = b"unknown"
        self.source: Source | None = None  # inbound: this address's share (``limits``)
        self.draining = False
        self._send = self.write  # (bound once: the answer's sink is set back to it often)
        self.answer = Http1Answer(self._send)
        # the parser's callback at a message's start, straight into the head reader, not
        # through a method of this connection (a Python call fewer a request; httptools
        # looks its callbacks up once, as it is made): the request line and the head being
        # read are cleared when a head completes
        self.on_message_begin = self._reader.message_begin
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._head: RequestHead | None = None  # the head being read, from its request line
        self._fresh = b""  # a read that began between requests: its first one's line (b"": not)
        self.original: tuple[str, int] | None = None  # intercepted: where it was going
        self._sniffing = False  # intercepted: HTTP or not, its first bytes will say
        self._relay: Relay | None = None  # not HTTP: relayed unparsed
        self._queue: deque[Exchange] = deque()
        self._held: bytes | None = None  # read, not parsed: MAX_PIPELINED requests wait
        self._latest: Exchange | None = None  # the exchange whose head came last
        self._limit_error: tuple[Reason, str] | None = None
        self._pending_reject: bytes | None = None
        self._corked = False  # writes are held back (``cork``)
        self._held_writes: list[bytes] = []  # what they held back
        self._hold = self._held_writes.append
        self._body_left = -1  # bytes of the request body still to come (-1: chunked, none)
        self._starting = False  # _start_next is running (it loops; calls inside it return)
        self._unread = False  # the client may still be sending: linger before closing
        self._linger: asyncio.TimerHandle | None = None
        self._tls_first = False  # inbound: the first read may start a mesh TLS session
        self._mesh_tails = False  # inbound: heads may end with the lines an outbound sidecar adds
        #: those lines, cut off the read the head came in (``http1.cut_mesh_tail``)
        self._tail: re.Match[bytes] | None = None
        self._h2: H2Downstream | None = None  # the connection is HTTP/2's (``_start_h2``)
        #: the caller's verified SPIFFE ID (inbound mesh TLS), and its x-meshlet-peer line
        self.peer: str | None = None
        self.peer_line = b""

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
        guard = self.tracker.guard
        if guard is not None:
            self.route = self._guarded_route
        interception = self.tracker.interception
        if interception is not None:
            self.original = original = original_destination(transport)
            if original is not None:
                if interception.opaque(original):
                    self._become_relay(b"")
                    return
                self._sniffing = True
        # mesh TLS comes to the inbound port itself; what iptables redirected there keeps its
        # own bytes (an app's own TLS is relayed to it, as before)
        self._tls_first = guard is not None and self.original is None
        self._mesh_tails = self.tracker.direction == "inbound"
        self.expect(WAIT_HEAD, self.timeouts.head)

    def data_received(self, data: bytes) -> None:
        n = len(data)
        self._bytes_in += n
        if self._tls_first:
            self._tls_first = False
            if data[:1] == b"\x16":  # a TLS handshake record: no HTTP method starts so
                self._start_tls(data)
                return
        if self._bytes_in == n and data[:4] == b"PRI ":  # the HTTP/2 preface (no method is PRI)
            self._start_h2(data)
            return
        if self._tunnel is not None:
            self._tunnel.tunnel_from_client(data)
            return
        if self._closing or (self._sniffing and not self._sniff(data)):
            return
        if self._held is not None:  # (reading is paused: only bytes already on their way)
            self._held += data
            return
        if n > _WALK_ABOVE:
            self._parse_large(data)
        else:  # ``_parse``, inline: on the hot path a call costs as much as the rest
            reader = self._reader
            reader.read = n
            if self._current is None and not reader.in_head:
                self._fresh = data
                if self._mesh_tails:  # its head's last lines are read without the parser
                    cut = http1.cut_mesh_tail(data)
                    if cut is not None:
                        data, self._tail = cut
            else:
                self._fresh = b""
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
        self._fresh = b""  # (the request line is asked of the parser)
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            return self._parse_failed(e, data)
        return not (reader.in_head or reader.trailer_watch) or self._count_section(n)

    def _count_section(self, n: int) -> bool:
        """The read (of ``n`` bytes) ended inside a head or what may be trailers (``reader``).
        False when it is too large (rejected). A head that began in it, with nothing in
        flight, is waited for from now (``timeouts.head``): a head that ends in the read it
        began in needs no wait of its own, its exchange sets the next."""
        reader = self._reader
        if reader.in_head and reader.began and self._active is None:
            self.expect(WAIT_HEAD, self.timeouts.head)
        if reader.read_ended(n):
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

    # -- inbound mesh TLS (``guard``) -----------------------------------------------------

    def _start_tls(self, first: bytes) -> None:
        """The client opened with a TLS handshake: a session (``TlsLayer``) goes between the
        socket and this connection, which reads and writes through it from now on."""
        guard, raw = self.tracker.guard, self.transport
        context = None if guard is None else guard.mesh.server
        if context is None or raw is None:  # no certificate (yet, or expired): no TLS
            self._tls_failed("this sidecar holds no certificate")
            self._close(abort=True)
            return
        layer = TlsLayer(
            context,
            self,
            server_side=True,
            attached=True,
            verdict=self._tls_verdict,
            failed=self._tls_failed,
        )
        raw.set_protocol(layer)
        layer.connection_made(raw)
        layer.data_received(first)

    # -- HTTP/2 with prior knowledge (``h2conn``) -------------------------------------------

    def _start_h2(self, first: bytes) -> None:
        """The client opened with the HTTP/2 preface: the connection is an ``H2Downstream``'s
        from now on, each of its streams a request; this one stays its ``origin`` (routes,
        limits, metrics) and is told of draining."""
        # here, not at the top: h2 costs a sidecar that never sees HTTP/2 1.6 MB (issue 12)
        from sidecar.proxy.h2conn import H2Downstream

        raw = self.transport  # (the socket's, or mesh TLS's: ``_tls_verdict``)
        assert raw is not None
        self._closing = True  # (nothing more reaches the parser)
        self._cancel_timer()
        tracker = self.tracker
        self._h2 = h2 = H2Downstream(self, self.loop, self.timeouts.idle, tracker.h2_limits)
        raw.set_protocol(h2)
        h2.connection_made(raw)
        if first:
            h2.data_received(first)

    def _tls_verdict(self, layer: TlsLayer, peer: str | None) -> str | None:
        """The handshake is done (the peer's certificate chains to the trust bundle): the
        connection is the session's; who the caller is decides each request (``guard``).
        A session whose client chose ``h2`` by ALPN is HTTP/2's from its first byte, as a
        connection that opened with the preface is (``_start_h2``)."""
        self.transport = layer
        self.peer = peer
        if peer is not None:  # (printable ASCII: the URI of a verified certificate)
            self.peer_line = b"x-meshlet-peer: " + peer.encode() + b"\r\n"
        counters = self.tracker.counters
        counters.tls_handshakes += 1
        if layer.tls.selected_alpn_protocol() == MESH_ALPN_H2:
            counters.tls_h2 += 1
            self._start_h2(b"")
        return None

    def _tls_failed(self, why: str) -> None:
        self.tracker.counters.tls_failures += 1
        log.debug("inbound TLS from %s refused: %s", self.client_ip.decode(), why)

    def _guarded_route(self, authority: bytes | None) -> Route | tuple[Reason, str]:
        """The route, once the caller may call (``guard``)."""
        guard = self.tracker.guard
        if guard is None or guard.open:  # (nothing to refuse: one call fewer a request)
            return self.router.route(authority)
        refused = guard.check(self.peer, self.client_ip)
        return refused if refused is not None else self.router.route(authority)

    # -- httptools callbacks --------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        self._url += url
        # The head of nearly every request (its line whole in the read it began, origin-form,
        # HTTP/1.1), made here rather than at its first header line (``_begin_head``, which
        # makes the others): a Python call fewer a request. (llhttp hands the target over
        # once it ends, or at the end of a read: ``_fresh`` is b"" after a read that began
        # inside the line.)
        line = self._fresh
        if line and url[:1] == b"/":
            method = self._parser.get_method()
            at = len(method) + len(url) + 2
            if line[at : at + 10] == b"HTTP/1.1\r\n" and method != b"CONNECT":
                self._fresh = b""
                self._head = RequestHead(method, url, "1.1")

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
        parser, url = self._parser, self._url
        method = parser.get_method()
        # Its version, off the read it began (if it began one: "METHOD SP target SP HTTP/1.1
        # CRLF"), else asked of the parser, whose get_http_version formats a string: 1 % of
        # the work of a request. Bytes that are not this request's line do not match there.
        line, self._fresh = self._fresh, b""
        at = len(method) + len(url) + 2
        version = "1.1" if line[at : at + 10] == b"HTTP/1.1\r\n" else parser.get_http_version()
        if version != "1.1" and version != "1.0":
            self._limit_error = (Reason.BAD_REQUEST, f"HTTP/{version} is not supported")
            raise ValueError("version")
        if url[:1] == b"/" and method != b"CONNECT":  # (``request_head``'s common case)
            self._head = RequestHead(method, url, version)
            return self._head
        try:
            self._head = http1.request_head(method, url, version)
        except ValueError as e:
            self._limit_error = (Reason.BAD_REQUEST, str(e))
            raise
        return self._head

    def on_headers_complete(self) -> None:
        head = self._head or self._begin_head()
        self._head = None
        if self._tail is not None:  # (the first head of its read: none came between)
            head.mesh_tail(self._tail)
            self._tail = None
        reader = self._reader
        if (  # (``HeadReader.head_complete``'s common case, inline: once a request)
            len(head.lines) + head.unlisted <= MAX_HEADERS
            and reader.raw_count + reader.raw_first + reader.read <= MAX_HEAD_BYTES
        ):
            reader.in_head = False
            reader.raw_count = reader.raw_first = 0
            reader.trailer_count = reader.trailer_size = 0
        else:
            too_large = reader.head_complete(
                head.lines, head.unlisted, len(self._url) + head.unlisted_bytes
            )
            if too_large:
                self._limit_error = (Reason.HEAD_TOO_LARGE, too_large)
                raise ValueError(too_large)
        self._url = b""  # (the next message's target: ``on_url`` adds to it)
        head.complete(self._parser.should_keep_alive())
        if head.authority is None and head.version == "1.1":
            self._limit_error = (Reason.BAD_REQUEST, "HTTP/1.1 request without Host")
            raise ValueError("no host")
        if self.peer_line:
            head.lines.append(self.peer_line)
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
        if self._corked:
            self._held_writes.append(data)  # (counted when it goes)
            return
        self._bytes_out += len(data)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def cork(self) -> None:
        """Hold writes until ``uncork``: a response head and body read together from the
        upstream go out in one send instead of several. Meanwhile the answer appends its
        bytes to what is held without a call of ``write`` for each piece."""
        if not self._corked:
            self._corked = True
            self.answer.sink = self._hold

    def uncork(self) -> None:
        if not self._corked:
            return
        self._corked = False
        self.answer.sink = self._send
        held = self._held_writes
        if held:
            data = held[0] if len(held) == 1 else b"".join(held)
            held.clear()
            self._bytes_out += len(data)
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(data)

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
        if self._pauses:  # (one call from the exchange, not three; none when nothing paused)
            self.pause_reading("upstream", False)
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
        elif self._starting:
            pass  # (``_start_next`` goes on)
        elif self._relay is None and not (self._closing or self.draining):
            # (``_idle``'s common case, inline: once a request)
            if self._reader.in_head:
                self.expect(WAIT_HEAD, self.timeouts.head)
                return
            # (``expect(WAIT_IDLE, ...)``, inline: the timer, armed for the exchange, nearly
            # always wakes in time for the wait that follows; else it is re-armed)
            now, timeouts = self.loop.time(), self.timeouts
            self._wait = WAIT_IDLE
            self._deadline = deadline = now + timeouts.idle
            when = now + timeouts.head
            if deadline < when:
                when = deadline
            if self._timer is None or when < self._timer_at:
                self._arm_at(when)
        else:
            self._idle()

    def _idle(self) -> None:
        """Nothing in flight: close if asked to, else wait for the next request."""
        if self._relay is not None:
            return  # the connection is a relay's now (CONNECT)
        if self._closing or self.draining:
            self._close(abort=False)
        elif self._reader.in_head:
            self.expect(WAIT_HEAD, self.timeouts.head)
        else:
            self.expect(WAIT_IDLE, self.timeouts.idle)

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
                and self.transport is not None
                and not self.transport.is_closing()
            ):
                nxt = self._queue.popleft()
                self._active = nxt
                if not self._queue:
                    if self._pauses:
                        self.pause_reading("pipeline", False)
                    if self._held is not None:  # parse the next pipeline's worth, not in here
                        self.loop.call_soon(self._feed_held)
                nxt.start()
        finally:
            self._starting = False
        if self._active is None and not self._queue:
            self._idle()

    def become_tunnel(self) -> None:
        """The upstream answered 101: bytes now flow both ways unparsed, until either side
        closes or both are silent for the route's ``tunnel_idle_timeout_ms``."""
        self._active = None
        self._wait = WAIT_TUNNEL
        self._deadline = math.inf
        self.pause_reading("upgrade", False)
        idle = self._silence_limit(self._tunnel)
        if idle < math.inf:
            self._arm_at(self.loop.time() + min(self.timeouts.head, idle / 2))

    def drain(self) -> None:
        """Finish what is in flight, then close; close at once if idle."""
        self.draining = True
        if self._h2 is not None:
            self._h2.drain()
            return
        if self._relay is not None:
            self._relay.close()
            return
        if (  # (requests may wait for a client that reads slowly: they are answered first)
            self._active is None
            and self._tunnel is None
            and not self._reader.in_head
            and not self._queue
        ):
            self._close(abort=False)

    def egress(self, authority: bytes, proxied: bool) -> Route | tuple[Reason, str] | None:
        egress = self.tracker.egress
        if egress is None or (self.original is None and not proxied):
            return None  # (made to the sidecar itself)
        return egress.route(authority, self.original)

    # -- intercepted connections (``intercept``) -------------------------------------------

    def _sniff(self, data: bytes) -> bool:
        """An intercepted connection's first bytes: False when they are not HTTP (the
        connection is relayed unparsed from here on)."""
        self._sniffing = False
        if looks_like_http(data) is not False:
            return True
        self._become_relay(data)
        return False

    def _head_timeout(self) -> None:
        if self._sniffing:  # an intercepted connection that said nothing: the server speaks first
            self._become_relay(b"")
        else:
            super()._head_timeout()

    def _become_relay(self, first: bytes) -> None:
        """Relay the connection unparsed to where it was going (``first``: read already)."""
        interception, original = self.tracker.interception, self.original
        assert interception is not None
        assert original is not None
        self.tracker.counters.opaque_streams += 1
        self._start_relay(Relay, interception.destination(original), first)

    def relay_to(
        self, destination: tuple[str, int], first: bytes, opened: Callable[[bool], None]
    ) -> None:
        self._active = self._tunnel = None
        host, port = destination
        refusal = error_response(
            Reason.UPSTREAM_CONNECT_FAILURE, f"cannot connect to {host}:{port}", close=True
        )
        self._start_relay(
            partial(Relay, greeting=CONNECTED, refusal=refusal, opened=opened), destination, first
        )

    def _start_relay(
        self, relay: Callable[..., Relay], destination: tuple[str, int], first: bytes
    ) -> None:
        assert self.transport is not None
        self._sniffing = False
        self._closing = True  # (nothing more reaches the parser)
        self._cancel_timer()
        interception = self.tracker.interception or Interception()
        self._relay = relay(self.transport, destination, interception, self.loop, self._relay_over)
        self._relay.start(first)

    def _relay_over(self) -> None:
        self._relay = None
        self.tracker.discard(self)

    # -- internals ------------------------------------------------------------------------

    def _upgrade(self, rest: bytes) -> None:
        """httptools stopped at the end of an upgrade (or CONNECT) head; no more HTTP follows
        on this connection. Bytes after the head wait for the upstream's 101."""
        ex, self._current = self._latest, None
        if ex is not None and ex.state is not State.DONE:
            self._tunnel = ex
            self.pause_reading("upgrade", True)
            if rest:  # (before it starts: a CONNECT may be relayed at once)
                ex.tunnel_from_client(rest)
        if self._active is None and self._queue:
            self._start_next()

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
            if self._corked:
                self._corked = False
                self._held_writes.clear()
                self.answer.sink = self._send
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
