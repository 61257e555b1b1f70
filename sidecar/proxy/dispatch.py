"""A request's tries upstream: pick an endpoint, take a pooled connection or connect, send,
and after a try fails, do what ``Tries`` answers (``resilience.tries``): resend at once a try
none of which went out, retry after a backoff, hedge a slow first try, or give up.

A ``Dispatch`` is the upstream half of an ``Exchange``: it holds the current try (an
``Attempt`` and its connection), the request's body (an ``Outbox``), a connect under way,
a retry waiting, and a hedged first try; it tells the exchange (its ``Owner``) only when the
request fails for good. Moving the request's bytes (the body to the current connection, what
each try's head says: the ``Outgoing`` its carriers take) is its base's, ``sending.Sending``.
The exchange stays its connections' ``ResponseSink`` and asks it (``on_head``) whether a
response head is the answer.
"""

from __future__ import annotations

import asyncio

from control_plane.wire import Endpoint
from sidecar.balancing.balancer import Member
from sidecar.errors import Reason, connection_lost
from sidecar.http import http1
from sidecar.http.http1 import RequestHead, ResponseHead
from sidecar.proxy.attempt import Attempt, Hedged, elsewhere
from sidecar.proxy.client import Client
from sidecar.proxy.connect import Connect
from sidecar.proxy.outbox import Outbox
from sidecar.proxy.pool import Pool
from sidecar.proxy.routing import Route
from sidecar.proxy.sending import Owner, Sending
from sidecar.proxy.upstream import Carrier, UpstreamConnection
from sidecar.resilience import classify
from sidecar.resilience.classify import Outcome
from sidecar.resilience.tries import BACKOFF, CONNECTING, QUEUED, SENT, Tries

__all__ = ["Dispatch", "Owner"]  # (``Owner`` as well: the exchange implements it)


class Dispatch(Sending):
    """The upstream half of one exchange: its tries."""

    __slots__ = (
        "_connecting",
        "_failed_at",
        "_failure",
        "_h2",
        "_hedged",
        "_key",
        "_retry_timer",
        "_stale_retried",
        "attempt",
        "endpoint",
    )

    def __init__(self, owner: Owner, client: Client, head: RequestHead, tries: Tries) -> None:
        # (``Sending``'s fields and ``Outgoing``'s too: no call to their class a request)
        self.owner = owner
        self.client = client
        self.head = head
        self.client_ip = client.client_ip
        self.tries = tries
        self.route = None
        # (a gRPC call is kept too: a code that ``retry_on`` names retries it, ``Tries``)
        again = head.method in http1.IDEMPOTENT or head.retry or head.grpc
        #: the request's body, when it has one; kept for another try until ``start`` knows
        #: whether one may send it (HTTP/2: a stream refused unseen goes again, whatever the
        #: method)
        self.out = Outbox(True) if head.has_body else None
        self._again = again
        # what the current try's head says, as of its start (``_stamp``): which try it is,
        # the milliseconds left, a gRPC caller's milliseconds left
        self.attempt_sent = 0
        self.deadline_sent: int | None = None
        self.grpc_sent: int | None = None
        self.attempt: Attempt | None = None  # the current try, while in flight
        self.conn = None
        self.endpoint: Endpoint | None = None  # the last try's
        self._key: bytes | None = None  # hash policies: the request's
        self._sent = False
        self._stale_retried = False
        self._failed_at: tuple[Endpoint, ...] = ()  # endpoints this request's tries failed on
        self._connecting: Connect | None = None
        self._retry_timer: asyncio.TimerHandle | None = None
        self._failure: tuple[Reason, str] | None = None  # the last try's, for the answer
        self._hedged: Hedged | None = None  # the first try, still waiting after a hedge
        self._h2 = False  # tries go over HTTP/2 (``Route.h2``)

    def __repr__(self) -> str:
        hedged = ", hedged" if self._hedged is not None else ""
        return f"<Dispatch {self.tries.state.name} [{self.attempt or 'no try'}{hedged}]>"

    @property
    def hedged(self) -> bool:
        return self._hedged is not None

    def start(self, route: Route, now: float) -> None:
        """The first try (the request is routed and admitted)."""
        self.route = route
        self._h2 = h2 = not route.http1 and route.h2(self.head)
        if h2:
            self._again = True  # (only a stream refused unseen: ``retry_on`` still asks more)
        elif not self._again and self.out is not None:
            self.out.forget()  # no try but this one sends the body: no copy of it is kept
        if route.key_of is not None:
            self._key = route.key_of(self.head, self.client.client_ip)
        member = route.balancer.pick(self._key, ())  # (``_try``, inline: once a request)
        if member is None:
            self._fail(Reason.NO_HEALTHY_UPSTREAM, f"service {route.name} has no endpoints")
            return
        self._send_to(member, now, False)

    def record(self, failed: bool, retry_after: float | None = None) -> None:
        """How the current try went (``classify``), for its endpoint."""
        if self.attempt is not None:
            self.attempt.record(failed, retry_after)

    # -- a try ----------------------------------------------------------------------------

    def _try(self, avoid: Endpoint | None, now: float) -> None:
        """Pick an endpoint (not ``avoid`` nor one this request failed on, if another is
        there) and send the request to it."""
        route = self.route
        assert route is not None
        failed = self._failed_at
        member = route.balancer.pick(self._key, failed if avoid is None else (*failed, avoid))
        if member is None:
            self._fail(Reason.NO_HEALTHY_UPSTREAM, f"service {route.name} has no endpoints")
            return
        self._send_to(member, now, False)

    def _send_to(self, member: Member, now: float, resend: bool) -> None:
        """Start a try on ``member``'s endpoint (``resend``: the last try again, none of
        which went out)."""
        route, tries = self.route, self.tries
        assert route is not None
        self.attempt = Attempt(route, member)
        self.endpoint = member.endpoint
        self._sent = False
        at = tries.try_started(now, resend)
        self._stamp(now, tries.given_ms)
        out = self.out
        if out is not None and not resend and tries.attempt > 1:
            out.again()  # (a resend's body is the same try's, none of it gone out)
        self.client.expect_route_at(at)
        # (kept on the member: ``pool_for`` makes a key and looks it up, a call a try; a
        # member outlives its pool only in a table gone, whose tries then connect afresh)
        pool = member.pool
        if not isinstance(pool, Pool):
            pool = member.pool = route.pool_for(member.endpoint)
        conn = pool.take_stream() if self._h2 else pool.take_idle()
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
        self.tries.state = CONNECTING
        loop, timeout_ms = self.client.loop, policy.connect_timeout_ms
        self._connecting = Connect(loop, pool, service, timeout_ms, self._connected, self._h2)

    def _connected(self, conn: Carrier | None, reason: Reason, detail: str) -> None:
        self._connecting = None
        if conn is None:
            self.try_failed(reason, detail)
            return
        if self.attempt is not None:
            self.attempt.connected()
        self._send_on(conn)

    def _stop_connecting(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            self._connecting = None

    def _end_try(self) -> None:
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            attempt.end()

    # -- after a try ------------------------------------------------------------------------

    def on_head(self, resp: ResponseHead, outcome: Outcome, retry_after: float | None) -> bool:
        """A final response head came: True when it is the answer; False when the request
        goes again (a status ``retry_on`` lists) or a hedged first try may still answer."""
        tries = self.tries
        if tries.retriable(outcome) and self._replayable():
            delay = tries.retry_delay(self.client.loop.time(), retry_after, self._elsewhere)
            if delay is not None:  # this response goes nowhere: the request goes again
                self._abandon(outcome.failed, retry_after)
                detail = f"the upstream answered {outcome.label}; the request body grew too large"
                self._backoff(delay, Reason.UPSTREAM_RESET, f"{detail} to retry", outcome)
                return False
        if self._hedged is not None:
            if tries.listed(outcome):  # the hedged try may still do better
                self._abandon(outcome.failed, retry_after)
                self._take(self._hedged)
                return False
            self._drop_hedged()
            tries.hedge_won()
        return True

    def failed(self, conn: Carrier | None, exc: BaseException | None, protocol_error: bool) -> None:
        """The try's connection ``conn`` failed before a response head went to the client."""
        if (
            not protocol_error
            and conn is not None
            and conn.stale()
            and self._replayable()
            # (an HTTP/2 stream's: refused, unseen; not an HTTP/1.1 fallback's: ``pool``)
            and (not isinstance(conn, UpstreamConnection) or self.head.method in http1.IDEMPOTENT)
        ):
            # nothing of the try is on a connection now: a connect that fails next, or an
            # HTTP/2 stream refused again, goes to another endpoint at once (``_resend``)
            self._sent = False
            now = self.client.loop.time()
            self._stamp(now, self.tries.left_ms(now))
            if self.out is not None:
                self.out.again()
            if not self._stale_retried:
                self._stale_retried = True  # the same try again, on a fresh connection
                pool = conn.pool
                assert isinstance(pool, Pool)  # (the only kind of ``upstream.Home``)
                self._connect(pool)
                return
        detail = connection_lost(exc)
        if protocol_error:
            self._fail(Reason.UPSTREAM_PROTOCOL_ERROR, "the upstream sent a malformed response")
        elif conn is not None and conn.received:
            self._fail(Reason.UPSTREAM_RESET, f"upstream closed the connection mid-head ({detail})")
        else:
            self.try_failed(Reason.UPSTREAM_RESET, f"upstream closed the connection ({detail})")

    def try_failed(self, reason: Reason, detail: str) -> None:
        """The current try failed before any of its response reached the client. One that
        sent nothing goes to another endpoint at once (``_resend``); otherwise retry if the
        policy, the budget and the time left allow, else answer with the failure."""
        outcome = classify.error(reason)
        sent = self._sent
        self._abandon(True, None)
        if not sent and self._resend(reason, detail, outcome):
            return
        tries = self.tries
        delay = None
        if tries.retriable(outcome) and self._replayable():
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
            self._send_to(member, now, True)
        return True

    def _give_up(self, reason: Reason, detail: str) -> None:
        """The current try failed for good: the answer, unless a hedged try still waits."""
        if self._hedged is None:
            self._fail(reason, detail)
        else:
            self._take(self._hedged)

    def _abandon(self, failed: bool, retry_after: float | None) -> None:
        """The current try is given up (``failed``: a failure for the endpoint's statistics,
        not a 4xx that ``retry_on`` lists): let go of its connection and endpoint."""
        self.record(failed, retry_after)
        self.tries.try_abandoned()
        endpoint = self.endpoint
        if endpoint is not None and endpoint not in self._failed_at:
            self._failed_at = (*self._failed_at, endpoint)  # the next tries go elsewhere
        self.close()
        self._stop_connecting()
        self._end_try()

    def _backoff(self, delay: float, reason: Reason, detail: str, outcome: Outcome) -> None:
        """Wait ``delay``, then retry."""
        self._failure = (reason, detail)
        self.tries.begin_backoff(outcome)
        self.client.expect_route_at(self.tries.next_deadline())
        self._retry_timer = self.client.loop.call_later(delay, self._retry)

    def _retry(self) -> None:
        self._retry_timer = None
        if self.tries.state is not BACKOFF:
            return
        if not self._replayable():  # the body grew past what is kept while waiting
            assert self._failure is not None
            self._fail(*self._failure)
            return
        self.tries.state = QUEUED
        self._try(self.endpoint, self.client.loop.time())

    def _elsewhere(self) -> bool:
        assert self.route is not None
        return elsewhere(self.route, self.endpoint)

    # -- hedging (``Hedged``'s owner) -------------------------------------------------------

    def hedge(self, now: float) -> None:
        """The first try has not answered in ``hedge.after_ms``: leave it waiting (as a
        ``Hedged``) and send another try to another endpoint, if ``Tries`` agrees."""
        conn, attempt = self.conn, self.attempt
        if conn is None or attempt is None:
            return
        if not self.tries.hedge(now, replayable=self._replayable(), elsewhere=self._elsewhere()):
            return
        self._hedged = hedged = Hedged(self, conn, attempt)
        conn.owner = hedged
        self.conn, self.attempt = None, None
        self._try(attempt.endpoint, now)

    def hedged_lost(self, hedged: Hedged, failed: bool, retry_after: float | None = None) -> None:
        if self._hedged is hedged:
            self._hedged = None
            hedged.end(failed, retry_after)

    def _take(self, hedged: Hedged) -> None:
        """Make the hedged try the current one again (whatever the current one was, it is
        over: ended, failed or lost)."""
        self._hedged = None
        self.conn = conn = hedged.conn
        conn.owner = self.owner
        self.attempt = hedged.attempt
        self.endpoint = hedged.attempt.endpoint
        self._sent = True
        self.tries.state = SENT
        conn.pause_reading(self.client.write_paused)
        self.client.expect_route_at(self.tries.next_deadline())

    def hedged_won(self, hedged: Hedged, resp: ResponseHead) -> bool:
        """The hedged try answered first: the current try loses, and that answer goes on."""
        self._cancel_retry()
        self.tries.stop_retrying()  # the first try answers: this request is retrying no more
        self._stop_connecting()
        self._end_try()
        self.close()
        self._clear_out()
        self._take(hedged)
        return self.owner is not None and self.owner.response_head(resp)

    def _drop_hedged(self) -> None:
        hedged, self._hedged = self._hedged, None
        if hedged is not None:
            hedged.end()

    def _cancel_retry(self) -> None:
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None

    # -- the end --------------------------------------------------------------------------

    def cancel(self, reusable: bool | None = None) -> None:
        """Stop all upstream work: the try (a client gone mid-try: nothing learnt), a hedged
        try, a connect in progress, a retry waiting, the connection in use: closed, or with
        ``reusable`` (the response is complete) back to its pool, reused if True."""
        attempt, self.attempt = self.attempt, None  # (``_end_try``, inline: once a request)
        if attempt is not None:
            attempt.end()
        if self._hedged is not None:
            self._drop_hedged()
        if self._connecting is not None:
            self._stop_connecting()
        if self._retry_timer is not None:
            self._cancel_retry()
        conn = self.conn
        if conn is not None:
            self.conn = None
            if reusable is None:
                conn.close()
            else:
                if not reusable:
                    conn.reusable = False
                conn.pool.release(conn)
        if self.out is not None:  # (``_clear_out``, inline: once a request)
            self.out.clear()
        self.owner = None  # the exchange and this dispatch hold each other: freed at once
