"""One HTTP/2 stream as its exchange sees it: the ``Client`` it answers and the ``Answer``
that frames its response (``client``), writing into the connection's ``h2`` codec.

A stream is one request: what the client's connection does for every stream (route, admit,
record) it asks of the connection's ``origin``, the listener's ``Downstream``. Each way has
its own back-pressure, by HTTP/2 flow control:

- the request body: the client gets window back only for what was passed upstream while the
  exchange did not ``pause_reading``; a paused stream's window stays spent, so the client
  waits instead of the sidecar buffering;
- the response body: sent as far as the client's windows allow; what does not fit waits
  here, and past ``OUT_LIMIT`` bytes (or while the socket is full) the upstream is paused.

What an upstream read brings of a response (its upstream corks the stream meanwhile) is sent
when the read is over: a body whose end came in the same read ends with its last DATA frame,
not with an empty one after it; a response that has no body ends with its HEADERS.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Final, Protocol

from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError

from sidecar.errors import Reason
from sidecar.http import framing, grpc, http2
from sidecar.http.http1 import Headers, ResponseHead
from sidecar.proxy.client import Answer, Client
from sidecar.proxy.exchange import Exchange
from sidecar.proxy.h2flow import send_pieces
from sidecar.proxy.h2pace import DUE_SILENT, DUE_SLOW_BODY, StreamPace
from sidecar.proxy.limits import ListenerCounters, MinRate, Source
from sidecar.proxy.routing import Route
from sidecar.resilience.tries import State

#: response body bytes a stream holds for a client whose window is spent, before its upstream
#: is paused
OUT_LIMIT: Final = 64 * 1024


class Wire(Protocol):
    """What a stream asks of its HTTP/2 connection (``h2conn.H2Downstream``)."""

    h2: H2Connection
    write_paused: bool
    """the socket to the client is full"""
    counters: ListenerCounters
    """the listener's"""
    min_rate: MinRate
    """the listener's minimum data rate, for request bodies"""

    @property
    def origin(self) -> Client:
        """The listener's connection that handed this one over: routes, limits, records."""
        ...

    def flush(self) -> None:
        """Write what the codec has to send (unless corked)."""
        ...

    def owe(self, n: int, stream_id: int) -> None:
        """``n`` bytes of DATA that ended stream ``stream_id`` were taken: their window
        comes back to the connection (one acknowledgement for many)."""
        ...

    def cork(self) -> None: ...

    def uncork(self) -> None: ...

    def stream_over(self, stream: H2Stream) -> None:
        """The stream is over both ways, as far as the sidecar cares."""
        ...

    def wake_by(self, at: float) -> None:
        """Call the ``look`` of each stream whose ``wake_at`` passed, no later than ``at``
        (loop time)."""
        ...


class H2Stream:
    """One stream of an HTTP/2 client connection: its exchange's ``Client`` and ``Answer``."""

    __slots__ = (
        "_corked",
        "_due",
        "_ended",
        "_fin_sent",
        "_head_sent",
        "_held_acks",
        "_held_head",
        "_out",
        "_out_size",
        "_pace",
        "_paused",
        "_route_at",
        "_trailers",
        "client_ip",
        "draining",
        "exchange",
        "loop",
        "needs_end",
        "record",
        "request_ended",
        "route",
        "source",
        "stream_id",
        "wake_at",
        "wire",
        "write_paused",
    )

    def __init__(self, wire: Wire, stream_id: int, loop: asyncio.AbstractEventLoop) -> None:
        self.wire = wire
        self.stream_id = stream_id
        self.loop = loop
        origin = wire.origin
        # what an exchange asks of its client, straight from the connection's (no call between)
        self.route = origin.route
        self.record = origin.record
        self.client_ip = origin.client_ip
        self.source: Source | None = origin.source
        self.draining = False  # (a stream is one request: the connection drains itself)
        self.write_paused = wire.write_paused
        self.exchange: Exchange | None = None
        self.request_ended = False  # the client ended its side (END_STREAM or a reset)
        self._paused: set[str] = set()  # why the request body is held (``pause_reading``)
        self._held_acks = 0  # request body bytes not yet given back as window, while paused
        self._out: deque[bytes] = deque()  # response body the client's window did not take
        self._corked = 0  # an upstream's read is under way (``cork``)
        self._due = False  # what came of the response during the read goes at its end
        self._out_size = 0
        self._ended = False  # the response is complete (sent when ``_out`` is)
        self._fin_sent = False  # END_STREAM went out
        self._head_sent = False  # the response's head went out (not an interim one)
        self._trailers: Headers | None = None
        self.needs_end = True  # (``Answer``: its stream ends with END_STREAM)
        #: a trailers-only answer's head, sent with its trailers (``head``)
        self._held_head: Headers | None = None
        self._route_at = math.inf  # the exchange's deadline (``expect_route_at``)
        self._pace: StreamPace | None = None  # once started
        #: when the stream needs its next ``look``, for both (inf: never): the connection's
        #: one timer wakes by the nearest of its streams' (``Wire.wake_by``), lazily: a
        #: deadline that moves later asks nothing of it, the look finds it early
        self.wake_at = math.inf

    def __repr__(self) -> str:
        state = "answered" if self._ended else "open"
        return f"<H2Stream {self.stream_id} {state} [{self._out_size} bytes waiting]>"

    # -- the request, from the connection ------------------------------------------------

    def begin(self, headers: Sequence[tuple[bytes, bytes]], ended: bool) -> Exchange | None:
        """The request's head came: its exchange (to be started), or None when it was
        refused (answered 400 already)."""
        self.request_ended = ended
        try:
            head = http2.request_head(headers, ended)
        except ValueError as e:
            self.record(None, None, Reason.BAD_REQUEST.status, 0.0, error=Reason.BAD_REQUEST.code)
            self.error(Reason.BAD_REQUEST, str(e), close=False)
            return None
        self.exchange = Exchange(self, head)
        return self.exchange

    def start(self, ex: Exchange) -> None:
        """Start its exchange (once the read its head came in is read), and watch its pace
        as for an HTTP/1 request: the route's ``stream_idle_timeout_ms``, and the
        listener's minimum data rate for the request body."""
        ex.start()
        route = ex.route
        if ex.state is State.DONE or route is None:
            return
        idle = route.policy.stream_idle_timeout_ms / 1000
        self._pace = pace = StreamPace(self.wire.min_rate, idle, self.loop.time())
        self._arm(pace.next_at(self._body_counts()))

    def data(self, data: bytes, flow_controlled: int, last: bool) -> None:
        """A piece of the request body (``flow_controlled``: the window it took; ``last``:
        its frame ended the stream, whose own window is then no matter)."""
        ex = self.exchange
        if ex is None or ex.state is State.DONE:
            self._give_back(flow_controlled)  # (nobody reads it: its window comes back)
            return
        if self._pace is not None:
            self._pace.body(self.loop.time(), len(data))
        if data:  # (an empty DATA frame, END_STREAM's carrier, would chunk as the last chunk)
            ex.request_body(data)
        if self._paused:
            self._held_acks += flow_controlled
        elif last:
            self.wire.owe(flow_controlled, self.stream_id)
        else:
            self._give_back(flow_controlled)

    def trailers(self, headers: Sequence[tuple[bytes, bytes]]) -> None:
        ex = self.exchange
        if ex is not None:
            for name, value in headers:
                ex.request_trailer(name, value)

    def ended(self) -> None:
        self.request_ended = True
        ex = self.exchange
        if ex is not None and ex.state is not State.DONE:
            ex.request_complete()

    def reset(self) -> None:
        """The client reset the stream: its request goes (it is answered nothing)."""
        self.request_ended = self._ended = True
        self._out.clear()
        self._out_size = 0
        self._due = False
        if self.exchange is not None:
            self.exchange.cancel()
        self.wire.stream_over(self)

    def window_opened(self) -> None:
        """The client gave window back: send what waited for it."""
        if self._out or self._ended:
            self._push()

    def socket_paused(self, paused: bool) -> None:
        """The socket to the client filled (or drained)."""
        self._set_write_paused(paused or self._out_size > OUT_LIMIT)

    def close(self) -> None:
        """The connection is gone (or the stream over): so is the stream's work."""
        self.wake_at = math.inf
        if self.exchange is not None:
            self.exchange.cancel()

    def _give_back(self, n: int) -> None:
        if n:
            self.wire.h2.acknowledge_received_data(n, self.stream_id)

    # -- Client ----------------------------------------------------------------------------

    @property
    def answer(self) -> Answer:
        return self

    def egress(self, authority: bytes, proxied: bool) -> Route | tuple[Reason, str] | None:
        return self.wire.origin.egress(authority, proxied)

    def source_allows(self, max_requests: int) -> bool:
        return self.wire.origin.source_allows(max_requests)

    def write(self, data: bytes) -> None:
        """(A tunnel's bytes: HTTP/2 streams are never upgraded, and CONNECT is refused.)"""
        raise AssertionError("no tunnel over HTTP/2")

    def cork(self) -> None:
        self._corked += 1
        self.wire.cork()

    def uncork(self) -> None:
        self._corked -= 1
        if self._due and not self._corked:
            self._push()
        self.wire.uncork()

    def pause_reading(self, reason: str, paused: bool) -> None:
        if paused:
            self._paused.add(reason)
            return
        if reason not in self._paused:
            return
        self._paused.discard(reason)
        if self._paused:
            return
        ex, pace = self.exchange, self._pace
        if pace is not None and ex is not None and ex.state is not State.DONE:
            pace.resumed(self.loop.time())  # (the wait was the sidecar's)
            self._arm(pace.next_at(self._body_counts()))
        if self._held_acks:
            held, self._held_acks = self._held_acks, 0
            self._give_back(held)
            self.wire.flush()

    def expect_route_at(self, when: float) -> None:
        self._route_at = when
        self._arm(when)

    def become_tunnel(self) -> None:
        raise AssertionError("no tunnel over HTTP/2")

    def relay_to(
        self, destination: tuple[str, int], first: bytes, opened: Callable[[bool], None]
    ) -> None:
        raise AssertionError("no CONNECT over HTTP/2")

    def exchange_done(self, ex: object, *, close: bool, abort: bool) -> None:
        self.wake_at = math.inf  # (nothing left to look at)
        self._paused.clear()  # (the back-pressure it put on the request body goes with it)
        if self._held_acks:
            held, self._held_acks = self._held_acks, 0
            self._give_back(held)
        if abort:  # the answer was cut: the client must not take it for whole
            self._reset(ErrorCodes.INTERNAL_ERROR)
        elif self._ended and not self._out:
            self._over()

    # -- Answer ----------------------------------------------------------------------------

    def interim(self, resp: ResponseHead, version: str) -> None:
        if resp.status != 101:  # (never asked for: no upgrade over HTTP/2)
            self._send_headers(http2.response_headers(resp), False)

    def head(self, resp: ResponseHead, version: str, head_request: bool, keep_alive: bool) -> bool:
        headers = http2.response_headers(resp)
        if resp.grpc_status >= 0:  # trailers-only upstream: so again, sent with its trailers
            self._held_head = headers  # (the next hop may still retry it by its grpc-status)
        else:
            self._head_sent = True
            # (a response that has no body ends here; trailers after it would have no body
            # to follow, as for an HTTP/1.1 client)
            if head_request or resp.framing is framing.EMPTY:
                self._ended = self._fin_sent = True
            self._send_headers(headers, self._ended)
        return True

    def body(self, data: bytes) -> None:
        if data and not self._ended:
            if self._pace is not None:
                self._pace.moved(self.loop.time())
            self._out.append(data)
            self._out_size += len(data)
            self._push_soon()

    def trailer(self, name: bytes, value: bytes) -> None:
        field = http2.trailer_field(name, value)
        if field is not None:
            if self._trailers is None:
                self._trailers = []
            self._trailers.append(field)

    def end(self) -> None:
        if not self._ended:
            self._ended = True
            self._push_soon()

    def error(self, reason: Reason, detail: str, *, close: bool) -> None:
        """The sidecar's own answer: plain text, or to a gRPC call a trailers-only response
        with the gRPC code of its status (``grpc.code_of``) and the detail as its
        ``grpc-message``; a gRPC call whose head went already (its response cut) gets them
        as its trailers, after the messages the client's window still holds back."""
        ex = self.exchange
        if ex is not None and ex.head.grpc and self._head_sent:
            self._trailers = grpc.status(grpc.code_of(reason.status), detail, reason.code)
            self._ended = True
            self._push()
            return
        if ex is not None and ex.head.grpc:
            self._out.clear()
            self._out_size = 0
            self._trailers = self._held_head = None
            self._ended = self._fin_sent = True
            code = grpc.code_of(reason.status)
            self._send_headers(grpc.trailers_only(code, detail, reason.code), True)
            if ex.state is State.DONE:
                self._over()  # (else once the exchange is done: ``exchange_done``)
            return
        body = http2.error_body(reason, detail)
        self._send_headers(http2.error_headers(reason, body), False)
        self._out.clear()
        self._out.append(body)
        self._out_size = len(body)
        self._trailers = None
        self._ended = True
        self._push()

    # -- internals ---------------------------------------------------------------------------

    def _send_headers(self, headers: Headers, end: bool) -> None:
        try:
            self.wire.h2.send_headers(self.stream_id, headers, end_stream=end)
        except ProtocolError:  # the stream is gone meanwhile (the connection's error)
            self._lost()
            return
        self.wire.flush()

    def _push_soon(self) -> None:
        """Push, or (an upstream's read under way) once the read is over."""
        if self._corked:
            self._due = True
        else:
            self._push()

    def _push(self) -> None:
        self._due = False
        try:
            self._send_body()
        except ProtocolError:
            self._lost()
            return
        self._set_write_paused(self.wire.write_paused or self._out_size > OUT_LIMIT)
        self.wire.flush()

    def _lost(self) -> None:
        """The codec will send no more on the stream: its exchange goes."""
        self.request_ended = self._ended = True
        self._out.clear()
        self._out_size = 0
        self._due = False
        self.close()
        self.wire.stream_over(self)

    def _send_body(self) -> None:
        """Send the response body as far as the client's windows allow; the end (or the
        trailers) once all of it went."""
        h2, sid, out = self.wire.h2, self.stream_id, self._out
        held = self._held_head
        if held is not None:
            self._held_head = None
            if self._ended and not out:  # a trailers-only answer: one HEADERS, as it came
                h2.send_headers(sid, held + (self._trailers or []), end_stream=True)
                self._trailers = None
                self._fin_sent = True
            else:
                self._head_sent = True
                h2.send_headers(sid, held, end_stream=False)
        sent, fin = send_pieces(h2, sid, out, self._ended and not self._trailers)
        self._out_size -= sent
        self._fin_sent = self._fin_sent or fin
        if self._ended and not out:
            if not self._fin_sent:
                self._fin_sent = True
                if self._trailers:
                    h2.send_headers(sid, self._trailers, end_stream=True)
                else:
                    h2.end_stream(sid)
            if self.exchange is None or self.exchange.state is State.DONE:
                self._over()  # (else once the exchange is done: ``exchange_done``)

    def _over(self) -> None:
        """Answered whole: a request body still coming is refused (RFC 9113 8.1)."""
        if not self.request_ended:
            self._reset(ErrorCodes.NO_ERROR)
        else:
            self.wire.stream_over(self)

    def _reset(self, code: ErrorCodes) -> None:
        self._out.clear()
        self._out_size = 0
        self._due = False
        self.request_ended = self._ended = True
        if not self._reset_done():
            self.wire.h2.reset_stream(self.stream_id, code)
        self.wire.flush()
        self.wire.stream_over(self)

    def _reset_done(self) -> bool:
        stream = self.wire.h2.streams.get(self.stream_id)
        return stream is None or stream.closed

    def _set_write_paused(self, paused: bool) -> None:
        if paused != self.write_paused:
            self.write_paused = paused
            if self.exchange is not None:
                self.exchange.pause_upstream(paused)

    def _arm(self, at: float) -> None:
        """Ask for a ``look`` no later than ``at`` (loop time; inf: no need)."""
        if at < self.wake_at:
            self.wake_at = at
            self.wire.wake_by(at)

    def _body_counts(self) -> bool:
        """The request body's rate counts: it is still coming, and the sidecar does not
        hold it up."""
        return not self.request_ended and not self._paused

    def look(self, now: float) -> None:
        """The connection's timer woke past ``wake_at``: the exchange's deadline passed
        (``Exchange.route_timeout`` says what is due), or the pace needs a look; the next
        look is asked for at the nearer of the two."""
        self.wake_at = math.inf
        ex = self.exchange
        if ex is None or ex.state is State.DONE:
            return
        if now >= self._route_at:
            self._route_at = math.inf  # (``route_timeout`` sets the next, if any)
            ex.route_timeout()
        self._look(ex, now)

    def _look(self, ex: Exchange, now: float) -> None:
        """The pace's turn (unless the deadline's ended the exchange), then the timer's next
        wake: the nearer of the two."""
        if ex.state is State.DONE:
            return
        pace = self._pace
        if pace is None:
            self._arm(self._route_at)
        elif self._paced(ex, pace, now):
            self._pace = None  # (it said its word: the exchange was cut or answered)
            self._arm(self._route_at)  # (a look finds it done, or its deadline passed)
        else:
            at = pace.next_at(self._body_counts())
            self._arm(at if at < self._route_at else self._route_at)

    def _paced(self, ex: Exchange, pace: StreamPace, now: float) -> bool:
        """The body came too slowly (408, or the stream reset once answering), or nothing
        moved either way for the idle timeout (a 408 while the client holds back its body,
        a 504 while the upstream is silent, a cut response): True when either was due."""
        due = pace.due(now, self._body_counts())
        if due is DUE_SLOW_BODY:
            self.wire.counters.request_body_rate += 1
            if ex.state is State.RESPONDING:
                self._reset(ErrorCodes.CANCEL)  # too late for a 408
            else:
                rate = self.wire.min_rate.bytes_per_s
                ex.fail(
                    Reason.REQUEST_TIMEOUT, f"the request body came slower than {rate:g} bytes/s"
                )
            return True
        if due is DUE_SILENT:
            self.wire.counters.stream_idle += 1
            ex.idle_timeout(pace.idle, client_stalled=not self._paused)
            return True
        return False
