"""Keep-alive connections to one endpoint (``Pool``): idle ones reused most recent first,
capped per endpoint and closed after ``idle_timeout``; a connection (``upstream``) comes back
only after a complete response without ``Connection: close``. HTTP/2 connections
(``h2upstream``) are kept apart, multiplexed.

To an endpoint with a mesh identity every connection is mesh TLS: HTTP/1.1 ones offer ALPN
``http/1.1``, HTTP/2 ones ``h2`` then ``http/1.1``. A sidecar that answers ``http/1.1`` to
the latter (one from before HTTP/2 over TLS) gets the request over HTTP/1.1 on that very
session, and the pool calls it over HTTP/1.1 from then on, until its identity changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from control_plane.wire import Endpoint
from sidecar.balancing.ewma import EndpointStats, Exclusions
from sidecar.clock import monotonic
from sidecar.proxy.tlslayer import TlsLayer
from sidecar.proxy.upstream import Carrier, Home, UpstreamConnection
from sidecar.tls import MESH_ALPN_H2, MeshTls

#: a TLS session to resume, with the context that made it
_Session = tuple[ssl.SSLContext, ssl.SSLSession]

if TYPE_CHECKING:  # (imported with the first HTTP/2 upstream connection: ``connect``)
    from sidecar.proxy.h2upstream import H2Links, H2Upstream


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    idle: int
    busy: int
    connects: int
    reuses: int
    h2_connections: int
    tls_h2: int
    """HTTP/2 connections opened over mesh TLS (ALPN ``h2``)"""
    h2_fallback: bool
    """the endpoint's sidecar chose HTTP/1.1 when offered ``h2``: HTTP/2 requests go over it"""


class _Http1Chosen(Exception):
    """An HTTP/2 dial whose peer chose ``http/1.1`` by ALPN: the session is ``conn``'s."""

    def __init__(self, conn: UpstreamConnection) -> None:
        super().__init__("the upstream chose http/1.1")
        self.conn = conn


class Pool(Home):
    """Keep-alive connections to one endpoint.

    Idle connections are a stack (the most recently used is reused first, so the rest age
    out); one lazy timer per pool closes those idle longer than ``idle_timeout``, instead of
    a timer per connection per request.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        max_idle: int = 64,
        idle_timeout: float = 30.0,
        stats: EndpointStats | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        mesh: MeshTls | None = None,
    ) -> None:
        self.endpoint = endpoint
        #: the SPIFFE ID the endpoint's sidecar proves over mesh TLS ("": plaintext)
        self.identity = ""
        self.mesh = mesh
        #: what balancers know of the endpoint; it lives as long as the pool (a table swap
        #: keeps it, an endpoint that leaves every table and comes back starts afresh)
        self.stats = stats if stats is not None else EndpointStats(monotonic(), Exclusions())
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        # a list, not a deque: a table of 10,000 endpoints has as many pools, and an empty
        # deque is 760 bytes (7 MB of the sidecar's RSS); at most max_idle wait here
        self._idle: list[UpstreamConnection] = []
        self._all: set[UpstreamConnection] = set()
        self._connects = 0
        self._connecting = 0
        self._reuses = 0
        self._closed = False
        #: the last lines of heads sent here, by milliseconds left (``http1.upstream_request``)
        self.head_ends: dict[int, bytes] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop = loop  # (None: the running loop, looked up once)
        self.tls_handshakes = 0
        self.tls_resumed = 0
        self.tls_h2 = 0  # of those handshakes, HTTP/2's (ALPN ``h2``)
        # a session to resume on the next mesh TLS connection of each kind (taken once its
        # ticket came), with the context it belongs to (another one cannot resume it)
        self._tls_session: _Session | None = None
        self._tls_session_h2: _Session | None = None
        self._h2: H2Links | None = None  # HTTP/2 connections, from the first
        #: the endpoint's sidecar chose ``http/1.1`` when offered ``h2``: HTTP/2 requests go
        #: to it over HTTP/1.1 (until its identity changes: ``rekey``)
        self.h2_fallback = False

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        # asyncio.get_running_loop() makes a getpid() system call on Python 3.11: per
        # request it took ~10 % of the sidecar's CPU (py-spy). Once per pool instead.
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def take_idle(self) -> UpstreamConnection | None:
        """The most recently used idle connection, or None."""
        idle = self._idle
        while idle:
            conn = idle.pop()
            transport = conn.transport  # (``conn.alive()``, inline: once a request)
            if transport is not None and not transport.is_closing():
                self._reuses += 1
                return conn
        return None

    def take_stream(self) -> Carrier | None:
        """A stream on an HTTP/2 connection that has one free, or None (an idle HTTP/1.1
        connection instead, to an endpoint that chose it: ``h2_fallback``)."""
        if self.h2_fallback:
            return self.take_idle()
        return self._h2.take() if self._h2 is not None else None

    async def connect(self, h2: bool = False) -> Carrier:
        """A new connection (over mesh TLS when the endpoint has an identity and this sidecar
        a certificate), or (``h2``) a stream on a new HTTP/2 connection (over mesh TLS as
        well, or h2c); the caller bounds the time with ``asyncio.timeout``."""
        loop = self._event_loop()
        if h2 and not self.h2_fallback:
            # (its links count the connection opening, not the tries waiting for it)
            if self._h2 is None:
                from sidecar.proxy.h2upstream import H2Links  # (h2: only once HTTP/2 is used)

                self._h2 = H2Links(self, self.idle_timeout, loop, self._dial_h2)
            try:
                return await self._h2.connect()
            except _Http1Chosen as e:
                self.h2_fallback = True
                self._connects += 1
                self._all.add(e.conn)
                return e.conn
        context = None if self.mesh is None or not self.identity else self.mesh.client
        self._connecting += 1
        try:
            if context is None:
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self), self.endpoint.address, self.endpoint.port
                )
            else:
                conn = UpstreamConnection(self)
                await self._connect_tls(loop, context, conn, h2=False)
        finally:
            self._connecting -= 1
        self._connects += 1
        self._all.add(conn)
        return conn

    async def _dial_h2(self, conn: H2Upstream) -> None:
        """Connect an HTTP/2 connection (``H2Links.dial``): over mesh TLS offering ``h2``
        when the endpoint has an identity and this sidecar a certificate, else h2c.
        ``_Http1Chosen`` when the peer chose HTTP/1.1 (the session is an HTTP/1.1
        connection's then)."""
        loop = self._event_loop()
        context = None if self.mesh is None or not self.identity else self.mesh.client_h2
        if context is None:
            await loop.create_connection(lambda: conn, self.endpoint.address, self.endpoint.port)
            return
        layer = await self._connect_tls(loop, context, conn, h2=True)
        if layer.get_protocol() is not conn:
            raise _Http1Chosen(cast(UpstreamConnection, layer.get_protocol()))
        self.tls_h2 += 1
        # (its ticket comes before the server's first SETTINGS, which settle the connection)
        conn.settled.add_done_callback(lambda _: self._keep_session(layer, h2=True))

    async def _connect_tls(
        self,
        loop: asyncio.AbstractEventLoop,
        context: ssl.SSLContext,
        protocol: UpstreamConnection | H2Upstream,
        *,
        h2: bool,
    ) -> TlsLayer:
        """Connect ``protocol`` over a TLS session whose handshake is done and whose peer
        proved the endpoint's identity: ConnectionError naming what went wrong otherwise.
        (``h2``: a peer that chose another protocol than ``h2`` gets an HTTP/1.1 connection
        instead, the layer's protocol.)"""
        expected = self.identity
        opened: asyncio.Future[None] = loop.create_future()

        def verdict(layer: TlsLayer, peer: str | None) -> str | None:
            if peer != expected:
                return f"the upstream proved {peer or 'no mesh identity'}, not {expected}"
            if h2 and layer.tls.selected_alpn_protocol() != MESH_ALPN_H2:
                layer.set_protocol(UpstreamConnection(self))  # (before it is told of it)
            if not opened.done():  # (not given up meanwhile)
                opened.set_result(None)
            return None

        def failed(why: str) -> None:
            if not opened.done():
                opened.set_exception(ConnectionError(why))

        kept = self._tls_session_h2 if h2 else self._tls_session
        if h2:  # (a ticket is used once)
            self._tls_session_h2 = None
        else:
            self._tls_session = None
        session = kept[1] if kept is not None and kept[0] is context else None
        layer = TlsLayer(
            context, protocol, server_side=False, verdict=verdict, failed=failed, session=session
        )
        await loop.create_connection(lambda: layer, self.endpoint.address, self.endpoint.port)
        try:
            await opened
        except BaseException:
            layer.abort()  # (refused, timed out or cancelled: the socket goes too)
            raise
        self.tls_handshakes += 1
        self.tls_resumed += layer.tls.session_reused
        return layer

    def size(self) -> int:
        """Connections open or opening."""
        h2 = self._h2.size() if self._h2 is not None else 0
        return len(self._all) + self._connecting + h2

    def release(self, conn: Carrier) -> None:
        """Back to the pool after a complete response, or closed when it cannot be reused."""
        if not isinstance(conn, UpstreamConnection):
            conn.close()  # (an HTTP/2 stream: its connection takes another)
            return
        if not conn.reusable or len(self._idle) >= self.max_idle or self._closed:
            self._all.discard(conn)
            conn.close()
            return
        conn.owner = None
        if self.identity and self._tls_session is None and conn.transport is not None:
            self._keep_session(conn.transport, h2=False)
        loop = self._loop or self._event_loop()
        conn.idle_since = loop.time()
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self.idle_timeout, self._sweep)

    def rekey(self, identity: str) -> None:
        """The identity the endpoint proves now ("": plaintext): idle connections made
        otherwise are closed; busy ones finish their response."""
        if identity == self.identity:
            return
        self.identity = identity
        self._tls_session = self._tls_session_h2 = None
        self.h2_fallback = False  # (another sidecar, or the same one upgraded)
        idle, self._idle = self._idle, []
        for conn in idle:
            self._all.discard(conn)
            conn.close()
        if self._h2 is not None:  # (busy ones finish their streams)
            self._h2.close()

    def _keep_session(self, transport: asyncio.BaseTransport, *, h2: bool) -> None:
        """Keep the TLS session of a connection that has had a response (TLS 1.3 sends the
        ticket after the handshake), so that the next connection resumes it: a shorter
        handshake without certificates."""
        tls = transport.get_extra_info("ssl_object")
        if not isinstance(tls, ssl.SSLObject) or tls.session is None or not tls.session.has_ticket:
            return
        kept = (tls.context, tls.session)
        if h2:
            self._tls_session_h2 = kept
        else:
            self._tls_session = kept

    def _sweep(self) -> None:
        """Close connections idle for longer than ``idle_timeout`` (the oldest are first)."""
        self._sweeper = None
        loop = self._event_loop()
        limit = loop.time() - self.idle_timeout
        idle = self._idle
        stale = 0
        while stale < len(idle) and idle[stale].idle_since <= limit:
            self._all.discard(idle[stale])
            idle[stale].close()
            stale += 1
        del idle[:stale]
        if idle:
            self._sweeper = loop.call_at(idle[0].idle_since + self.idle_timeout, self._sweep)

    def discard(self, conn: Carrier) -> None:
        """Forget a connection that closed."""
        if not isinstance(conn, UpstreamConnection):
            conn.close()
            return
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)
        self._all.discard(conn)

    def close(self) -> None:
        """Close idle connections now; busy ones close when their exchange ends."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        idle, self._idle = self._idle, []
        for conn in idle:
            self._all.discard(conn)
            conn.close()
        if self._h2 is not None:
            self._h2.close()

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(
            idle=len(self._idle),
            busy=len(self._all) - len(self._idle),
            connects=self._connects,
            reuses=self._reuses,
            h2_connections=self._h2.size() if self._h2 is not None else 0,
            tls_h2=self.tls_h2,
            h2_fallback=self.h2_fallback,
        )

    def __repr__(self) -> str:
        s = self.statistics()
        e = self.endpoint
        h2 = f", {s.h2_connections} HTTP/2" if s.h2_connections else ""
        h2 += " (HTTP/1.1 fallback)" if s.h2_fallback else ""
        state = f"{s.busy} busy, {s.idle} idle{h2} | {s.connects} connects"
        return f"<Pool {e.address}:{e.port} [{state}]>"
