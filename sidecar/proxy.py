"""The proxy listeners: one asyncio Protocol per client connection, one Exchange per request.

The data path reads top to bottom in ``Exchange``: route -> pick an endpoint -> take a pooled
connection (or connect) -> send the head and stream the body -> stream the response back ->
release the connection. All of it is synchronous callback code; the only thing awaited is a
new upstream connection. Bodies are never buffered whole: each side pauses reading the other
when its write buffer fills.

Requests on one connection are answered in order. A pipelined request waits, head and body
held in memory, while reading from the client is paused, so at most one read's worth waits.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, cast

import httptools

from control_plane.wire import Endpoint, Policy
from sidecar import http1
from sidecar.balancer import Balancer
from sidecar.errors import Reason, error_response
from sidecar.http1 import Headers, RequestHead
from sidecar.upstream import Pool, UpstreamConnection

log = logging.getLogger("meshlet.proxy")

#: request body bytes kept for a replay on a fresh connection; larger bodies are not replayed
REPLAY_LIMIT = 64 * 1024
#: body bytes held while connecting before the client is paused
PENDING_LIMIT = 64 * 1024
#: seconds a closing connection keeps dropping what an unread client still sends
LINGER = 2.0


@dataclass(frozen=True, slots=True)
class Timeouts:
    head: float = 10.0
    """seconds a client has to send a whole request head"""
    idle: float = 60.0
    """seconds a keep-alive client connection may sit between requests"""


@dataclass(slots=True)
class Route:
    """Where a request goes: a service's policy, balancer and connection pools."""

    name: str
    policy: Policy
    balancer: Balancer
    pool_for: Callable[[Endpoint], Pool]


class Router(Protocol):
    def route(self, authority: bytes | None) -> Route | tuple[Reason, str]:
        """The route for a request's authority, or why there is none."""
        ...


class _Wait(enum.Enum):
    """What a client connection's deadline is for."""

    HEAD = 0  # the client's request head
    ROUTE = 1  # the active exchange's route timeout
    IDLE = 2  # the next request on a keep-alive connection
    NONE = 3  # nothing (a tunnel)


class _State(enum.Enum):
    QUEUED = 0
    CONNECTING = 1
    SENT = 2
    RESPONDING = 3
    TUNNEL = 4
    DONE = 5


class Exchange:
    """One request's journey upstream and its response's journey back."""

    __slots__ = (
        "_chunk_out",
        "_connect_task",
        "_pending",
        "_pending_size",
        "_replay",
        "_replay_size",
        "_retried",
        "_trailers",
        "_tunnel_early",
        "conn",
        "ds",
        "endpoint",
        "head",
        "keep_alive",
        "request_done",
        "route",
        "state",
    )

    def __init__(self, ds: Downstream, head: RequestHead) -> None:
        self.ds = ds
        self.head = head
        self.state = _State.QUEUED
        self.route: Route | None = None
        self.endpoint: Endpoint | None = None
        self.conn: UpstreamConnection | None = None
        self.request_done = False
        self.keep_alive = head.keep_alive
        self._pending: list[bytes] = []  # framed request bytes not yet written upstream
        self._pending_size = 0
        self._replay: list[bytes] | None = []  # everything sent, for a replay; None if too big
        self._replay_size = 0
        self._retried = False
        self._connect_task: asyncio.Task[UpstreamConnection] | None = None
        self._chunk_out = False
        self._trailers: Headers = []
        self._tunnel_early: list[bytes] = []

    def __repr__(self) -> str:
        target = self.head.target[:40].decode(errors="replace")
        return f"<Exchange {self.head.method.decode()} {target} {self.state.name}>"

    # -- request side ---------------------------------------------------------------------

    def start(self) -> None:
        """Route, pick, and send (or connect): called when this exchange reaches the front."""
        head = self.head
        if head.method == b"CONNECT":
            self.fail(Reason.BAD_REQUEST, "CONNECT is not supported")
            return
        routed = self.ds.router.route(head.authority)
        if isinstance(routed, tuple):
            self.fail(*routed)
            return
        self.route = routed
        endpoint = routed.balancer.pick()
        if endpoint is None:
            self.fail(Reason.NO_HEALTHY_UPSTREAM, f"service {routed.name} has no endpoints")
            return
        self.endpoint = endpoint
        data = http1.upstream_request(head, self.ds.client_ip)
        self._pending.insert(0, data)
        self._pending_size += len(data)
        if self._replay is not None:
            self._replay.insert(0, data)
            self._replay_size += len(data)
        self.ds.expect(_Wait.ROUTE, routed.policy.timeout_ms / 1000)
        conn = routed.pool_for(endpoint).take_idle()
        if conn is not None:
            self._send_on(conn)
        else:
            self._connect(routed.pool_for(endpoint))

    def request_body(self, data: bytes) -> None:
        if self.head.chunked:
            data = http1.chunk(data)
        if self.state is not _State.QUEUED and self.route is not None:
            # an upload in progress: the route timeout counts from its last byte
            self.ds.expect(_Wait.ROUTE, self.route.policy.timeout_ms / 1000)
        self._out(data)

    def request_trailer(self, name: bytes, value: bytes) -> None:
        self._trailers.append((name, value))

    def request_complete(self) -> None:
        self.request_done = True
        if self.head.has_body and self.state is not _State.QUEUED and self.route is not None:
            # as Envoy's route timeout: from the end of the request to the end of the response
            # (a request without a body ended where it started: start() set the deadline)
            self.ds.expect(_Wait.ROUTE, self.route.policy.timeout_ms / 1000)
        if self.head.chunked:
            trailers, self._trailers = self._trailers, []
            self._out(http1.last_chunk(trailers))

    def _out(self, data: bytes) -> None:
        if self._replay is not None:
            self._replay.append(data)
            self._replay_size += len(data)
            if self._replay_size > REPLAY_LIMIT:
                self._replay = None
        if self.state is _State.SENT or self.state is _State.RESPONDING:
            if self.conn is not None:
                self.conn.write(data)
        elif self.state is not _State.DONE:
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size > PENDING_LIMIT:
                self.ds.pause_reading("pending", True)

    # -- connecting -------------------------------------------------------------------------

    def _connect(self, pool: Pool) -> None:
        self.state = _State.CONNECTING
        assert self.route is not None
        timeout = self.route.policy.connect_timeout_ms / 1000

        async def connect() -> UpstreamConnection:
            async with asyncio.timeout(timeout):
                return await pool.connect()

        task = self.ds.loop.create_task(connect())
        self._connect_task = task
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[UpstreamConnection]) -> None:
        self._connect_task = None
        if task.cancelled():
            return
        exc = task.exception()
        if self.state is _State.DONE:
            if exc is None:
                conn = task.result()
                conn.pool.release(conn)  # a fresh connection nobody needs: keep it
            return
        if exc is not None:
            assert self.endpoint is not None
            e = self.endpoint
            what = (
                f"timed out after {self.route.policy.connect_timeout_ms} ms"
                if isinstance(exc, TimeoutError) and self.route is not None
                else str(exc) or type(exc).__name__
            )
            self.fail(Reason.UPSTREAM_CONNECT_FAILURE, f"connect to {e.address}:{e.port} {what}")
            return
        self._send_on(task.result())

    def _send_on(self, conn: UpstreamConnection) -> None:
        if not conn.alive():  # the upstream accepted and hung up before a byte was sent
            conn.pool.discard(conn)
            self.fail(
                Reason.UPSTREAM_RESET, "the upstream closed the connection before the request"
            )
            return
        self.conn = conn
        self.state = _State.SENT
        if self.ds.write_paused:
            conn.pause_reading(True)
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        conn.send(self, data)
        self.ds.pause_reading("pending", False)

    # -- response side (ResponseSink) -----------------------------------------------------

    def response_head(self, resp: http1.ResponseHead) -> bool:
        ds = self.ds
        head = self.head
        status = resp.status
        if status < 200 and status != 101:
            if ds.version == "1.1":
                ds.write(http1.interim_response(resp))
            return False
        if status == 101:
            if not head.upgrade:
                self.upstream_failed(None, protocol_error=True)  # closes the connection
                return False
            self.state = _State.TUNNEL
            ds.write(http1.interim_response(resp))
            return False
        self.state = _State.RESPONDING
        no_body = head.method == b"HEAD" or status in (204, 304)
        keep_alive = self.keep_alive and not ds.draining and not head.upgrade
        if no_body or (resp.sized and not resp.chunked):
            self._chunk_out = False
        elif ds.version == "1.1":
            self._chunk_out = True  # chunked or read-until-close upstream: chunked to the client
        else:
            self._chunk_out = False  # an HTTP/1.0 client: the end of the body is the close
            keep_alive = False
        if not self.request_done:
            keep_alive = False  # the rest of the request body would have to be read first
        self.keep_alive = keep_alive
        ds.write(
            http1.downstream_response(
                resp,
                chunked=self._chunk_out,
                keep_alive=keep_alive,
                client_version=ds.version,
            )
        )
        return head.method == b"HEAD"

    def response_body(self, data: bytes) -> None:
        self.ds.write(http1.chunk(data) if self._chunk_out else data)

    def response_trailer(self, name: bytes, value: bytes) -> None:
        if self._chunk_out:
            self._trailers.append((name, value))

    def response_complete(self) -> None:
        if self.state is _State.DONE:
            return
        if self._chunk_out:
            trailers, self._trailers = self._trailers, []
            self.ds.write(http1.last_chunk(trailers))
        conn, self.conn = self.conn, None
        if conn is not None:
            if not self.request_done:
                conn.reusable = False
            conn.pool.release(conn)
        self._finish(close=not self.keep_alive)

    def response_upgraded(self, rest: bytes) -> None:
        conn = self.conn
        if conn is None or self.state is not _State.TUNNEL:
            return  # answered already (a 101 nobody asked for is a 502)
        conn.tunnel_to(self.ds.write)
        if rest:
            self.ds.write(rest)
        for data in self._tunnel_early:
            conn.write(data)
        self._tunnel_early.clear()
        self.ds.become_tunnel(self)

    def upstream_failed(self, exc: BaseException | None, protocol_error: bool) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()  # a connection that failed is never reused
        if self.state is _State.DONE:
            return
        if self.state is _State.TUNNEL:
            self._finish(close=True)
            return
        if self.state is _State.RESPONDING:
            # mid-body: the client must not see a body that looks complete
            self._finish(close=True, abort=True)
            return
        if (
            not protocol_error
            and conn is not None
            and conn.requests > 1  # a reused connection the upstream had closed: stale
            and not conn.received
            and not self._retried
            and self._replay is not None
            and self.head.method in http1.IDEMPOTENT
        ):
            self._retried = True
            self._pending = list(self._replay)
            self._pending_size = sum(map(len, self._pending))
            self._connect(conn.pool)
            return
        if protocol_error:
            self.fail(Reason.UPSTREAM_PROTOCOL_ERROR, "the upstream sent a malformed response")
        else:
            detail = f"{type(exc).__name__}: {exc}" if exc else "connection closed"
            self.fail(Reason.UPSTREAM_RESET, f"upstream closed the connection ({detail})")

    def upstream_paused(self, paused: bool) -> None:
        self.ds.pause_reading("upstream", paused)

    def cork(self) -> None:
        self.ds.cork()

    def uncork(self) -> None:
        self.ds.uncork()

    # -- tunnel -----------------------------------------------------------------------------

    def tunnel_from_client(self, data: bytes) -> None:
        if self.state is _State.TUNNEL and self.conn is not None:
            self.conn.write(data)
        elif self.state is not _State.DONE:
            self._tunnel_early.append(data)

    # -- endings --------------------------------------------------------------------------

    def route_timeout(self) -> None:
        assert self.route is not None
        timeout = self.route.policy.timeout_ms
        if self.state is _State.RESPONDING:
            self._finish(close=True, abort=True)  # too late for a 504: cut the stream
        elif not self.request_done:
            self.fail(Reason.REQUEST_TIMEOUT, f"the request body stalled for {timeout} ms")
        else:
            self.fail(Reason.UPSTREAM_TIMEOUT, f"no response within {timeout} ms")

    def fail(self, reason: Reason, detail: str) -> None:
        """Answer with a synthetic error instead of an upstream response."""
        if self.state is _State.DONE:
            return
        # A body still coming would have to be read first: close instead.
        unread_body = not self.request_done and (self.head.has_body or self.head.chunked)
        close = not self.keep_alive or unread_body or self.head.upgrade
        self.ds.write(error_response(reason, detail, close=close))
        self.ds.stats_error(reason)
        self._finish(close=close)

    def _finish(self, *, close: bool, abort: bool = False) -> None:
        if self.state is _State.DONE:
            return
        self.state = _State.DONE
        self.cancel()
        # back-pressure this exchange put on the client ends with it
        self.ds.pause_reading("upstream", False)
        self.ds.pause_reading("pending", False)
        self.ds.exchange_done(self, close=close, abort=abort)

    def cancel(self) -> None:
        """Stop all upstream work: a connect in progress, the connection in use."""
        self.state = _State.DONE
        if self._connect_task is not None:
            # _connected still runs: a connect that finished just now is released, not leaked
            self._connect_task.cancel()
            self._connect_task = None
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
        self._pending.clear()


class Downstream(asyncio.Protocol):
    """One client connection: parses requests, runs their exchanges in order."""

    def __init__(self, router: Router, tracker: ConnectionTracker, timeouts: Timeouts) -> None:
        self.router = router
        self.tracker = tracker
        self.timeouts = timeouts
        self.loop = asyncio.get_running_loop()
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

    def stats_error(self, reason: Reason) -> None:
        self.tracker.errors[reason] = self.tracker.errors.get(reason, 0) + 1

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
        if ex is None or ex.state is _State.DONE:
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
        self.stats_error(reason)
        broken, self._current = self._current, None
        self._queue = deque(ex for ex in self._queue if ex.request_done and ex is not broken)
        active = self._active
        if active is not None and (active is broken or not active.request_done):
            # the broken request is already on its way upstream: call it off
            self._active = None
            responding = active.state is _State.RESPONDING
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
            self.stats_error(Reason.REQUEST_TIMEOUT)
        self._close(abort=False)


class ConnectionTracker:
    """The client connections of one listener, for draining and statistics."""

    def __init__(self) -> None:
        self.connections: set[Downstream] = set()
        self.errors: dict[Reason, int] = {}
        self.draining = False

    def add(self, ds: Downstream) -> None:
        self.connections.add(ds)

    def discard(self, ds: Downstream) -> None:
        self.connections.discard(ds)

    def drain(self) -> None:
        self.draining = True
        for ds in list(self.connections):
            ds.drain()
