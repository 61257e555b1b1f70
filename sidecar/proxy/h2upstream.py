"""Upstream HTTP/2 (h2c by prior knowledge, or h2 over mesh TLS as the pool dials it): a
connection (``H2Upstream``) multiplexes requests, each on a stream that is the try's
``Carrier`` (``H2Channel``); ``H2Links`` keeps an endpoint's connections for its ``pool.Pool``.

A channel takes the request's head as HTTP/2 fields (``http2.upstream_headers``: every rewrite an
HTTP/1.1 upstream's head gets), then its body as it came, into HEADERS, DATA and trailers:
the exchange, its retries, timeouts, hedging and records are the same for either protocol.
The response goes to the exchange through the same ``ResponseSink`` an HTTP/1.1 connection
calls. Each way has HTTP/2 flow control: the request body goes as far as the server's
windows allow and the client is paused past ``OUT_LIMIT`` bytes waiting; the response's
window is given back only while the exchange reads (``pause_reading``).

A connection takes channels while its streams (counted from when a channel is handed out,
not when its HEADERS go) are fewer than the server's ``MAX_CONCURRENT_STREAMS``; a GOAWAY or
a broken connection takes no more. A stream the server refused (REFUSED_STREAM, or above a
GOAWAY's last stream) before answering is ``stale``: the dispatch sends it again.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final, cast

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings

from sidecar.http import grpc, hpackcodec, http1, http2
from sidecar.proxy.h2flow import give_back, send_pieces
from sidecar.proxy.upstream import Carrier, Corkable, Home, Outgoing, ResponseSink

#: request body bytes a channel holds for a server whose window is spent, before the client
#: is paused
OUT_LIMIT: Final = 64 * 1024
#: response bytes the whole connection may have in flight to the sidecar (each stream: 64 KiB)
CONNECTION_WINDOW: Final = 1024 * 1024
_DEFAULT_WINDOW: Final = 65_535


class H2Upstream(asyncio.Protocol):
    """One h2c connection to an endpoint: its codec and its channels by stream id."""

    __slots__ = (
        "_channels",
        "_idle",
        "_idle_since",
        "_max_streams",
        "_owed",
        "_reading",
        "closed",
        "goaway",
        "h2",
        "links",
        "settled",
        "taken",
        "transport",
    )

    def __init__(self, links: H2Links) -> None:
        self.links = links
        #: closes it after ``links.idle_timeout`` without a stream (lazily: ``_on_idle``)
        self._idle: asyncio.TimerHandle | None = None
        self._idle_since = 0.0  # loop time its last channel was done with
        self.h2 = H2Connection(client_config())
        hpackcodec.install(self.h2)  # the compiled HPACK codec, not hpack's
        self.h2.local_settings = Settings(
            client=True,
            initial_values={
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.MAX_HEADER_LIST_SIZE: http1.MAX_HEAD_BYTES,
            },
        )
        self._channels: dict[int, H2Channel] = {}
        #: the server's SETTINGS_MAX_CONCURRENT_STREAMS, kept as each SETTINGS changes it
        #: (the codec's ``remote_settings`` answers through three Python calls)
        self._max_streams = self.h2.remote_settings.max_concurrent_streams
        self._owed = 0  # bytes of window owed to the server's connection (``owe``)
        self._reading = False  # in ``data_received``: what the codec has goes out at its end
        self.taken = 0  # channels handed out and not yet done with
        self.goaway = False  # no new stream may start here
        self.closed = False
        self.transport: asyncio.Transport | None = None
        #: the server's first SETTINGS came (its stream limit is known), or the connection went
        self.settled: asyncio.Future[None] = links.loop.create_future()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "goaway" if self.goaway else "open"
        return f"<H2Upstream {state}, {self.taken} streams taken>"

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - _DEFAULT_WINDOW)
        self.flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except ProtocolError:
            self.flush()  # (the codec's GOAWAY)
            self.abort()
            return
        self._reading = True
        # each client a response of this read goes to is corked meanwhile: its head, body
        # and trailers go out in one send (its codec's bytes taken once), not one each
        corked: list[Corkable] = []
        malformed = False
        try:
            for event in events:
                self._on_event(event, corked)
        except http2.Malformed:  # (the codec's own check, turned off: ``client_config``)
            malformed = True
        finally:
            self._reading = False
            for client in corked:
                client.uncork()
        if malformed:  # refused as the codec refuses a connection error
            self.h2.close_connection(ErrorCodes.PROTOCOL_ERROR)
            self.flush()
            self.abort()
            return
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = self.goaway = True
        self._settle()
        self._stop_idle()
        self.links.forget(self)
        channels = list(self._channels.values())
        self._channels.clear()
        for channel in channels:
            channel.lost(exc, refused=False)

    def pause_writing(self) -> None:
        for channel in self._channels.values():
            channel.socket_paused(True)

    def resume_writing(self) -> None:
        for channel in list(self._channels.values()):
            channel.socket_paused(False)

    def _on_event(self, event: Event, corked: list[Corkable]) -> None:
        """(The events of a response first, in the order they come: fewer checks each.)"""
        if isinstance(event, DataReceived):
            channel = self._channel(event.stream_id, corked)
            if channel is not None:
                channel.data(
                    event.data, event.flow_controlled_length, event.stream_ended is not None
                )
            elif event.flow_controlled_length:  # (a stream given up)
                self.owe(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, ResponseReceived):
            channel = self._channel(event.stream_id, corked)
            if channel is not None:
                channel.response(event.headers, event.stream_ended is not None)
        elif isinstance(event, StreamEnded):
            channel = self._channel(event.stream_id, corked)
            if channel is not None:
                channel.ended()
        elif isinstance(event, TrailersReceived):
            channel = self._channel(event.stream_id, corked)
            if channel is not None:
                http2.check_trailers(event.headers)
                channel.trailers(event.headers)
        elif isinstance(event, WindowUpdated):
            stream_id = event.stream_id
            if stream_id:
                channel = self._channels.get(stream_id)
                if channel is not None:
                    channel.push()
            else:
                for each in list(self._channels.values()):
                    each.push()
        elif isinstance(event, StreamReset):
            channel = self._channel(event.stream_id, corked)
            if channel is not None:
                self._channels.pop(event.stream_id, None)
                channel.lost(None, refused=event.error_code == ErrorCodes.REFUSED_STREAM)
        elif isinstance(event, RemoteSettingsChanged):
            self._max_streams = self.h2.remote_settings.max_concurrent_streams
            self._settle()
        elif isinstance(event, ConnectionTerminated):
            self._went_away(event.last_stream_id)

    def _channel(self, stream_id: int, corked: list[Corkable]) -> H2Channel | None:
        """The channel of a stream an event is for (None: given up), its client corked till
        the end of the read."""
        channel = self._channels.get(stream_id)
        if channel is not None:
            client = channel.client
            if client is not None and client not in corked:
                client.cork()
                corked.append(client)
        return channel

    def _settle(self) -> None:
        if not self.settled.done():
            self.settled.set_result(None)

    def _went_away(self, last_stream_id: int | None) -> None:
        """GOAWAY: streams above ``last_stream_id`` were never seen (they may go again);
        those below finish."""
        self.goaway = True
        self.links.forget(self)
        last = last_stream_id or 0
        for stream_id in [s for s in self._channels if s > last]:
            self._channels.pop(stream_id).lost(None, refused=True)
        if not self.taken:
            self.abort()

    # -- for channels and links -----------------------------------------------------------

    def has_room(self) -> bool:
        """A new stream may start here now."""
        if self.goaway or self.transport is None or self.transport.is_closing():
            return False
        return self.taken < self._max_streams

    def take(self) -> H2Channel:
        self.taken += 1  # (an idle timer armed finds it busy when it wakes, and lets it be)
        return H2Channel(self)

    def open_stream(self, channel: H2Channel, headers: http1.Headers, end: bool) -> int:
        """Start the channel's stream with its request head: its id."""
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, headers, end_stream=end)
        self._channels[stream_id] = channel
        return stream_id

    def owe(self, n: int, stream_id: int) -> None:
        """Window the server gets back, in batches (``h2flow.give_back``): DATA of a stream
        it ended (or of one given up) takes the connection's window only."""
        self._owed = give_back(self.h2, self._owed, n, stream_id)
        if not self._owed:
            self.flush()

    def done(self, stream_id: int, reset: bool) -> None:
        """A channel is over (``reset``: its stream is cancelled, if still open)."""
        self.taken -= 1
        if stream_id and self._channels.pop(stream_id, None) is not None and reset:
            stream = self.h2.streams.get(stream_id)
            if stream is not None and not stream.closed:
                self.h2.reset_stream(stream_id, ErrorCodes.CANCEL)
                self.flush()
        if self.goaway and not self.taken:
            self.abort()
        elif not self.taken:
            # (a timer armed already stays: it looks again when it wakes, so a request
            # does not arm and cancel one each)
            loop = self.links.loop
            self._idle_since = loop.time()
            if self._idle is None:
                self._idle = loop.call_later(self.links.idle_timeout, self._on_idle)

    def _on_idle(self) -> None:
        self._idle = None
        if self.taken or self.closed or self.goaway:
            return  # (busy: its last channel done with arms it again)
        left = self._idle_since + self.links.idle_timeout - self.links.loop.time()
        if left > 0:
            self._idle = self.links.loop.call_later(left, self._on_idle)
        else:
            self._idled()

    def _idled(self) -> None:
        """No stream for ``idle_timeout``: it goes (a GOAWAY first, as the server expects)."""
        self.links.forget(self)
        self.goaway = True
        self.h2.close_connection()
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def _stop_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def alive(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def flush(self) -> None:
        """Write what the codec has to send (once a read, while one is handled)."""
        if self._reading:
            return
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def abort(self) -> None:
        self.goaway = True
        if self.transport is not None:
            self.transport.abort()


class H2Channel(Carrier):
    """One request on an ``H2Upstream``: the ``Carrier`` of its try."""

    __slots__ = (
        "_body",
        "_body_size",
        "_conn",
        "_ended",
        "_fin_sent",
        "_held_acks",
        "_paused",
        "_refused",
        "_trailers",
        "_write_paused",
        "client",
        "stream_id",
    )

    def __init__(self, conn: H2Upstream) -> None:
        self._conn: H2Upstream | None = conn  # None once done with
        self.pool = conn.links.home
        self.owner = None
        self.received = False
        self.reusable = True
        self.stream_id = 0  # once its HEADERS went
        self.client: Corkable | None = None  # the response's (corked during a read)
        self._trailers: http1.Headers = []
        self._fin_sent = False  # END_STREAM went (with the HEADERS, the last DATA or trailers)
        self._ended = False  # the request's body is whole
        self._body: deque[bytes] = deque()  # request body the server's window did not take
        self._body_size = 0
        self._write_paused = False  # the client is paused for ``_body``
        self._paused = False  # the exchange holds the response (``pause_reading``)
        self._held_acks = 0  # response bytes not given back as window while paused
        self._refused = False

    def __repr__(self) -> str:
        return f"<H2Channel stream {self.stream_id} [{self._body_size} bytes waiting]>"

    # -- the request (``Carrier``) --------------------------------------------------------

    def send(self, owner: ResponseSink, request: Outgoing, client: Corkable) -> None:
        """Start the stream: its HEADERS, then what came of the body (and its end)."""
        self.owner = owner
        self.client = client
        conn = self._conn
        if conn is None or conn.goaway:  # it went away since this channel was taken
            self._refused = True  # (the server never saw it: it may go again)
            self._fail(None)
            return
        body = request.out
        if body is not None:
            for piece in body.take() or ():
                self._body.append(piece)
                self._body_size += len(piece)
        if body is None or body.ended:
            self._end(None if body is None else body.trailers)
        try:
            end = self._ended and not self._body and not self._trailers
            self._fin_sent = end
            fields = http2.upstream_headers(
                request.head,
                request.client_ip,
                request.attempt_sent,
                request.deadline_sent,
                request.grpc_sent,
            )
            self.stream_id = conn.open_stream(self, fields, end)
        except ProtocolError:  # (the codec refused the head)
            self._fail(None)
            return
        self.push()

    def body(self, data: bytes) -> None:
        if self._conn is not None and data:
            self._body.append(data)
            self._body_size += len(data)
            self.push()

    def end(self, trailers: http1.Headers | None) -> None:
        if self._conn is not None:
            self._end(trailers)
            self.push()

    def _end(self, trailers: http1.Headers | None) -> None:
        self._ended = True
        for name, value in trailers or ():
            http2.upstream_trailer(self._trailers, name, value)

    def write(self, data: bytes) -> None:
        raise AssertionError("no tunnel over HTTP/2")

    def push(self) -> None:
        """Send what the server's windows take of the waiting body; end the stream after
        the last of it (with the trailers, if any)."""
        conn = self._conn
        if conn is None or not self.stream_id:
            return
        h2, stream_id, body = conn.h2, self.stream_id, self._body
        try:
            sent, fin = send_pieces(h2, stream_id, body, self._ended and not self._trailers)
            self._body_size -= sent
            self._fin_sent = self._fin_sent or fin
            if not body and self._ended and not self._fin_sent:
                self._fin_sent = True
                if self._trailers:
                    h2.send_headers(stream_id, self._trailers, end_stream=True)
                else:
                    h2.end_stream(stream_id)
        except (ProtocolError, StreamClosedError, KeyError):
            pass  # (the stream is over: the server answered without the rest)
        conn.flush()
        self._pace_client()

    def _pace_client(self) -> None:
        """Pause the client while more than ``OUT_LIMIT`` bytes wait for window."""
        paused = self._body_size > OUT_LIMIT
        if paused != self._write_paused and self.owner is not None:
            self._write_paused = paused
            self.owner.upstream_paused(paused)

    def socket_paused(self, paused: bool) -> None:
        if self.owner is not None:
            self.owner.upstream_paused(paused or self._body_size > OUT_LIMIT)

    # -- the response, from the connection ------------------------------------------------

    def response(self, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        """The response's head (``ended``: and its end). A gRPC trailers-only response (its
        ``grpc-status`` in a head that ends the stream) goes on as a head and trailers: a
        proxy's answer ends with its body or trailers, never with its head; the head
        carries its ``grpc_status``, to classify the call by before it is answered."""
        resp: http2.H2ResponseHead | None = None
        trailers: http1.Headers = []
        grpc_only = ended and any(name == b"grpc-status" for name, _ in headers)
        for name, value in headers:
            if resp is None:  # (RFC 9113 8.3.2: :status, once, and first)
                if name != b":status" or not value.isdigit():
                    raise http2.Malformed("no :status first")
                resp = http2.H2ResponseHead(int(value))
                continue
            if name[:1] == b":":
                raise http2.Malformed(f"pseudo-header {name[:64]!r} in a response")
            http2.check_field(name, value)
            if grpc_only and name.startswith(b"grpc-"):
                trailers.append((name, value))
                if name == b"grpc-status":  # (the exchange classifies the call by it now)
                    resp.grpc_status = grpc.parse_status(value)
            else:
                resp.forward(name, value)
        if resp is None:
            raise http2.Malformed("no :status")
        if resp.status < 200:  # (interim responses are not passed on)
            return
        self.received = True
        if not resp.sized and resp.status not in (204, 304):
            resp.chunked = True  # its end is the stream's: an HTTP/1.1 client gets chunks
        resp.complete()
        owner = self.owner
        if owner is not None and owner.response_head(resp):  # the answer to a HEAD request
            self.owner = None
            owner.response_complete()
            return
        self.trailers(trailers)

    def data(self, data: bytes, flow_controlled: int, last: bool) -> None:
        """A piece of the response body (``last``: its frame ended the stream, whose own
        window is then no matter: the connection's comes back with others')."""
        if self._paused:
            self._held_acks += flow_controlled
        elif last:
            conn = self._conn
            if conn is not None:
                conn.owe(flow_controlled, self.stream_id)
        else:
            self._give_back(flow_controlled)
        if self.owner is not None and data:
            self.owner.response_body(data)

    def trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        if self.owner is not None:
            for name, value in headers:
                self.owner.response_trailer(name, value)

    def ended(self) -> None:
        owner, self.owner = self.owner, None
        if owner is not None:
            owner.response_complete()

    def lost(self, exc: BaseException | None, refused: bool) -> None:
        """The stream was reset, or the connection went: the try failed."""
        self._refused = refused and not self.received
        self.stream_id = 0  # (the connection forgot it)
        self._fail(exc)

    def _fail(self, exc: BaseException | None) -> None:
        self.reusable = False
        owner, self.owner = self.owner, None
        if owner is not None:
            owner.upstream_failed(exc, protocol_error=False)

    def _give_back(self, n: int) -> None:
        conn = self._conn
        if conn is None or not n or not self.stream_id:
            return
        conn.h2.acknowledge_received_data(n, self.stream_id)
        conn.flush()

    # -- use by exchanges and the pool (``Carrier``) --------------------------------------

    def pause_reading(self, paused: bool) -> None:
        self._paused = paused
        if not paused and self._held_acks:
            held, self._held_acks = self._held_acks, 0
            self._give_back(held)

    def stale(self) -> bool:
        return self._refused

    def alive(self) -> bool:
        return self._conn is not None and self._conn.alive()

    def tunnel_to(self, write: Callable[[bytes], None]) -> None:
        raise AssertionError("an HTTP/2 upstream never answers 101")

    def finish(self) -> None:
        """Done with (a complete response, or given up): the stream is cancelled if the
        request or response is still under way, and the connection counts a stream fewer."""
        conn, self._conn = self._conn, None
        self.owner = self.client = None
        self._body.clear()
        if conn is not None:
            conn.done(self.stream_id, reset=True)

    def close(self) -> None:
        self.reusable = False
        self.finish()


def client_config() -> H2Configuration:
    """The codec's: what goes out is made ready by ``http2`` (``upstream_headers``: names
    lower-cased, values stripped, connection-specific fields and ``te`` dropped, secrets
    never indexed), not by the codec again; a response's fields are validated by
    ``H2Channel`` (RFC 9113 8.2, 8.3.2: ``http2.Malformed``; no CR, LF or NUL reaches the
    HTTP/1-shaped head they become), and not normalised (which joins ``cookie`` fields: a
    request's, not a response's)."""
    return H2Configuration(
        client_side=True,
        header_encoding=None,
        validate_inbound_headers=False,
        normalize_inbound_headers=False,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )


#: how a pool connects a new HTTP/2 connection to its endpoint: the protocol is told of its
#: transport (the socket's, or a mesh TLS session's) before the dial returns
Dial = Callable[["H2Upstream"], Awaitable[None]]


class H2Links:
    """An endpoint's HTTP/2 connections, for its pool (``home``), which says how a connection
    is made (``dial``: h2c to the endpoint unless it says otherwise)."""

    __slots__ = ("_conns", "_opening", "dial", "home", "idle_timeout", "loop")

    def __init__(
        self,
        home: Home,
        idle_timeout: float,
        loop: asyncio.AbstractEventLoop,
        dial: Dial | None = None,
    ) -> None:
        self.home = home
        #: seconds a connection without streams stays open
        self.idle_timeout = idle_timeout
        self.loop = loop
        self.dial: Dial = dial if dial is not None else self._dial_h2c
        self._conns: list[H2Upstream] = []
        self._opening: asyncio.Future[H2Upstream | None] | None = None  # a connect under way

    def __repr__(self) -> str:
        return f"<H2Links {len(self._conns)} connections>"

    def take(self) -> H2Channel | None:
        """A channel on a connection with a stream free, or None."""
        for conn in self._conns:
            if conn.has_room():
                return conn.take()
        return None

    async def connect(self) -> H2Channel:
        """A channel on a new connection (the caller bounds the time). While one is opening,
        the next tries wait for it and share it if it has room: a burst of requests to a new
        endpoint opens one connection, not one each."""
        while (opening := self._opening) is not None:
            await asyncio.shield(opening)
            channel = self.take()  # (the one opened, or one a stream of which was freed)
            if channel is not None:
                return channel
        return (await self._open()).take()

    async def _open(self) -> H2Upstream:
        """A new connection, once the server's SETTINGS say how many streams it takes."""
        opened: asyncio.Future[H2Upstream | None] = self.loop.create_future()
        self._opening = opened
        conn = H2Upstream(self)
        try:
            await self.dial(conn)
            await conn.settled
            if not conn.alive():
                raise ConnectionError("the upstream closed the HTTP/2 connection at once")
        except BaseException:
            conn.abort()
            opened.set_result(None)  # (those waiting open their own)
            raise
        finally:
            if self._opening is opened:
                self._opening = None
        self._conns.append(conn)
        opened.set_result(conn)
        return conn

    async def _dial_h2c(self, conn: H2Upstream) -> None:
        endpoint = self.home.endpoint
        await self.loop.create_connection(lambda: conn, endpoint.address, endpoint.port)

    def forget(self, conn: H2Upstream) -> None:
        """A connection that takes no more streams."""
        if conn in self._conns:
            self._conns.remove(conn)

    def size(self) -> int:
        """Connections open or opening."""
        return len(self._conns) + (self._opening is not None)

    def close(self) -> None:
        """Idle connections close now; busy ones after their last stream."""
        for conn in list(self._conns):
            conn.goaway = True
            if not conn.taken:
                conn.abort()
        self._conns.clear()
