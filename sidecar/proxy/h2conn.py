"""An HTTP/2 client connection (h2c by prior knowledge, or h2 over mesh TLS chosen by ALPN):
the ``h2`` codec between the socket (or the TLS layer) and one ``H2Stream`` per request, each
running its ``Exchange`` as an HTTP/1.1 request does.

The listener's ``Downstream`` hands a connection over when its first read is the HTTP/2
preface, or when its mesh TLS session negotiated ``h2`` (``Downstream._start_h2``); it stays
the connection's ``origin``: the route (and its guard), the verified caller, the listener's
counts and limits, the metrics and the access log are its. Upstreams are called as the
route's ``protocol`` says, through the same pools.

What a client may ask of the connection is watched before the codec reads it
(``h2guard.FrameWatch``); a connection that breaks a limit gets a GOAWAY and is closed, and
the refusal is counted (``meshlet_h2_refused_total``). A client that does not read is not
read from either: its socket full, every stream's upstream is paused and reading stops.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from typing import Final, Protocol, cast

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import DenialOfServiceError, ProtocolError, TooManyStreamsError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from sidecar.http import hpackcodec, http2
from sidecar.proxy.client import Client
from sidecar.proxy.exchange import Exchange
from sidecar.proxy.h2flow import give_back
from sidecar.proxy.h2guard import ENHANCE_YOUR_CALM, FrameWatch, H2Limits
from sidecar.proxy.h2stream import H2Stream
from sidecar.proxy.tracker import ConnectionTracker, Tracked

log = logging.getLogger("meshlet.proxy")

#: bytes of request body one stream may have in flight to the sidecar (its initial window)
STREAM_WINDOW: Final = 256 * 1024
#: bytes of request body the whole connection may have in flight to the sidecar
CONNECTION_WINDOW: Final = 1024 * 1024
_DEFAULT_WINDOW: Final = 65_535
#: seconds a refused connection keeps dropping what the client still sends, so that it reads
#: the GOAWAY before the close (a close with unread bytes would reset the connection)
LINGER: Final = 2.0
#: the shortest wait between two looks of the streams' timer, in seconds
_MIN_WAKE: Final = 0.01


class Origin(Client, Tracked, Protocol):
    """The listener's connection that handed this one over (``listener.Downstream``)."""

    tracker: ConnectionTracker
    peer_line: bytes
    """the ``x-meshlet-peer`` line every request gets (inbound mesh TLS; b"": none)"""


class H2Downstream(asyncio.Protocol):
    """One HTTP/2 client connection: its codec, its streams, its limits."""

    __slots__ = (
        "_closing",
        "_corked",
        "_dead",
        "_idle",
        "_idle_since",
        "_idle_timer",
        "_owed",
        "_streams",
        "_timer",
        "_timer_at",
        "_watch",
        "counters",
        "h2",
        "loop",
        "min_rate",
        "origin",
        "transport",
        "write_paused",
    )

    def __init__(
        self, origin: Origin, loop: asyncio.AbstractEventLoop, idle: float, limits: H2Limits
    ) -> None:
        self.origin = origin
        self.counters = origin.tracker.counters
        self.min_rate = origin.tracker.limits.min_rate
        self.loop = loop
        self._idle = idle  # seconds the connection may sit with no stream open
        self.h2 = H2Connection(server_config())
        hpackcodec.install(self.h2)  # the compiled HPACK codec, not hpack's
        self.h2.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_streams,
                SettingCodes.MAX_HEADER_LIST_SIZE: limits.header_list_bytes,
                SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            },
        )
        self.h2.decoder.max_header_list_size = limits.header_list_bytes
        self._watch = FrameWatch(limits)
        self._streams: dict[int, H2Stream] = {}
        self.transport: asyncio.Transport | None = None
        self.write_paused = False
        self._corked = 0
        self._closing = False  # a GOAWAY went: no new streams, close once the last is over
        self._dead = False  # refused: what the client still sends is dropped
        #: wakes ``_idle`` seconds after the last stream ended (lazily: ``_on_idle``), or
        #: closes a refused connection after its ``LINGER``
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0  # loop time the last stream ended (< 0: one is open)
        self._owed = 0  # bytes of window owed to the client's connection (``owe``)
        #: wakes by the nearest ``wake_at`` of the streams, at ``_timer_at`` (``wake_by``)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def __repr__(self) -> str:
        state = "closing" if self._closing else "open"
        return (
            f"<H2Downstream {self.origin.client_ip.decode()} {state}, {len(self._streams)} streams>"
        )

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.origin.tracker.h2.connections += 1
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - _DEFAULT_WINDOW)
        self.flush()
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self._dead or self.transport is None or self.transport.is_closing():
            return
        refused = self._watch.feed(data, self.loop.time())
        if refused is not None:
            self._refuse(refused, ENHANCE_YOUR_CALM)
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as e:  # (the codec has its GOAWAY ready)
            self._refused(_reason_of(e), str(e))
            return
        self.cork()
        started: list[tuple[H2Stream, Exchange]] = []
        try:
            for event in events:
                self._on_event(event, started)
        except http2.Malformed as e:  # (the codec's own check, turned off: ``server_config``)
            self.uncork()
            self._refuse("protocol", ErrorCodes.PROTOCOL_ERROR, str(e))
            return
        for stream, ex in started:  # once the read is read, as for HTTP/1 (a body may be in it)
            stream.start(ex)
        self.uncork()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._cancel_idle()
        self._cancel_timer()
        streams = list(self._streams.values())
        self._streams.clear()
        for stream in streams:
            stream.close()
        self.origin.tracker.discard(self.origin)

    def pause_writing(self) -> None:
        """The client is not reading: pause every stream's upstream, and stop reading."""
        self._socket_paused(True)

    def resume_writing(self) -> None:
        self._socket_paused(False)

    # -- what streams ask of it (``h2stream.Wire``) ---------------------------------------

    def flush(self) -> None:
        if self._corked:
            return
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def owe(self, n: int, stream_id: int) -> None:
        """Window the client gets back, in batches (``h2flow.give_back``): DATA of a stream
        it ended (or of one gone) takes the connection's window only."""
        self._owed = give_back(self.h2, self._owed, n, stream_id)

    def cork(self) -> None:
        self._corked += 1

    def uncork(self) -> None:
        self._corked -= 1
        self.flush()

    def stream_over(self, stream: H2Stream) -> None:
        if self._streams.pop(stream.stream_id, None) is None:
            return
        stream.close()
        if self._streams:
            return
        if self._closing:
            self._close()
        else:
            self._arm_idle()

    def wake_by(self, at: float) -> None:
        """One timer for every stream's deadlines and pace, lazy as ``watch.Watch``'s: armed
        only when a stream needs a look sooner than it wakes, so a stream a request asks
        nothing of it but the first."""
        timer = self._timer
        if timer is not None:
            if self._timer_at <= at:
                return
            timer.cancel()
        self._timer = self.loop.call_at(at, self._on_timer)
        self._timer_at = at

    def _on_timer(self) -> None:
        """Each stream whose ``wake_at`` passed gets its ``look``; then the timer wakes by
        the nearest one left (no sooner than ``_MIN_WAKE`` from now)."""
        self._timer = None
        now = self.loop.time()
        for stream in list(self._streams.values()):
            if stream.wake_at <= now:
                stream.look(now)
        at = math.inf
        for stream in self._streams.values():
            if stream.wake_at < at:
                at = stream.wake_at
        if at < math.inf:
            self.wake_by(at if at > now + _MIN_WAKE else now + _MIN_WAKE)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- the listener's asks ---------------------------------------------------------------

    def drain(self) -> None:
        """Say GOAWAY: the streams open go on, no new one is taken; close after the last.
        (Written here, not by the codec: its ``close_connection`` ends every stream.)"""
        if self._closing:
            return
        self._closing = True
        self.flush()
        goaway = GoAwayFrame(0)
        goaway.last_stream_id = self.h2.highest_inbound_stream_id
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(goaway.serialize())
        if not self._streams:
            self._close()

    # -- events ----------------------------------------------------------------------------

    def _on_event(self, event: Event, started: list[tuple[H2Stream, Exchange]]) -> None:
        if isinstance(event, DataReceived):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.data(
                    event.data, event.flow_controlled_length, event.stream_ended is not None
                )
            elif event.flow_controlled_length:  # (a stream answered and gone)
                self.owe(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, RequestReceived):
            self._new_stream(event, started)
        elif isinstance(event, StreamEnded):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.ended()
        elif isinstance(event, WindowUpdated):
            self._window_opened(event.stream_id)
        elif isinstance(event, StreamReset):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.reset()
        elif isinstance(event, TrailersReceived):
            trailers = _pairs(event.headers)
            http2.check_trailers(trailers)
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.trailers(trailers)
        elif isinstance(event, RemoteSettingsChanged):
            self._window_opened(0)  # (its initial window may have grown)
        elif isinstance(event, ConnectionTerminated):  # the client's GOAWAY: it is done
            self._close()

    def _new_stream(self, event: RequestReceived, started: list[tuple[H2Stream, Exchange]]) -> None:
        sid = event.stream_id
        if self._closing:  # (after our GOAWAY: a stream it may retry elsewhere)
            self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        self._idle_since = -1.0  # (an idle timer armed finds it busy, and lets it be)
        stream = H2Stream(self, sid, self.loop)
        self._streams[sid] = stream
        self.origin.tracker.h2.streams += 1
        ex = stream.begin(_pairs(event.headers), event.stream_ended is not None)
        if ex is not None:
            peer_line = self.origin.peer_line  # (the client's own line was dropped: ``http1``)
            if peer_line:
                ex.head.lines.append(peer_line)
            started.append((stream, ex))

    def _window_opened(self, stream_id: int) -> None:
        """The client gave window back, to one stream or (0) the connection."""
        if stream_id:
            stream = self._streams.get(stream_id)
            if stream is not None:
                stream.window_opened()
            return
        for stream in list(self._streams.values()):
            stream.window_opened()

    def _socket_paused(self, paused: bool) -> None:
        self.write_paused = paused
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if paused:
                self.origin.tracker.counters.client_not_reading += 1
                transport.pause_reading()
            else:
                transport.resume_reading()
        for stream in list(self._streams.values()):
            stream.socket_paused(paused)

    # -- endings ---------------------------------------------------------------------------

    def _refuse(self, reason: str, code: int, detail: str = "") -> None:
        """A limit of ``h2guard`` broken, or a malformed header block: GOAWAY with ``code``,
        and close."""
        self.h2.close_connection(code)
        self._refused(reason, detail or f"GOAWAY {code:#x}")

    def _refused(self, reason: str, detail: str) -> None:
        """The connection is refused for ``reason`` (its GOAWAY ready): count, say, close."""
        self.origin.tracker.h2.refused[reason] += 1
        log.warning(
            "HTTP/2 client %s refused (%s): %s",
            self.origin.client_ip.decode(),
            reason,
            detail[:200],
        )
        self._closing = self._dead = True
        self.flush()
        transport = self.transport
        if transport is None or transport.is_closing() or not transport.can_write_eof():
            self._close()
            return
        transport.write_eof()
        transport.resume_reading()
        self._cancel_idle()
        self._idle_timer = self.loop.call_later(LINGER, self._close)

    def _close(self) -> None:
        self._closing = True
        self._cancel_idle()
        self._cancel_timer()
        self._corked = 0  # (what a stream's last read wrote goes out before the close)
        self.flush()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _arm_idle(self) -> None:
        """No stream is open from now on: drain after ``_idle`` seconds of that. (A timer
        armed already stays: it looks again when it wakes, so a stream a request does not
        arm and cancel one each.)"""
        self._idle_since = self.loop.time()
        if self._idle_timer is None:
            self._idle_timer = self.loop.call_later(self._idle, self._on_idle)

    def _on_idle(self) -> None:
        self._idle_timer = None
        if self._closing or self._idle_since < 0:
            return  # (a stream is open: the last to end arms it again)
        left = self._idle_since + self._idle - self.loop.time()
        if left > 0:
            self._idle_timer = self.loop.call_later(left, self._on_idle)
        else:
            self.drain()

    def _cancel_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None


def server_config() -> H2Configuration:
    """The codec's: what a client sends is validated (RFC 9113 8.2, 8.3: ``http2.Malformed``)
    and its split cookies joined by ``http2.request_head``; what goes out is made ready by
    ``http2``. Not by the codec again: its normalisation and validation of outbound fields
    cost about 84k instructions a unary gRPC exchange, its validation of inbound ones about
    150k (callgrind, h2 4.4)."""
    return H2Configuration(
        client_side=False,
        header_encoding=None,
        validate_inbound_headers=False,
        normalize_inbound_headers=False,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )


def _reason_of(e: ProtocolError) -> str:
    """What the codec refused, as ``meshlet_h2_refused_total`` labels it."""
    if isinstance(e, TooManyStreamsError):
        return "max_streams"
    if isinstance(e, DenialOfServiceError):
        return "header_list"
    return "protocol"


def _pairs(headers: Sequence[tuple[bytes, bytes]] | None) -> Sequence[tuple[bytes, bytes]]:
    return headers if headers is not None else ()
