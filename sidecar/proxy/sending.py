"""A request on its way upstream, across its tries: what the carrier of each try takes
(``upstream.Outgoing``: the client's head, what this try's head says besides, the body), the
body as it comes (to the current try's connection, or held in the ``Outbox`` until one takes
it), and the exchange it is sent for (its ``Owner``).

``Sending`` is the half of a ``dispatch.Dispatch`` that moves the request's bytes; the
dispatch is the other half, which decides where and when each try goes (``resilience.tries``)
and what to do after one. A base class, not a part: its fields are the dispatch's own
(``Dispatch.__init__`` sets them, as it sets ``Outgoing``'s), so that neither a request nor a
body byte pays a call more for the seam.
"""

from __future__ import annotations

from sidecar.errors import Reason
from sidecar.proxy.client import Client
from sidecar.proxy.routing import Route
from sidecar.proxy.upstream import Carrier, Outgoing, ResponseSink
from sidecar.resilience.tries import BACKOFF, DONE, RESPONDING, SENT, Tries


class Owner(ResponseSink):
    """What a dispatch tells the exchange it works for (besides its responses). A base class,
    as ``ResponseSink`` is."""

    __slots__ = ()

    def fail(self, reason: Reason, detail: str) -> None:
        """The request failed for good: answer so."""
        raise NotImplementedError


class Sending(Outgoing):
    """A request's bytes upstream: the current try's connection, and the body to it."""

    __slots__ = ("_again", "_sent", "client", "conn", "owner", "route", "tries")

    owner: Owner | None
    """the exchange (None once cancelled: no cycle left for the gc)"""
    client: Client
    tries: Tries
    route: Route | None
    """the request's, once routed"""
    conn: Carrier | None
    """the current try's"""
    _again: bool
    """another try may send the request (one without a body: ``out`` is None)"""
    _sent: bool
    """the current try has written some of the request to a connection"""

    # -- the body, as it comes ------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Request body bytes (as they came): to the connection, or held until one takes
        them."""
        out = self.out
        assert out is not None  # (only a request whose head says so has a body)
        out.keep(data)
        state = self.tries.state
        if state is SENT or state is RESPONDING:
            if self.conn is not None:
                self.conn.body(data)
        elif state is not DONE and state is not BACKOFF and out.hold(data):
            self.client.pause_reading("pending", True)

    def end(self) -> None:
        """The request body is whole: so it goes, or will go, to the connection."""
        out = self.out
        assert out is not None
        out.ended = True
        state = self.tries.state
        if (state is SENT or state is RESPONDING) and self.conn is not None:
            self.conn.end(out.trailers)

    # -- a try's request -----------------------------------------------------------------

    def _stamp(self, now: float, left_ms: int) -> None:
        """What the current try's head says: which try it is, and the time it has left
        (``left_ms``: ``Tries.left_ms``, or its ``given_ms`` at the try's start)."""
        route, tries, head = self.route, self.tries, self.head
        assert route is not None
        self.grpc_sent = None if head.grpc_timeout_ms is None else tries.hard_left_ms(now)
        if route.external:  # the mesh's own headers stay in the mesh
            self.attempt_sent, self.deadline_sent = 0, None
        else:
            self.attempt_sent = head.attempt if route.relay else tries.attempt
            self.deadline_sent = left_ms

    def _send_on(self, conn: Carrier) -> None:
        """Send on a live connection (a pooled one is checked by ``take_idle``)."""
        owner = self.owner
        if owner is None:  # (cancelled: nothing calls back then)
            return
        self.conn = conn
        self.tries.state = SENT
        if self.client.write_paused:
            conn.pause_reading(True)
        self._sent = True  # from here on the app may see it
        out = self.out
        held_back = out is not None and out.held_back
        conn.send(owner, self, self.client)  # (it takes what is pending of ``out``)
        if held_back:  # (the client was paused for ``pending`` only then)
            self.client.pause_reading("pending", False)

    def _replayable(self) -> bool:
        """Another try can send the request again: its whole body is kept (or it has none)."""
        return self._again if self.out is None else self.out.replayable

    def _clear_out(self) -> None:
        """Nothing is to be sent any more."""
        if self.out is not None:
            self.out.clear()

    def _fail(self, reason: Reason, detail: str) -> None:
        """The request failed for good: its owner answers so."""
        if self.owner is not None:
            self.owner.fail(reason, detail)

    def close(self) -> Carrier | None:
        """Let go of the current connection, which is never reused; it is returned."""
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
        return conn
