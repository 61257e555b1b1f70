"""One request's journey: route -> admit -> pick an endpoint -> take a pooled connection (or
connect) -> send the head and stream the body -> classify the outcome -> stream the response
back -> release the connection.

The exchange does the I/O; what to do next is decided elsewhere, without it. ``Tries``
(``resilience.tries``) holds the request's state and deadlines and answers after each try's
outcome (``resilience.classify``): retry after a delay, resend at once, hedge, answer, or give
up. An ``Attempt`` (``attempt``) is one try on one endpoint and records its outcome for the
balancers and outlier ejection; the request's bytes wait and are kept for another try in an
``Outbox``. The exchange talks to its client through ``Client`` and ``Answer`` (``client``)
and is called back by its upstream connection as a ``ResponseSink`` (``upstream``).

All of it is synchronous callback code; the only thing awaited is a new upstream connection.
"""

from __future__ import annotations

import asyncio
import time

from control_plane.wire import Endpoint
from sidecar.balancing.balancer import Member
from sidecar.errors import Reason
from sidecar.http import http1
from sidecar.http.http1 import RequestHead, ResponseHead
from sidecar.proxy.attempt import Attempt, Hedged
from sidecar.proxy.client import Client
from sidecar.proxy.outbox import Outbox
from sidecar.proxy.routing import Route
from sidecar.proxy.upstream import Pool, UpstreamConnection
from sidecar.resilience import classify
from sidecar.resilience.classify import Outcome
from sidecar.resilience.tries import Due, State, Tries


class Exchange:
    """One request's journey upstream and its response's journey back."""

    __slots__ = (
        "_connect_task",
        "_counted",
        "_error",
        "_failed_at",
        "_failure",
        "_hedged",
        "_key",
        "_out",
        "_retry_timer",
        "_sent",
        "_stale_retried",
        "_started",
        "_status",
        "_tunnel_early",
        "_waiting",
        "attempt",
        "client",
        "conn",
        "endpoint",
        "head",
        "keep_alive",
        "request_done",
        "route",
        "tries",
    )

    def __init__(self, client: Client, head: RequestHead) -> None:
        self.client = client
        self.head = head
        self.tries = Tries()
        self.route: Route | None = None
        self.endpoint: Endpoint | None = None  # the last try's
        self.attempt: Attempt | None = None  # the current try, while in flight
        self.conn: UpstreamConnection | None = None
        self.request_done = False
        self.keep_alive = head.keep_alive
        again = head.method in http1.IDEMPOTENT or head.retry
        self._out = Outbox(chunked=head.chunked, replayable=again)
        self._stale_retried = False
        # for the duration metric (not loop.time(): uvloop's ticks in whole milliseconds); -1
        # once recorded
        self._started = time.monotonic()
        self._status = 0  # what the client was answered (0: nothing yet)
        self._error = ""  # x-meshlet-error, when the sidecar answered itself
        self._connect_task: asyncio.Task[UpstreamConnection] | None = None
        self._waiting = False  # counted in the service's pending (connecting)
        self._counted = False  # counted in the service's in flight
        self._tunnel_early: list[bytes] | None = None  # bytes for an upgrade before its 101
        self._key: bytes | None = None
        self._sent = False  # the current try has written some of the request to a connection
        self._failed_at: tuple[Endpoint, ...] = ()  # endpoints this request's tries failed on
        self._retry_timer: asyncio.TimerHandle | None = None
        self._failure: tuple[Reason, str] | None = None  # the last try's, for the answer
        self._hedged: Hedged | None = None  # the first try, still waiting after a hedge

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
            self.fail(Reason.BAD_REQUEST, "CONNECT is not supported")
            return
        routed = client.route(head.authority)
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
        if not client.source_allows(policy.max_requests):
            self.fail(
                Reason.OVERLOADED,
                f"{client.client_ip.decode()} has its share of the {policy.max_requests} "
                "requests in flight (source_share)",
            )
            return
        now = client.loop.time()
        if not self.tries.start(
            now,
            routed.tries,
            service,
            request_done=self.request_done,
            has_body=head.has_body,
            retryable=head.method in http1.IDEMPOTENT or head.retry,
            upgrade=head.upgrade,
            relayed=head.attempt != 0,
            timeout_ms=head.timeout_ms,
            deadline_ms=head.deadline_ms,
        ):
            self.fail(Reason.UPSTREAM_TIMEOUT, "the caller's deadline is spent")
            return
        service.in_flight += 1
        self._counted = True
        client.source_count(1)
        if routed.key_of is not None:
            self._key = routed.key_of(head, client.client_ip)
        self._try(None, now)

    def request_body(self, data: bytes) -> None:
        self._send(self._out.frame(data))  # (its pace and silence are the connection's)

    def request_trailer(self, name: bytes, value: bytes) -> None:
        self._out.trailer(name, value)

    def request_complete(self) -> None:
        self.request_done = True
        # as Envoy's route timeout: from the end of the request to the response head
        if self.route is not None and self.tries.request_complete(self.client.loop.time()):
            self._arm()
        if self.head.chunked:
            self._send(self._out.last())

    def _send(self, data: bytes) -> None:
        self._out.keep(data)
        state = self.tries.state
        if state is State.SENT or state is State.RESPONDING:
            if self.conn is not None:
                self.conn.write(data)
        elif state is not State.DONE and state is not State.BACKOFF and self._out.hold(data):
            self.client.pause_reading("pending", True)

    def tunnel_from_client(self, data: bytes) -> None:
        state = self.tries.state
        if state is State.TUNNEL and self.conn is not None:
            self.conn.write(data)
        elif state is not State.DONE:
            if self._tunnel_early is None:
                self._tunnel_early = []
            self._tunnel_early.append(data)

    def pause_upstream(self, paused: bool) -> None:
        """The client stopped (or went on) reading its answer: so does the upstream."""
        if self.conn is not None:
            self.conn.pause_reading(paused)

    # -- tries ----------------------------------------------------------------------------

    def _try(self, avoid: Endpoint | None, now: float) -> None:
        """Pick an endpoint (not ``avoid`` nor one this request failed on, if another is
        there) and send the request to it."""
        route = self.route
        assert route is not None
        failed = self._failed_at
        member = route.balancer.pick(self._key, failed if avoid is None else (*failed, avoid))
        if member is None:
            self.fail(Reason.NO_HEALTHY_UPSTREAM, f"service {route.name} has no endpoints")
            return
        self._send_to(member, now, resend=False)

    def _send_to(self, member: Member, now: float, *, resend: bool) -> None:
        """Start a try on ``member``'s endpoint (``resend``: the last try again, none of
        which went out)."""
        route, tries = self.route, self.tries
        assert route is not None
        self.attempt = Attempt(route, member)
        self.endpoint = member.endpoint
        self._sent = False
        tries.try_started(now, resend=resend)
        attempt = self.head.attempt if route.relay else tries.attempt
        data = http1.upstream_request(self.head, self.client.client_ip, attempt, tries.left_ms(now))
        if resend:
            self._out.readdressed(data)
        elif tries.attempt > 1:
            self._out.again(data)
        else:
            self._out.first(data)
        self._arm()
        pool = route.pool_for(member.endpoint)
        conn = pool.take_idle()
        if conn is not None:
            self._send_on(conn)
        else:
            self._connect(pool)

    def _connect(self, pool: Pool) -> None:
        route = self.route
        assert route is not None
        policy, service = route.policy, route.service
        full = pool.size() >= policy.max_connections
        if full or service.pending >= policy.max_pending:
            service.overloaded += 1
            limit = "max_connections" if full else "max_pending"
            self._end_try()
            self._give_up(Reason.OVERLOADED, f"service {route.name} is at its {limit} limit")
            return
        self.tries.state = State.CONNECTING
        service.pending += 1
        self._waiting = True
        timeout = policy.connect_timeout_ms / 1000

        async def connect() -> UpstreamConnection:
            async with asyncio.timeout(timeout):
                return await pool.connect()

        task = self.client.loop.create_task(connect())
        self._connect_task = task
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[UpstreamConnection]) -> None:
        if task is not self._connect_task:  # the connect of a try given up (or the exchange)
            if not task.cancelled() and task.exception() is None:
                conn = task.result()
                conn.pool.release(conn)  # a fresh connection nobody needs: keep it
            return
        self._connect_task = None
        self._not_waiting()
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            e, route = self.endpoint, self.route
            assert e is not None
            assert route is not None
            what = (
                f"timed out after {route.policy.connect_timeout_ms} ms"
                if isinstance(exc, TimeoutError)
                else str(exc) or type(exc).__name__
            )
            self._try_failed(
                Reason.UPSTREAM_CONNECT_FAILURE, f"connect to {e.address}:{e.port} {what}"
            )
            return
        conn = task.result()
        if not conn.alive():  # the upstream accepted and hung up before a byte was sent
            conn.pool.discard(conn)
            self._try_failed(
                Reason.UPSTREAM_RESET, "the upstream closed the connection before the request"
            )
            return
        self._send_on(conn)

    def _not_waiting(self) -> None:
        if self._waiting and self.route is not None:
            self._waiting = False
            self.route.service.pending -= 1

    def _stop_connecting(self) -> None:
        if self._connect_task is not None:
            # _connected still runs: a connect that finished just now is released, not leaked
            self._connect_task.cancel()
            self._connect_task = None
        self._not_waiting()

    def _send_on(self, conn: UpstreamConnection) -> None:
        """Send on a live connection (a pooled one is checked by ``take_idle``)."""
        self.conn = conn
        self.tries.state = State.SENT
        if self.client.write_paused:
            conn.pause_reading(True)
        self._sent = True  # from here on the app may see it
        conn.send(self, self._out.take())
        self.client.pause_reading("pending", False)

    def _try_failed(self, reason: Reason, detail: str) -> None:
        """The current try failed before any of its response reached the client. One that
        sent nothing goes to another endpoint at once (``_resend``); otherwise retry if the
        policy, the budget and the time left allow, else answer with the failure."""
        outcome = classify.error(reason)
        sent = self._sent
        self._abandon_try(True, None)
        if not sent and self._resend(reason, detail, outcome):
            return
        tries = self.tries
        delay = None
        if tries.retriable(outcome, replayable=self._out.replayable):
            delay = tries.retry_delay(self.client.loop.time())
        if delay is None:
            self._give_up(reason, detail)
        else:
            self._backoff(delay, reason, detail, outcome)

    def _resend(self, reason: Reason, detail: str, outcome: Outcome) -> bool:
        """The try that just failed sent nothing: no app has seen the request, so it goes to
        another endpoint at once, if ``Tries`` allows and there is one. False: not resent
        (the retry policy decides)."""
        route, tries = self.route, self.tries
        assert route is not None
        now = self.client.loop.time()
        if not tries.may_resend(now, hedged=self._hedged is not None):
            return False
        failed = self._failed_at
        member = route.balancer.pick(self._key, failed)
        if member is None or member.endpoint in failed:
            return False  # no other endpoint to send it to
        if not tries.resend(now, outcome):
            self._give_up(reason, detail)
        else:
            self._send_to(member, now, resend=True)
        return True

    def _give_up(self, reason: Reason, detail: str) -> None:
        """The current try failed for good: the answer, unless a hedged try still waits."""
        if self._hedged is None:
            self.fail(reason, detail)
        else:
            self._take(self._hedged)

    def _abandon_try(self, failed: bool, retry_after: float | None) -> None:
        """The current try is given up (``failed``: a failure for the endpoint's statistics,
        not a 4xx that ``retry_on`` lists): let go of its connection and endpoint."""
        if self.attempt is not None:
            self.attempt.record(failed, retry_after)
        self.tries.try_abandoned()
        endpoint = self.endpoint
        if endpoint is not None and endpoint not in self._failed_at:
            self._failed_at = (*self._failed_at, endpoint)  # the next tries go elsewhere
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
        self._stop_connecting()
        self._end_try()

    def _backoff(self, delay: float, reason: Reason, detail: str, outcome: Outcome) -> None:
        """Wait ``delay``, then retry."""
        self._failure = (reason, detail)
        self.tries.begin_backoff(outcome)
        self._arm()
        self._retry_timer = self.client.loop.call_later(delay, self._retry)

    def _retry(self) -> None:
        self._retry_timer = None
        if self.tries.state is not State.BACKOFF:
            return
        if not self._out.replayable:  # the body grew past what is kept while waiting
            assert self._failure is not None
            self.fail(*self._failure)
            return
        self.tries.state = State.QUEUED
        self._try(self.endpoint, self.client.loop.time())

    def _end_try(self) -> None:
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            attempt.end()

    def _elsewhere(self) -> bool:
        """Another endpoint than the last try's is available now."""
        route = self.route
        assert route is not None
        now = route.clock.monotonic()
        return any(
            m.endpoint is not self.endpoint and m.stats.excluded_until <= now
            for m in route.balancer.members
        )

    # -- hedging ----------------------------------------------------------------------------

    def _hedge(self, now: float) -> None:
        """The first try has not answered in ``hedge.after_ms``: leave it waiting (as a
        ``Hedged``) and send another try to another endpoint, if ``Tries`` agrees."""
        conn, attempt = self.conn, self.attempt
        if conn is None or attempt is None:
            return
        if not self.tries.hedge(now, replayable=self._out.replayable, elsewhere=self._elsewhere()):
            return
        self._hedged = hedged = Hedged(self, conn, attempt)
        conn.owner = hedged
        self.conn, self.attempt = None, None
        self._try(attempt.endpoint, now)

    def hedged_head(self, hedged: Hedged, resp: ResponseHead) -> bool:
        """The first try answered while its hedge runs: a usable answer wins, one that
        ``retry_on`` lists loses (the hedge may still do better)."""
        outcome = classify.response(resp.status)
        if self.tries.listed(outcome):
            retry_after = http1.retry_after(resp) if outcome.pauses else None
            self._lose(hedged, outcome.failed, retry_after)
            return False
        return self._adopt(hedged, resp)

    def hedged_failed(self, hedged: Hedged) -> None:
        self._lose(hedged, True)

    def _lose(self, hedged: Hedged, failed: bool, retry_after: float | None = None) -> None:
        if self._hedged is hedged:
            self._hedged = None
            hedged.end(failed, retry_after)

    def _hedge_out(self) -> bool:
        """A hedged try is out. (A method, not ``self._hedged is not None`` after a call that
        sets it: mypy would keep the narrowing from before the call, and mypyc compile it.)"""
        return self._hedged is not None

    def _take(self, hedged: Hedged) -> None:
        """Make the hedged try the current one again (whatever the current one was, it is
        over: ended, failed or lost)."""
        self._hedged = None
        self.conn = conn = hedged.conn
        conn.owner = self
        self.attempt = hedged.attempt
        self.endpoint = hedged.attempt.endpoint
        self._sent = True
        self.tries.state = State.SENT
        conn.pause_reading(self.client.write_paused)
        self._arm()

    def _adopt(self, hedged: Hedged, resp: ResponseHead) -> bool:
        """The hedged try answered first: the current try loses, and that answer goes on."""
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        self.tries.stop_retrying()  # the first try answers: this request is retrying no more
        self._stop_connecting()
        self._end_try()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
        self._out.clear()
        self._take(hedged)
        return self.response_head(resp)

    def _drop_hedged(self) -> None:
        hedged, self._hedged = self._hedged, None
        if hedged is not None:
            hedged.end()

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
            tries.state = State.TUNNEL
            self._status = 101
            client.answer.interim(resp, head.version)
            return False
        outcome = classify.response(status)
        retry_after = http1.retry_after(resp) if outcome.pauses else None
        if tries.retriable(outcome, replayable=self._out.replayable):
            delay = tries.retry_delay(client.loop.time(), retry_after, self._elsewhere)
            if delay is not None:  # this response goes nowhere: the request goes again
                self._abandon_try(outcome.failed, retry_after)
                detail = f"the upstream answered {status}; the request body grew too large to retry"
                self._backoff(delay, Reason.UPSTREAM_RESET, detail, outcome)
                return False
        if self._hedged is not None:
            if tries.listed(outcome):  # the hedged try may still do better
                self._abandon_try(outcome.failed, retry_after)
                self._take(self._hedged)
                return False
            self._drop_hedged()
            tries.hedge_won()
        tries.answered()
        self._status = status
        if self.attempt is not None:
            self.attempt.record(outcome.failed, retry_after)
        keep_alive = self.keep_alive and not client.draining and not head.upgrade
        self.keep_alive = client.answer.head(
            resp,
            version=head.version,
            head_request=head.method == b"HEAD",
            # the rest of a request body still coming would have to be read first
            keep_alive=keep_alive and self.request_done,
        )
        return head.method == b"HEAD"

    def response_body(self, data: bytes) -> None:
        self.client.answer.body(data)

    def response_trailer(self, name: bytes, value: bytes) -> None:
        self.client.answer.trailer(name, value)

    def response_complete(self) -> None:
        if self.tries.state is State.DONE:
            return
        self.client.answer.end()
        conn, self.conn = self.conn, None
        if conn is not None:
            if not self.request_done:
                conn.reusable = False
            conn.pool.release(conn)
        self._finish(close=not self.keep_alive)

    def response_upgraded(self, rest: bytes) -> None:
        conn = self.conn
        if conn is None or self.tries.state is not State.TUNNEL:
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
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()  # a connection that failed is never reused
        state = self.tries.state
        if state is State.DONE:
            return
        if state is State.TUNNEL:
            self._finish(close=True)
            return
        if state is State.RESPONDING:
            # mid-body: the client must not see a body that looks complete
            self._finish(close=True, abort=True)
            return
        if (
            not protocol_error
            and conn is not None
            and conn.requests > 1  # a reused connection the upstream had closed: stale
            and not conn.received
            and not self._stale_retried
            and self._out.replayable
            and self.head.method in http1.IDEMPOTENT
        ):
            self._stale_retried = True  # the same try again, on a fresh connection
            route = self.route
            assert route is not None
            attempt = self.head.attempt if route.relay else self.tries.attempt
            left_ms = self.tries.left_ms(self.client.loop.time())
            self._out.again(
                http1.upstream_request(self.head, self.client.client_ip, attempt, left_ms)
            )
            self._connect(conn.pool)
            return
        detail = f"{type(exc).__name__}: {exc}" if exc else "connection closed"
        if protocol_error:
            self.fail(Reason.UPSTREAM_PROTOCOL_ERROR, "the upstream sent a malformed response")
        elif conn is not None and conn.received:
            self.fail(Reason.UPSTREAM_RESET, f"upstream closed the connection mid-head ({detail})")
        else:
            self._try_failed(Reason.UPSTREAM_RESET, f"upstream closed the connection ({detail})")

    def upstream_paused(self, paused: bool) -> None:
        self.client.pause_reading("upstream", paused)

    def cork(self) -> None:
        self.client.cork()

    def uncork(self) -> None:
        self.client.uncork()

    # -- endings --------------------------------------------------------------------------

    def _arm(self) -> None:
        """The connection's timer: at the next of the request's deadlines."""
        self.client.expect_route_at(self.tries.next_deadline())

    def route_timeout(self) -> None:
        """The connection's timer rang: what ``Tries`` finds due."""
        now = self.client.loop.time()
        tries = self.tries
        due = tries.on_timer(now, hedged=self._hedged is not None)
        if due is Due.HEDGE:
            self._hedge(now)
            if self._hedge_out():
                return
            due = tries.on_timer(now)
        if due is Due.NOTHING:
            if tries.state is not State.DONE:
                self._arm()
        elif due is Due.TRY_TIMEOUT:
            ms = round(tries.policy.per_try * 1000)
            self._try_failed(Reason.UPSTREAM_TIMEOUT, f"no response within {ms} ms (per try)")
        elif due is Due.CUT:
            self._finish(close=True, abort=True)  # the caller's deadline, mid-body
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
        if state is State.TUNNEL:
            self._finish(close=True)
        elif state is State.RESPONDING:
            self._finish(close=True, abort=True)
        elif not self.request_done and client_stalled:
            self.fail(Reason.REQUEST_TIMEOUT, f"no request body bytes for {ms} ms")
        else:
            self.fail(Reason.UPSTREAM_TIMEOUT, f"nothing moved either way for {ms} ms")

    def fail(self, reason: Reason, detail: str) -> None:
        """Answer with a synthetic error instead of an upstream response."""
        if self.tries.state is State.DONE:
            return
        if self.attempt is not None and classify.failed(reason):
            self.attempt.record(True)
        head = self.head
        # A body still coming would have to be read first: close instead.
        unread_body = not self.request_done and (head.has_body or head.chunked)
        close = not self.keep_alive or unread_body or head.upgrade
        self._status = reason.status
        self._error = reason.code
        self.client.answer.error(reason, detail, close=close)
        self._finish(close=close)

    def _finish(self, *, close: bool, abort: bool = False) -> None:
        if self.tries.state is State.DONE:
            return
        self.cancel()
        # back-pressure this exchange put on the client ends with it
        client = self.client
        client.pause_reading("upstream", False)
        client.pause_reading("pending", False)
        client.exchange_done(self, close=close, abort=abort)

    def cancel(self) -> None:
        """Stop all upstream work: a connect in progress, the connection in use, a retry
        waiting; the request leaves the service's count, and goes into its metrics."""
        if self._started >= 0:
            seconds = time.monotonic() - self._started
            self._started = -1.0
            tries = self.tries
            self.client.record(
                self.route,
                self.head,
                self._status,
                seconds,
                self.endpoint,
                tries.attempt + tries.resends,
                self._error,
            )
        self._end_try()  # (a client gone mid-try: nothing learnt)
        self._drop_hedged()
        if self._connect_task is not None or self._waiting:
            self._stop_connecting()
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        self.tries.finish()
        route = self.route
        if self._counted and route is not None:
            self._counted = False
            route.service.in_flight -= 1
            self.client.source_count(-1)
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
        self._out.clear()
