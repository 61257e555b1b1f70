"""Connections to upstream endpoints, each kept by its endpoint's pool (``pool.Pool``).

An ``UpstreamConnection`` parses responses with httptools and hands each event to the
``Exchange`` that owns it at the moment (its *owner*). A connection goes back to its pool
only after a complete response without ``Connection: close``. One that the upstream closes
while idle leaves the pool at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Protocol, cast

import httptools

from control_plane.wire import Endpoint
from sidecar.http import framing, http1
from sidecar.http.reader import HeadReader
from sidecar.http.wholehead import whole_response_head
from sidecar.proxy.outbox import Outbox


class ResponseSink:
    """What an upstream connection tells the exchange that owns it (``exchange.Exchange``).
    A base class rather than a Protocol, as ``Home`` is: compiled, the three calls a response
    makes (head, body, end) stay native calls."""

    __slots__ = ()

    def response_head(self, resp: http1.ResponseHead) -> bool:
        """A response head arrived; return True when no body follows even though the head
        says one does (the answer to a HEAD request)."""
        raise NotImplementedError

    def response_body(self, data: bytes) -> None:
        raise NotImplementedError

    def response_trailer(self, name: bytes, value: bytes) -> None:
        raise NotImplementedError

    def response_complete(self) -> None:
        raise NotImplementedError

    def response_upgraded(self, rest: bytes) -> None:
        raise NotImplementedError

    def upstream_failed(self, exc: BaseException | None, protocol_error: bool) -> None:
        raise NotImplementedError

    def upstream_paused(self, paused: bool) -> None:
        raise NotImplementedError


class Corkable(Protocol):
    """The client connection a response goes to, as the upstream connection sees it."""

    def cork(self) -> None:
        """Hold writes to the client until ``uncork`` (one upstream read, one client send)."""
        ...

    def uncork(self) -> None: ...


class Home:
    """The pool a connection belongs to, as the connection and the exchanges that use it see
    it: its endpoint, and where a connection goes when a response is done with it.
    ``pool.Pool`` is the one; it makes connections, so this side cannot import it. A base
    class rather than a Protocol: compiled, ``conn.pool.release(conn)`` (once a request)
    stays a native call (mypyc calls a Protocol's methods as Python does)."""

    endpoint: Endpoint
    head_ends: dict[int, bytes]
    """the last lines of heads sent here, by milliseconds left (``http1.upstream_request``)"""

    def release(self, conn: Carrier) -> None:
        """Back to the pool after a complete response, or closed when it cannot be reused."""
        raise NotImplementedError

    def discard(self, conn: Carrier) -> None:
        """Forget a connection that closed."""
        raise NotImplementedError


class Outgoing:
    """A try's request as the carrier that sends it takes it (``dispatch.Dispatch`` is the
    one): the client's head, what this try's head says besides, and the body as it came so
    far. Fields, not methods: each carrier frames them for its protocol
    (``http1.upstream_request``, ``http2.upstream_headers``), a call less a try in pure
    Python. A base class, as ``Home`` is: compiled, the reads stay native."""

    __slots__ = ("attempt_sent", "client_ip", "deadline_sent", "grpc_sent", "head", "out")

    head: http1.RequestHead
    """the client's request, as it came"""
    client_ip: bytes
    """the client's address (``x-forwarded-for``)"""
    attempt_sent: int
    """``x-meshlet-attempt`` (0: none)"""
    deadline_sent: int | None
    """``x-meshlet-deadline-ms``: the milliseconds the try has left (None: none)"""
    grpc_sent: int | None
    """``grpc-timeout``: the milliseconds left of a gRPC caller's deadline (None: none)"""
    out: Outbox | None
    """the body (None: the request has none); a carrier takes what is pending of it, and
    its end and trailers once it ``ended``"""


class Carrier(asyncio.Protocol):
    """What carries one try's request to an endpoint and its response back, as the exchange
    and its dispatch see it: an HTTP/1.1 connection (``UpstreamConnection``) or one stream of
    an HTTP/2 connection (``h2upstream.H2Channel``). A base class, as ``Home`` is: compiled,
    the calls stay native. The request comes as the try's ``Outgoing``, then its body as it
    came; each carrier frames it for its protocol."""

    __slots__ = ("owner", "pool", "received", "reusable")

    owner: ResponseSink | None
    """the exchange the current response goes to"""
    pool: Home
    received: bool
    """a byte of the current response came"""
    reusable: bool

    def send(self, owner: ResponseSink, request: Outgoing, client: Corkable) -> None:
        """Start a request: ``owner`` gets the response, which goes to ``client``; its head,
        the body so far and (if it ended) its end are ``request``'s."""
        raise NotImplementedError

    def body(self, data: bytes) -> None:
        """More of the request's body, as it came."""
        raise NotImplementedError

    def end(self, trailers: http1.Headers | None) -> None:
        """The request's body is whole (with ``trailers``, if any)."""
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        """A tunnel's bytes, after a 101 (HTTP/1.1 only)."""
        raise NotImplementedError

    def pause_reading(self, paused: bool) -> None:
        """Hold the response (the client is not taking it), or go on."""
        raise NotImplementedError

    def close(self) -> None:
        """Give the request up; never reused."""
        raise NotImplementedError

    def stale(self) -> bool:
        """The request failed before a byte of its response for a reason that says nothing
        of the endpoint (a pooled connection gone stale): it may go again, on a fresh one."""
        raise NotImplementedError

    def alive(self) -> bool:
        raise NotImplementedError

    def tunnel_to(self, write: Callable[[bytes], None]) -> None:
        """After a 101: every byte from the upstream goes to ``write`` unparsed."""
        raise NotImplementedError


class _TooLarge(Exception):
    """The upstream's head or trailers are over the limits."""


class _WholeHeads:
    """The callbacks of the parser for responses whose head came whole (``wholehead``): the
    connection's own methods, without a header callback, so that llhttp checks the head
    without a call into Python for each of its lines."""

    __slots__ = ("on_body", "on_headers_complete", "on_message_begin", "on_message_complete")

    def __init__(self, conn: UpstreamConnection) -> None:
        self.on_message_begin = conn.on_second_message
        self.on_headers_complete = conn._deliver
        self.on_body = conn.on_whole_body
        self.on_message_complete = conn.on_message_complete


class UpstreamConnection(Carrier):
    """One connection to an upstream endpoint, parsing responses.

    A response is handed over complete only once the read it ended in has been parsed, so
    that bytes after it (a broken upstream) can never reach the next request: a connection
    that sent more than one response's worth is closed, not reused. Heads and trailers are
    held to the client-side limits (64 KiB, 100 headers).

    Two parsers take turns, a response each: one with a callback per header line, and one
    without, for a response whose head came whole at the start of a read and was classified
    from its bytes (``wholehead``). Each parses whole messages only, so either may take the
    next one.
    """

    __slots__ = (
        "_chunked",
        "_client",
        "_done",
        "_fresh",
        "_head",
        "_http11",
        "_in_body",
        "_lines",
        "_parser",
        "_raw",
        "_reader",
        "_reason",
        "_sized",
        "_spare",
        "_status",
        "_whole",
        "idle_since",
        "requests",
        "transport",
    )

    def __init__(self, pool: Home) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.owner: ResponseSink | None = None
        self._client: Corkable | None = None  # whose request is in flight (its writes corked)
        self._chunked = False  # the request in flight has a chunked body
        self._lines = httptools.HttpResponseParser(self)
        self._whole = httptools.HttpResponseParser(_WholeHeads(self))
        self._parser = self._lines  # the current response's
        self._reader = HeadReader()  # the head being read, and the limits of heads, trailers
        self._in_body = False
        self._done = False  # the response is complete; handed over after this read
        self._sized = False  # the current response has a length or chunks (not read-until-close)
        self._status = 0
        self._reason = b""
        self._head: http1.ResponseHead | None = None  # the head being read, from its status line
        # the head of each response read whole, made once: its owner is done with it when its
        # ``response_head`` returns (a head read line by line is made for its response)
        self._spare = http1.ResponseHead(0, b"")
        self._fresh = b""  # a read that began with the current response's first byte
        self._http11 = False  # the response's status line said HTTP/1.1 (False: not known)
        self._raw: Callable[[bytes], None] | None = None  # after an upgrade: bytes go here
        self.received = False  # any byte of the current response
        self.reusable = True
        self.requests = 0  # requests sent on this connection, the current one included
        self.idle_since = 0.0  # loop time it went back to the pool

    def __repr__(self) -> str:
        e = self.pool.endpoint
        state = "busy" if self.owner else "idle"
        return f"<UpstreamConnection {e.address}:{e.port} {state}, {self.requests} requests>"

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._raw is not None:
            self._raw(data)
            return
        client = self._client
        # (a local, not ``self.owner is None``: mypy would keep that narrowing past the parser's
        # callbacks, which may clear it, and compiled, reading it then is a checked cast)
        owner = self.owner
        if owner is None or client is None:  # bytes nobody asked for: not sane
            self.close()
            return
        reader = self._reader
        if self.received:
            self._fresh = b""
        else:  # the response's first read
            self.received = True
            if whole_response_head(data, self._spare):
                # (its head is read: the reader has nothing to count)
                self._head, self._parser, reader.in_head = self._spare, self._whole, False
            else:
                self._head, self._parser, self._fresh = None, self._lines, data
        reader.read = n = len(data)
        client.cork()
        try:
            self._parser.feed_data(data)
            if (reader.in_head or reader.trailer_watch) and not reader.read_ended(n):
                raise _TooLarge
        except httptools.HttpParserUpgrade as upgrade:
            self.reusable = False
            if self.owner is not None and not self._done:
                self.owner.response_upgraded(data[upgrade.args[0] :])
        except (httptools.HttpParserError, _TooLarge):
            self.reusable = False
            if not self._done:  # garbage after a complete response only spoils the connection
                failed, self.owner = self.owner, None
                self.close()
                if failed is not None:
                    failed.upstream_failed(None, protocol_error=True)
        finally:
            if self._done:
                self._done = False
                done, self.owner = self.owner, None
                if done is not None:
                    done.response_complete()
            client.uncork()
            if self.owner is None:  # (an idle connection holds on to no client)
                self._client = None

    def eof_received(self) -> bool | None:
        if self.owner is not None and self._in_body:
            with contextlib.suppress(httptools.HttpParserError):
                self._parser.feed_data(b"")  # ends a read-until-close body
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        self.pool.discard(self)
        owner, self.owner = self.owner, None
        if owner is not None:
            if self._in_body and not self._sized and exc is None:
                owner.response_complete()  # read-until-close: a clean close is the end
            else:
                owner.upstream_failed(exc, protocol_error=False)

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_paused(True)

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.upstream_paused(False)

    # -- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._done:  # a second response to one request: the connection is not sane
            self.reusable = False
            return
        self._reader.message_begin()
        self._reason = b""
        self._head = None
        self._in_body = False
        # its version, seen in the read whose first byte is its first (else asked of the
        # parser, whose get_http_version formats a string: 3 % of the work of a request)
        fresh, self._fresh = self._fresh, b""
        self._http11 = fresh.startswith(b"HTTP/1.1 ")

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_body:  # a line of the head: read as it comes
            (self._head or self._begin_head()).add(name, value)
            return
        if self._reader.trailer(name, value):
            raise _TooLarge
        if self.owner is not None and not self._done:
            self.owner.response_trailer(name, value)

    def _begin_head(self) -> http1.ResponseHead:
        """The status line is whole (a header line came, or the head's end): its head."""
        self._head = http1.ResponseHead(self._parser.get_status_code(), self._reason)
        return self._head

    def on_headers_complete(self) -> None:
        parser = self._parser
        resp = self._head or self._begin_head()
        self._head = None
        self._status = resp.status
        if self.owner is None or self._done:
            return
        if self._reader.head_complete(resp.lines, resp.unlisted, resp.unlisted_bytes):
            raise _TooLarge
        resp.complete()
        if not (self._http11 or parser.get_http_version() == "1.1"):
            self.reusable = False
        self._head = resp
        self._deliver()

    def _deliver(self) -> None:
        """The head (``_head``) is read and within the limits: to the owner. (A head read
        whole, ``_WholeHeads``, comes straight here from the parser.)"""
        resp, self._head = self._head, None
        owner = self.owner
        if resp is None or owner is None or self._done:
            return  # (a second response in the read)
        self._status = resp.status
        if resp.close:
            self.reusable = False
        self._in_body = resp.status >= 200
        # (the answer to a HEAD request has its end marked too: ``response_head`` says so)
        self._sized = resp.framing is not framing.UNTIL_CLOSE
        if owner.response_head(resp):
            # The response to a HEAD request: its Content-Length describes a body that will not
            # come, and httptools cannot be told so. Finish here and do not reuse the connection.
            self._in_body = False
            self.reusable = False
            self.owner = None
            owner.response_complete()
            self.close()

    def on_chunk_header(self) -> None:
        self._reader.chunk_header()

    def on_chunk_complete(self) -> None:
        self._reader.chunk_complete()

    def on_body(self, data: bytes) -> None:
        self._reader.body()
        if self.owner is not None and data and not self._done:
            self.owner.response_body(data)

    def on_message_complete(self) -> None:
        if self._done:
            return
        if self._status < 200:  # an interim response (100 Continue): the real one follows
            self._reader.expect_head()
            return
        self._in_body = False
        self._done = True

    # -- httptools callbacks for a head read whole (``_WholeHeads``) ----------------------

    def on_second_message(self) -> None:
        """A message begins: the first of the read was classified before it was parsed; one
        after a complete response is not sane."""
        if self._done:
            self.reusable = False

    def on_whole_body(self, data: bytes) -> None:
        """(``on_body`` without the reader's bookkeeping: such a body has no chunks)"""
        if self.owner is not None and data and not self._done:
            self.owner.response_body(data)

    # -- use by exchanges and the pool ----------------------------------------------------

    def stale(self) -> bool:
        """A reused connection the upstream closed before a byte of this response: it had
        gone stale in the pool; the request may go again on a fresh one."""
        return self.requests > 1 and not self.received

    def alive(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def send(self, owner: ResponseSink, request: Outgoing, client: Corkable) -> None:
        """Start a request: ``owner`` gets the response, which goes to ``client``; its head
        and the body so far go in one write."""
        self.owner = owner
        self._client = client
        self.received = False
        self._reader.expect_head()
        self.requests += 1
        head = request.head
        self._chunked = chunked = head.chunked
        data = http1.upstream_request(
            head,
            request.client_ip,
            request.attempt_sent,
            request.deadline_sent,
            request.grpc_sent,
            self.pool.head_ends,
        )
        body = request.out
        if body is not None:  # (most requests have none)
            pieces = body.take()
            ended = chunked and body.ended
            if pieces is not None or ended:
                out = [data]
                out += [http1.chunk(piece) for piece in pieces or ()] if chunked else pieces or ()
                if ended:
                    out.append(http1.last_chunk(body.trailers or []))
                data = b"".join(out)
        assert self.transport is not None
        self.transport.write(data)

    def body(self, data: bytes) -> None:
        """(Chunked again if it came so: its framing is the client's.)"""
        self.write(http1.chunk(data) if self._chunked else data)

    def end(self, trailers: http1.Headers | None) -> None:
        """(A chunked body's last chunk, with its trailers; a sized body ended with its last
        byte, and has none.)"""
        if self._chunked:
            self.write(http1.last_chunk(trailers or []))

    def tunnel_to(self, write: Callable[[bytes], None]) -> None:
        """After a 101: every byte from the upstream goes to ``write`` unparsed."""
        self._raw = write

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def pause_reading(self, paused: bool) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if paused:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def close(self) -> None:
        self.owner = None
        self._client = None
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()
