"""One request's journey: route -> admit -> pick an endpoint -> take a pooled connection (or
connect) -> send the head and stream the body -> classify the outcome -> stream the response
back -> release the connection.

What to do next is decided without I/O: ``Tries`` (``resilience.tries``) holds the request's
state and deadlines and answers after each try's outcome (``resilience.classify``). The
exchange is the client's half: it routes and admits the request, answers it through the
client's ``Answer`` (``client``), and ends it; its ``Dispatch`` (``dispatch``) is the upstream
half, the tries. The exchange talks to its client through ``Client`` and is called back by
its upstream connection as a ``ResponseSink`` (``upstream``).

All of it is synchronous callback code; the only thing awaited is a new upstream connection.
"""

from __future__ import annotations

from sidecar.clock import monotonic
from sidecar.errors import Reason, connection_lost
from sidecar.http import grpc, http1
from sidecar.http.http1 import RequestHead, ResponseHead
from sidecar.proxy.client import Client
from sidecar.proxy.dispatch import Dispatch, Owner
from sidecar.proxy.routing import Route
from sidecar.resilience import classify
from sidecar.resilience.tries import DONE, RESPONDING, TUNNEL, Due, State, Tries


class Exchange(Owner):
    """One request's journey upstream and its response's journey back."""

    __slots__ = (
        "_counted",
        "_error",
        "_grpc",
        "_started",
        "_status",
        "_tunnel_early",
        "client",
        "head",
        "keep_alive",
        "request_done",
        "route",
        "tries",
        "up",
    )

    def __init__(self, client: Client, head: RequestHead) -> None:
        self.client = client
        self.head = head
        self.tries = Tries()
        self.up = Dispatch(self, client, head, self.tries)
        self.route: Route | None = None
        self.request_done = False
        self.keep_alive = head.keep_alive
        # for the duration metric (not loop.time(): uvloop's ticks in whole milliseconds); -1
        # once recorded
        self._started = monotonic()
        self._status = 0  # what the client was answered (0: nothing yet)
        self._error = ""  # x-meshlet-error, when the sidecar answered itself
        self._grpc = -1  # a gRPC call's grpc-status, once known
        self._counted = False  # counted in the service's in flight
        self._tunnel_early: list[bytes] | None = None  # bytes for an upgrade before its 101

    def __repr__(self) -> str:
        target = self.head.target[:40].decode(errors="replace")
        return f"<Exchange {self.head.method.decode()} {target} {self.tries.state.name}>"

    @property
    def state(self) -> State:
        return self.tries.state

    # -- request side ---------------------------------------------------------------------

    def start(self) -> None:
        """Route, check the limits and deadline, and start the first try: called when this
        exchange reaches the front."""
        head, client = self.head, self.client
        if head.method == b"CONNECT":
            self._connect_tunnel()
            return
        routed = client.route(head.authority)
        if isinstance(routed, tuple):
            if routed[0] is Reason.NO_ROUTE and head.authority is not None:
                routed = client.egress(head.authority, head.proxied) or routed
            if isinstance(routed, tuple):
                self.fail(*routed)
                return
        self.route = routed
        policy, service = routed.policy, routed.service
        if service.in_flight >= policy.max_requests:
            service.overloaded += 1
            self.fail(
                Reason.OVERLOADED,
                f"service {routed.name} has {policy.max_requests} requests in flight "
                "(max_requests)",
            )
            return
        source = client.source
        # (a source with nothing in flight is within any share: at least one request)
        if (
            source is not None
            and source.in_flight
            and not client.source_allows(policy.max_requests)
        ):
            self.fail(
                Reason.OVERLOADED,
                f"{client.client_ip.decode()} has its share of the {policy.max_requests} "
                "requests in flight (source_share)",
            )
            return
        now = client.loop.time()
        if not self.tries.start(  # (by position: keywords cost CPython a lookup each)
            now,
            routed.tries,
            service,
            self.request_done,
            head.has_body,
            head.method in http1.IDEMPOTENT or head.retry,
            head.upgrade,
            head.attempt != 0,
            head.timeout_ms,
            head.deadline_ms,
            head.grpc_timeout_ms,
            head.grpc,
        ):
            self.fail(Reason.UPSTREAM_TIMEOUT, "the caller's deadline is spent")
            return
        service.in_flight += 1
        self._counted = True
        if source is not None:
            source.in_flight += 1
        self.up.start(routed, now)

    def _connect_tunnel(self) -> None:
        """CONNECT: a TCP stream to a host outside the mesh, under the same rule as a request
        for it (``egress``), answered 200 once it is open; a service of the mesh is called
        over HTTP, not tunnelled to."""
        client, authority = self.client, self.head.authority
        assert authority is not None  # (authority-form)
        if not isinstance(client.route(authority), tuple):
            self.fail(Reason.BAD_REQUEST, "CONNECT names a service of the mesh: call it over HTTP")
            return
        routed = client.egress(authority, True)
        if routed is None:
            self.fail(Reason.BAD_REQUEST, "CONNECT is not served on this listener")
            return
        if isinstance(routed, tuple):
            self.fail(*routed)
            return
        member = routed.balancer.pick(None, ())
        if member is None:  # (an egress route has its one endpoint)
            self.fail(Reason.NO_HEALTHY_UPSTREAM, f"no way to {authority[:100]!r}")
            return
        self.route = routed
        self.tries.state = TUNNEL
        early, self._tunnel_early = self._tunnel_early, None
        where = (member.endpoint.address, member.endpoint.port)
        client.relay_to(where, b"".join(early or ()), self._tunnel_opened)

    def _tunnel_opened(self, opened: bool) -> None:
        """A CONNECT's stream opened (200) or could not be (502): into the metrics."""
        failure = Reason.UPSTREAM_CONNECT_FAILURE
        self._status, self._error = (200, "") if opened else (failure.status, failure.code)
        self.cancel()

    def request_body(self, data: bytes) -> None:
        self.up.send(data)  # (its pace and silence are the connection's)

    def request_trailer(self, name: bytes, value: bytes) -> None:
        out = self.up.out
        assert out is not None  # (trailers end a chunked body)
        out.trailer(name, value)

    def request_complete(self) -> None:
        self.request_done = True
        # as Envoy's route timeout: from the end of the request to the response head
        if self.route is not None and self.tries.request_complete(self.client.loop.time()):
            self.client.expect_route_at(self.tries.next_deadline())
        if self.up.out is not None:
            self.up.end()

    def tunnel_from_client(self, data: bytes) -> None:
        state, conn = self.tries.state, self.up.conn
        if state is TUNNEL and conn is not None:
            conn.write(data)
        elif state is not DONE:
            if self._tunnel_early is None:
                self._tunnel_early = []
            self._tunnel_early.append(data)

    def pause_upstream(self, paused: bool) -> None:
        """The client stopped (or went on) reading its answer: so does the upstream."""
        if self.up.conn is not None:
            self.up.conn.pause_reading(paused)

    # -- response side (ResponseSink) -----------------------------------------------------

    def response_head(self, resp: ResponseHead) -> bool:
        head, client, tries = self.head, self.client, self.tries
        status = resp.status
        if status < 200 and status != 101:
            client.answer.interim(resp, head.version)
            return False
        if status == 101:
            if not head.upgrade:
                self.upstream_failed(None, protocol_error=True)  # closes the connection
                return False
            tries.state = TUNNEL
            self._status = 101
            client.answer.interim(resp, head.version)
            return False
        outcome = classify.response_head(resp, head.grpc)
        retry_after = http1.retry_after(resp) if outcome.pauses else None
        if not self.up.on_head(resp, outcome, retry_after):
            return False
        tries.answered()
        self._status = status
        attempt = self.up.attempt
        if attempt is not None:
            if head.grpc and resp.grpc_status < 0 and status == 200:
                attempt.answered()  # the call's status comes in its trailers: recorded then
            else:
                attempt.record(outcome.failed, retry_after)
        keep_alive = self.keep_alive and not client.draining and not head.upgrade
        head_request = head.method == b"HEAD"
        self.keep_alive = client.answer.head(  # (by position: keywords cost a lookup each)
            resp,
            head.version,
            head_request,
            # the rest of a request body still coming would have to be read first
            keep_alive and self.request_done,
        )
        return head_request

    def response_body(self, data: bytes) -> None:
        self.client.answer.body(data)

    def response_trailer(self, name: bytes, value: bytes) -> None:
        if self.head.grpc and name.lower() == b"grpc-status":
            self._grpc = code = grpc.parse_status(value)
            self.up.record(classify.grpc_response(code).failed)  # (once: not if at the head)
        self.client.answer.trailer(name, value)

    def response_complete(self) -> None:
        if self.tries.state is DONE:
            return
        if self.head.grpc:  # a call whose trailers had no grpc-status: as its HTTP status
            self.up.record(classify.response(self._status).failed)
        answer = self.client.answer
        if answer.needs_end:
            answer.end()
        # its connection back to its pool (``_finish``, inline: once a request)
        self.cancel(self.request_done)
        self.client.exchange_done(self, close=not self.keep_alive, abort=False)

    def response_upgraded(self, rest: bytes) -> None:
        conn = self.up.conn
        if conn is None or self.tries.state is not TUNNEL:
            return  # answered already (a 101 nobody asked for is a 502)
        client = self.client
        conn.tunnel_to(client.write)
        if rest:
            client.write(rest)
        for data in self._tunnel_early or ():
            conn.write(data)
        self._tunnel_early = None
        client.become_tunnel()

    def upstream_failed(self, exc: BaseException | None, protocol_error: bool) -> None:
        conn = self.up.close()  # a connection that failed is never reused
        state = self.tries.state
        if state is DONE:
            return
        if state is TUNNEL:
            self._finish(close=True)
        elif state is RESPONDING:
            if self.head.grpc:  # a call cut before its status: the endpoint failed it
                self.up.record(True)
            if protocol_error:
                self._cut(Reason.UPSTREAM_PROTOCOL_ERROR, "the upstream's response broke off")
            else:
                detail = connection_lost(exc)
                self._cut(Reason.UPSTREAM_RESET, f"upstream cut the response ({detail})")
        else:
            self.up.failed(conn, exc, protocol_error)

    def upstream_paused(self, paused: bool) -> None:
        self.client.pause_reading("upstream", paused)

    # -- endings --------------------------------------------------------------------------

    def route_timeout(self) -> None:
        """The connection's timer rang: what ``Tries`` finds due."""
        now = self.client.loop.time()
        tries, up = self.tries, self.up
        due = tries.on_timer(now, hedged=up.hedged)
        if due is Due.HEDGE:
            up.hedge(now)
            if up.hedged:
                return
            due = tries.on_timer(now)
        if due is Due.NOTHING:
            if tries.state is not DONE:
                self.client.expect_route_at(tries.next_deadline())
        elif due is Due.TRY_TIMEOUT:
            ms = round(tries.policy.per_try * 1000)
            up.try_failed(Reason.UPSTREAM_TIMEOUT, f"no response within {ms} ms (per try)")
        elif due is Due.CUT:
            self._cut(Reason.UPSTREAM_TIMEOUT, "the caller's deadline passed during the response")
        elif due is Due.UPLOAD_TIMEOUT:
            self.fail(Reason.UPSTREAM_TIMEOUT, "the caller's deadline ran out during the upload")
        elif due is Due.CALLER_TIMEOUT:
            self.fail(Reason.UPSTREAM_TIMEOUT, "no response within the caller's deadline")
        else:
            ms = round(tries.timeout * 1000)
            self.fail(Reason.UPSTREAM_TIMEOUT, f"no response within {ms} ms")

    def idle_timeout(self, seconds: float, *, client_stalled: bool) -> None:
        """The connection's timer: nothing moved either way for ``seconds``, the route's
        ``stream_idle_timeout_ms`` (``tunnel_idle_timeout_ms`` for a tunnel). A request body
        the client stopped sending is a 408; no response head yet, a 504; a response or a
        tunnel under way is cut."""
        ms = round(seconds * 1000)
        state = self.tries.state
        if state is TUNNEL:
            self._finish(close=True)
        elif state is RESPONDING:
            self._finish(close=True, abort=True)
        elif not self.request_done and client_stalled:
            self.fail(Reason.REQUEST_TIMEOUT, f"no request body bytes for {ms} ms")
        else:
            self.fail(Reason.UPSTREAM_TIMEOUT, f"nothing moved either way for {ms} ms")

    def fail(self, reason: Reason, detail: str) -> None:
        """Answer with a synthetic error instead of an upstream response."""
        if self.tries.state is DONE:
            return
        if classify.failed(reason):
            self.up.record(True)
        head = self.head
        # A body still coming would have to be read first: close instead.
        unread_body = not self.request_done and (head.has_body or head.chunked)
        # (after a CONNECT, the bytes that follow are not HTTP)
        close = not self.keep_alive or unread_body or head.upgrade or head.method == b"CONNECT"
        self._error = reason.code
        if head.grpc:  # answered as a gRPC call's failure (``Answer.error``): a 200
            self._status, self._grpc = 200, grpc.code_of(reason.status)
        else:
            self._status = reason.status
        self.client.answer.error(reason, detail, close=close)
        self._finish(close=close)

    def _cut(self, reason: Reason, detail: str) -> None:
        """The response, under way, failed for ``reason``. A gRPC call ends with the code of
        it in its trailers (``Answer.error`` after the head), as Envoy ends it: its client
        sees DEADLINE_EXCEEDED or UNAVAILABLE, not a reset. Any other response is aborted:
        the client must not see a body that looks complete."""
        if not self.head.grpc:
            self._finish(close=True, abort=True)
            return
        self._error = reason.code
        self._grpc = grpc.code_of(reason.status)
        self.client.answer.error(reason, detail, close=True)
        self._finish(close=True)

    def _finish(self, *, close: bool, abort: bool = False) -> None:
        if self.tries.state is DONE:
            return
        self.cancel()
        self.client.exchange_done(self, close=close, abort=abort)

    def cancel(self, reusable: bool | None = None) -> None:
        """Stop all upstream work (``Dispatch.cancel``: ``reusable``, the response is
        complete); the request leaves the service's count, and goes into its metrics."""
        if self._started >= 0:
            seconds = monotonic() - self._started
            self._started = -1.0
            tries = self.tries
            self.client.record(
                self.route,
                self.head,
                self._status,
                seconds,
                self.up.endpoint,
                tries.attempt + tries.resends,
                self._error,
                self._grpc,
            )
        self.up.cancel(reusable)
        self.tries.finish()
        route = self.route
        if self._counted and route is not None:
            self._counted = False
            route.service.in_flight -= 1
            source = self.client.source
            if source is not None:
                source.in_flight -= 1
