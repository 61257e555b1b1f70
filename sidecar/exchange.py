"""One request's journey: route -> pick an endpoint -> take a pooled connection (or connect)
-> send the head and stream the body -> stream the response back -> release the connection.

All of it is synchronous callback code; the only thing awaited is a new upstream connection.
The ``Downstream`` (``proxy``) that owns an exchange parses the request and writes what the
exchange hands back; the ``UpstreamConnection`` calls it back as a ``ResponseSink``.
"""

from __future__ import annotations

import asyncio
import enum
from typing import TYPE_CHECKING

from control_plane.wire import Endpoint
from sidecar import http1
from sidecar.errors import Reason, error_response
from sidecar.ewma import EndpointStats
from sidecar.http1 import Headers, RequestHead
from sidecar.routing import Route
from sidecar.upstream import Pool, UpstreamConnection

if TYPE_CHECKING:
    from sidecar.proxy import Downstream

#: request body bytes kept for a replay on a fresh connection; larger bodies are not replayed
REPLAY_LIMIT = 64 * 1024
#: body bytes held while connecting before the client is paused
PENDING_LIMIT = 64 * 1024


#: synthetic answers that count as the endpoint failing (for its latency cost)
UPSTREAM_FAILURES = frozenset(
    {
        Reason.UPSTREAM_CONNECT_FAILURE,
        Reason.UPSTREAM_RESET,
        Reason.UPSTREAM_PROTOCOL_ERROR,
        Reason.UPSTREAM_TIMEOUT,
    }
)


class State(enum.Enum):
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
        "_stats",
        "_trailers",
        "_tried_at",
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
        self.state = State.QUEUED
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
        self._stats: EndpointStats | None = None  # the picked endpoint's, while in flight
        self._tried_at = 0.0
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
        key = routed.key_of(head, self.ds.client_ip) if routed.key_of is not None else None
        member = routed.balancer.pick(key)
        if member is None:
            self.fail(Reason.NO_HEALTHY_UPSTREAM, f"service {routed.name} has no endpoints")
            return
        self.endpoint = endpoint = member.endpoint
        self._stats = member.stats
        member.stats.in_flight += 1
        self._tried_at = routed.clock.monotonic()
        data = http1.upstream_request(head, self.ds.client_ip)
        self._pending.insert(0, data)
        self._pending_size += len(data)
        if self._replay is not None:
            self._replay.insert(0, data)
            self._replay_size += len(data)
        self.ds.expect_route(routed.policy.timeout_ms / 1000)
        conn = routed.pool_for(endpoint).take_idle()
        if conn is not None:
            self._send_on(conn)
        else:
            self._connect(routed.pool_for(endpoint))

    def request_body(self, data: bytes) -> None:
        if self.head.chunked:
            data = http1.chunk(data)
        if self.state is not State.QUEUED and self.route is not None:
            # an upload in progress: the route timeout counts from its last byte
            self.ds.expect_route(self.route.policy.timeout_ms / 1000)
        self._out(data)

    def request_trailer(self, name: bytes, value: bytes) -> None:
        self._trailers.append((name, value))

    def request_complete(self) -> None:
        self.request_done = True
        if self.head.has_body and self.state is not State.QUEUED and self.route is not None:
            # as Envoy's route timeout: from the end of the request to the end of the response
            # (a request without a body ended where it started: start() set the deadline)
            self.ds.expect_route(self.route.policy.timeout_ms / 1000)
        if self.head.chunked:
            trailers, self._trailers = self._trailers, []
            self._out(http1.last_chunk(trailers))

    def _out(self, data: bytes) -> None:
        if self._replay is not None:
            self._replay.append(data)
            self._replay_size += len(data)
            if self._replay_size > REPLAY_LIMIT:
                self._replay = None
        if self.state is State.SENT or self.state is State.RESPONDING:
            if self.conn is not None:
                self.conn.write(data)
        elif self.state is not State.DONE:
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size > PENDING_LIMIT:
                self.ds.pause_reading("pending", True)

    # -- connecting -------------------------------------------------------------------------

    def _connect(self, pool: Pool) -> None:
        self.state = State.CONNECTING
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
        if self.state is State.DONE:
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
        self.state = State.SENT
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
            self.state = State.TUNNEL
            ds.write(http1.interim_response(resp))
            return False
        self.state = State.RESPONDING
        retry_after = http1.retry_after(resp) if status in (429, 503) else None
        self._outcome(failed=status >= 500, retry_after=retry_after)
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
        if self.state is State.DONE:
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
        if conn is None or self.state is not State.TUNNEL:
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
        if self.state is State.DONE:
            return
        if self.state is State.TUNNEL:
            self._finish(close=True)
            return
        if self.state is State.RESPONDING:
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
        if self.state is State.TUNNEL and self.conn is not None:
            self.conn.write(data)
        elif self.state is not State.DONE:
            self._tunnel_early.append(data)

    # -- endings --------------------------------------------------------------------------

    def route_timeout(self) -> None:
        assert self.route is not None
        timeout = self.route.policy.timeout_ms
        if self.state is State.RESPONDING:
            self._finish(close=True, abort=True)  # too late for a 504: cut the stream
        elif not self.request_done:
            self.fail(Reason.REQUEST_TIMEOUT, f"the request body stalled for {timeout} ms")
        else:
            self.fail(Reason.UPSTREAM_TIMEOUT, f"no response within {timeout} ms")

    def fail(self, reason: Reason, detail: str) -> None:
        """Answer with a synthetic error instead of an upstream response."""
        if self.state is State.DONE:
            return
        if reason in UPSTREAM_FAILURES:
            self._outcome(failed=True)
        # A body still coming would have to be read first: close instead.
        unread_body = not self.request_done and (self.head.has_body or self.head.chunked)
        close = not self.keep_alive or unread_body or self.head.upgrade
        self.ds.write(error_response(reason, detail, close=close))
        self.ds.stats_error(reason)
        self._finish(close=close)

    def _finish(self, *, close: bool, abort: bool = False) -> None:
        if self.state is State.DONE:
            return
        self.state = State.DONE
        self.cancel()
        # back-pressure this exchange put on the client ends with it
        self.ds.pause_reading("upstream", False)
        self.ds.pause_reading("pending", False)
        self.ds.exchange_done(self, close=close, abort=abort)

    def _outcome(self, *, failed: bool, retry_after: float | None = None) -> None:
        """Tell the endpoint's stats how the try went: its time to the response head (or to
        the failure), once. It stays in flight until the exchange ends."""
        if self._stats is not None and self.route is not None and self._tried_at:
            now = self.route.clock.monotonic()
            self._stats.record(now, now - self._tried_at, failed, retry_after)
            self._tried_at = 0.0

    def cancel(self) -> None:
        """Stop all upstream work: a connect in progress, the connection in use."""
        if self._stats is not None:  # out of flight (a client gone: nothing learnt)
            self._stats.in_flight -= 1
            self._stats = None
        self.state = State.DONE
        if self._connect_task is not None:
            # _connected still runs: a connect that finished just now is released, not leaked
            self._connect_task.cancel()
            self._connect_task = None
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
        self._pending.clear()
