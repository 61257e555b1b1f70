"""The client side as an exchange sees it: a declared interface both ways, as the upstream
side has ``ResponseSink``.

``Client`` is what an exchange asks of the client connection it answers (the listener's
``Downstream`` is one): route, admit, pace, arm its timer, record, and hand the connection
back when the exchange is done. ``Answer`` is the response on its way to that client, in HTTP
terms: a codec frames it. ``Http1Answer`` is the HTTP/1 codec's (chunks, trailers, the
framing ``http.framing`` decides); an HTTP/2 client connection would bring its own ``Answer``
and implement ``Client``, and the exchange would not change.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from control_plane.wire import Endpoint
from sidecar.errors import Reason, error_response
from sidecar.http import framing, http1
from sidecar.http.http1 import Headers, RequestHead, ResponseHead
from sidecar.proxy.limits import Source
from sidecar.proxy.routing import Route


class Answer(Protocol):
    """The response to the client's current request, as the client's codec sends it."""

    needs_end: bool
    """``end`` has something to send (an HTTP/1 chunked body's last chunk; an HTTP/2
    stream's end, always): when False, the response is complete with its last byte and the
    exchange leaves the call out (a Python call fewer for nearly every response)"""

    def interim(self, resp: ResponseHead, version: str) -> None:
        """A 1xx head (101 included), for a client speaking HTTP/``version``."""
        ...

    def head(self, resp: ResponseHead, version: str, head_request: bool, keep_alive: bool) -> bool:
        """The final head; returns whether the connection stays open after this response
        (``keep_alive``, unless the framing needs the close to end the body)."""
        ...

    def body(self, data: bytes) -> None: ...

    def trailer(self, name: bytes, value: bytes) -> None: ...

    def end(self) -> None:
        """The body is complete."""
        ...

    def error(self, reason: Reason, detail: str, *, close: bool) -> None:
        """The sidecar's own answer instead of an upstream's; to a gRPC call (HTTP/2 only)
        whose head went already, the trailers that end it with the answer's code."""
        ...


class Client(Protocol):
    """What an exchange asks of the client connection it answers."""

    client_ip: bytes
    draining: bool
    """the listener is draining: answer, then close"""
    write_paused: bool
    """the client is not reading its answers: keep the upstream paused"""
    loop: asyncio.AbstractEventLoop
    """for the exchange's timers and connects"""
    source: Source | None
    """inbound: the client's address, whose requests in flight count against its share"""

    @property
    def answer(self) -> Answer:
        """How the client's codec sends a response (one after another)."""
        ...

    def route(self, authority: bytes | None) -> Route | tuple[Reason, str]:
        """The route for a request's authority, or why there is none."""
        ...

    def egress(self, authority: bytes, proxied: bool) -> Route | tuple[Reason, str] | None:
        """The way out of the mesh for a request ``route`` found no service for (``proxied``:
        an absolute-form request), or why it may not leave; None: the request was going
        nowhere else (it was made to the sidecar itself)."""
        ...

    def source_allows(self, max_requests: int) -> bool:
        """Whether the client's address (``source``) is under its share of ``max_requests``
        in flight; a refusal is counted."""
        ...

    def write(self, data: bytes) -> None:
        """Bytes as they are (a tunnel's)."""
        ...

    def cork(self) -> None:
        """Hold writes until ``uncork`` (one upstream read, one client send)."""
        ...

    def uncork(self) -> None: ...

    def pause_reading(self, reason: str, paused: bool) -> None:
        """Stop (or go on) reading from the client for ``reason`` (``upstream``: it cannot
        take more; ``pending``: no connection takes the body yet)."""
        ...

    def expect_route_at(self, when: float) -> None:
        """Ring the exchange's ``route_timeout`` at ``when`` (loop time)."""
        ...

    def become_tunnel(self) -> None:
        """The exchange is upgraded: bytes flow both ways unparsed from now on."""
        ...

    def relay_to(
        self, destination: tuple[str, int], first: bytes, opened: Callable[[bool], None]
    ) -> None:
        """CONNECT: the connection becomes a TCP stream to ``destination`` (``first``: what
        the client sent after its head), answered 200 once that is open, 502 if it cannot
        be; ``opened`` is told which."""
        ...

    def exchange_done(self, ex: object, *, close: bool, abort: bool) -> None:
        """Exchange ``ex`` is over, and the back-pressure it put on the client with it
        (``pause_reading`` for ``upstream`` and ``pending``): close the connection
        (``abort``: at once, the answer was cut), or go on with the next request."""
        ...

    def record(
        self,
        route: Route | None,
        head: RequestHead | None,
        status: int,
        seconds: float,
        endpoint: Endpoint | None = None,
        attempts: int = 0,
        error: str = "",
        grpc_status: int = -1,
    ) -> None:
        """A request answered (``status`` 0: the client left first; ``grpc_status``: a gRPC
        call's, -1 if none): into the metrics and the access log."""
        ...


class Http1Answer:
    """Responses to one HTTP/1 client connection, one after another, framed as the client
    can read them: a body the upstream chunks or ends by closing is chunked for an HTTP/1.1
    client and ended by the close for an HTTP/1.0 one (``framing.relayed_framing``)."""

    __slots__ = ("_chunked", "_trailers", "needs_end", "sink")

    def __init__(self, write: Callable[[bytes], None]) -> None:
        #: where the answer's bytes go: the connection's ``write``, or while it holds its
        #: writes back (``cork``) straight onto what it holds
        self.sink = write
        self._chunked = False
        self.needs_end = False  # (a chunked body's: its last chunk)
        self._trailers: Headers | None = None  # (most responses have none)

    def __repr__(self) -> str:
        return f"<Http1Answer{' chunked' if self._chunked else ''}>"

    def interim(self, resp: ResponseHead, version: str) -> None:
        if resp.status == 101 or version == "1.1":  # (HTTP/1.0 has no 1xx)
            self.sink(http1.interim_response(resp))

    def head(self, resp: ResponseHead, version: str, head_request: bool, keep_alive: bool) -> bool:
        out = framing.EMPTY if head_request else resp.framing
        # (a sized or empty body goes as it came: ``relayed_framing`` is asked only about
        # the others, a call fewer for nearly every response)
        if out is not framing.LENGTH and out is not framing.EMPTY:
            out = framing.relayed_framing(out, version)
        self._chunked = self.needs_end = chunked = out is framing.CHUNKED
        self._trailers = None
        if out is framing.UNTIL_CLOSE:
            keep_alive = False
        self.sink(
            http1.downstream_response(resp, chunked, keep_alive, version)  # (by position)
        )
        return keep_alive

    def body(self, data: bytes) -> None:
        self.sink(http1.chunk(data) if self._chunked else data)

    def trailer(self, name: bytes, value: bytes) -> None:
        if self._chunked:
            if self._trailers is None:
                self._trailers = []
            self._trailers.append((name, value))

    def end(self) -> None:
        if self._chunked:
            self._chunked = self.needs_end = False
            trailers, self._trailers = self._trailers, None
            self.sink(http1.last_chunk(trailers or []))

    def error(self, reason: Reason, detail: str, *, close: bool) -> None:
        self._chunked = self.needs_end = False
        self.sink(error_response(reason, detail, close=close))
