"""One request's journey: route -> pick an endpoint -> take a pooled connection (or connect)
-> send the head and stream the body -> stream the response back -> release the connection.

A request may take several tries (``retry``): a try that fails before any of its response
reached the client (a refused connect, a reset, a status ``retry_on`` lists, its per-try
timeout) is retried on another endpoint within the retry budget and the time left; otherwise
its failure is the answer. A try none of which was sent (its connect refused or timed out, or
the connection closed before the request head was written to it) is not one any app saw: it
is resent to another endpoint at once, whatever the method (``_resend``). Every try's outcome
goes to the endpoint's statistics (latency, failure penalty, Retry-After) and to outlier
ejection.

All of it is synchronous callback code; the only thing awaited is a new upstream connection.
The ``Downstream`` (``proxy``) that owns an exchange parses the request and writes what the
exchange hands back; the ``UpstreamConnection`` calls it back as a ``ResponseSink``.
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from typing import TYPE_CHECKING

from control_plane.wire import Endpoint
from sidecar.balancing import outlier
from sidecar.balancing.balancer import Member
from sidecar.balancing.ewma import EndpointStats, Phase
from sidecar.errors import Reason, error_response
from sidecar.http import http1
from sidecar.http.http1 import Headers, RequestHead
from sidecar.proxy.routing import Route
from sidecar.proxy.upstream import Pool, UpstreamConnection
from sidecar.resilience.budget import MAX_RESENDS, MIN_TRY, backoff

if TYPE_CHECKING:
    from sidecar.proxy.listener import Downstream

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
#: what ``retry_on`` calls each failure a try can have
RETRY_EVENT: dict[Reason, str | int] = {
    Reason.UPSTREAM_CONNECT_FAILURE: "connect-failure",
    Reason.UPSTREAM_RESET: "reset",
    Reason.UPSTREAM_TIMEOUT: 504,
}
#: the retry metric's ``reason`` for each failure of a try (statuses go by their number)
RETRY_REASON = {
    Reason.UPSTREAM_CONNECT_FAILURE: "connect-failure",
    Reason.UPSTREAM_RESET: "reset",
    Reason.UPSTREAM_TIMEOUT: "timeout",
}


class State(enum.Enum):
    QUEUED = 0
    CONNECTING = 1
    SENT = 2
    RESPONDING = 3
    TUNNEL = 4
    DONE = 5
    BACKOFF = 6  # between a failed try and the next


class Exchange:
    """One request's journey upstream and its response's journey back."""

    __slots__ = (
        "_attempt",
        "_chunk_out",
        "_connect_task",
        "_counted",
        "_error",
        "_failed_at",
        "_failure",
        "_hard_deadline",
        "_hedge_at",
        "_hedged",
        "_hedging",
        "_key",
        "_may_retry",
        "_pending",
        "_pending_size",
        "_per_try",
        "_probing",
        "_replay",
        "_replay_size",
        "_resends",
        "_retry_slot",
        "_retry_timer",
        "_route_deadline",
        "_sent",
        "_stale_retried",
        "_started",
        "_stats",
        "_status",
        "_timeout",
        "_trailers",
        "_tried_at",
        "_try_deadline",
        "_tunnel_early",
        "_waiting",
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
        # the body so far, for another try; None: too big, or a request never sent twice
        again = head.method in http1.IDEMPOTENT or head.retry
        self._replay: list[bytes] | None = [] if again else None
        self._replay_size = 0
        self._stale_retried = False
        # for the duration metric (not loop.time(): uvloop's ticks in whole milliseconds); -1
        # once recorded
        self._started = time.monotonic()
        self._status = 0  # what the client was answered (0: nothing yet)
        self._error = ""  # x-meshlet-error, when the sidecar answered itself
        self._stats: EndpointStats | None = None  # the current try's endpoint's, while in flight
        self._tried_at = 0.0
        self._connect_task: asyncio.Task[UpstreamConnection] | None = None
        self._waiting = False  # counted in the service's pending (connecting)
        self._counted = False  # counted in the service's in flight
        self._chunk_out = False
        self._trailers: Headers | None = None  # (most requests and responses have none)
        self._tunnel_early: list[bytes] | None = None  # bytes for an upgrade before its 101
        self._key: bytes | None = None
        self._attempt = 0  # tries started (a try resent because none of it went out: the same)
        self._sent = False  # the current try has written some of the request to a connection
        self._resends = 0  # tries resent to another endpoint because none of them went out
        self._failed_at: tuple[Endpoint, ...] = ()  # endpoints this request's tries failed on
        self._retry_slot = False  # counted in the service's retrying (max_retries)
        self._may_retry = False
        self._probing = False  # the current try probes an ejected endpoint
        self._retry_timer: asyncio.TimerHandle | None = None
        self._failure: tuple[Reason, str] | None = None  # the last try's, for the answer
        self._timeout = 0.0  # seconds: the route timeout, from the end of the request
        self._per_try = math.inf
        self._hard_deadline = math.inf  # loop time: the caller's deadline, not extended
        self._route_deadline = math.inf
        self._try_deadline = math.inf
        self._hedging = False  # this request may be hedged
        self._hedge_at = math.inf  # loop time: when the first try is hedged
        self._hedged: Hedged | None = None  # the first try, still waiting after a hedge

    def __repr__(self) -> str:
        target = self.head.target[:40].decode(errors="replace")
        return f"<Exchange {self.head.method.decode()} {target} {self.state.name}>"

    # -- request side ---------------------------------------------------------------------

    def start(self) -> None:
        """Route, check the limits and deadline, and start the first try: called when this
        exchange reaches the front."""
        head = self.head
        if head.method == b"CONNECT":
            self.fail(Reason.BAD_REQUEST, "CONNECT is not supported")
            return
        routed = self.ds.router.route(head.authority)
        if isinstance(routed, tuple):
            self.fail(*routed)
            return
        self.route = routed
        policy = routed.policy
        service = routed.service
        if service.in_flight >= policy.max_requests:
            service.overloaded += 1
            self.fail(
                Reason.OVERLOADED,
                f"service {routed.name} has {policy.max_requests} requests in flight "
                "(max_requests)",
            )
            return
        source = self.ds.source
        if source is not None and source.in_flight >= self.ds.tracker.source_limit(
            policy.max_requests
        ):
            self.ds.tracker.counters.refused_source_requests += 1
            self.fail(
                Reason.OVERLOADED,
                f"{self.ds.client_ip.decode()} has its share of the {policy.max_requests} "
                "requests in flight (source_share)",
            )
            return
        now = self.ds.loop.time()
        self._timeout = timeout = routed.timeout
        if head.timeout_ms is not None or head.deadline_ms is not None:
            if head.deadline_ms is not None and head.deadline_ms <= 0:
                self.fail(Reason.UPSTREAM_TIMEOUT, "the caller's deadline is spent")
                return
            self._timeout = timeout = self._callers_deadline(timeout, now)
        if head.has_body and not self.request_done:  # the head's wait starts at its end
            self._route_deadline = self._hard_deadline
        else:
            at, hard = now + timeout, self._hard_deadline
            self._route_deadline = at if at < hard else hard
        service.in_flight += 1
        self._counted = True
        if source is not None:
            source.in_flight += 1
        service.budget.request(now)
        if routed.retries or routed.hedge < math.inf:
            self._per_try = routed.per_try
            # a request that an earlier hop retries is not retried (nor hedged) again here
            again = head.attempt == 0 and (head.method in http1.IDEMPOTENT or head.retry)
            self._may_retry = again and routed.retries
            self._hedging = again and routed.hedge < math.inf and not head.upgrade
        if routed.key_of is not None:
            self._key = routed.key_of(head, self.ds.client_ip)
        self._try(None, now)

    def _callers_deadline(self, timeout: float, now: float) -> float:
        """The wait for the response head (``timeout``, the route's ``timeout_ms``, counted
        from the end of the request) with the request's deadline headers. From another hop
        (with ``x-meshlet-attempt``) they are what that hop waits for the head: they shorten
        this wait. From an app they are the caller's own deadline: it bounds the whole
        exchange, body included (``_hard_deadline``)."""
        head = self.head
        for ms in (head.timeout_ms, head.deadline_ms):
            if ms is None:
                continue
            if head.attempt:
                timeout = min(timeout, ms / 1000)
            else:
                self._hard_deadline = min(self._hard_deadline, now + ms / 1000)
        return timeout

    def _try(self, avoid: Endpoint | None, loop_now: float) -> None:
        """Pick an endpoint (not ``avoid`` nor one this request failed on, if another is
        there) and send the request to it."""
        route = self.route
        assert route is not None
        failed = self._failed_at
        member = route.balancer.pick(self._key, failed if avoid is None else (*failed, avoid))
        if member is None:
            self.fail(Reason.NO_HEALTHY_UPSTREAM, f"service {route.name} has no endpoints")
            return
        self._send_to(member, loop_now, resend=False)

    def _send_to(self, member: Member, loop_now: float, *, resend: bool) -> None:
        """Start a try on ``member``'s endpoint. ``resend``: the last try again, none of which
        went out: its bytes still wait in ``_pending``, behind the head made for the last
        endpoint."""
        route = self.route
        assert route is not None
        stats = member.stats
        now = route.clock.monotonic()
        if stats.excluded_until > now:  # the balancer chose among all: too few are available
            self._panic(now)
        elif stats.ejection is not None and stats.ejection.phase is Phase.EJECTED:
            outlier.probe(stats)  # an ejected endpoint whose time is up: this try probes it
            self._probing = True
        self.endpoint = endpoint = member.endpoint
        self._stats = stats
        stats.in_flight += 1
        self._tried_at = now
        self._sent = False
        if not resend:
            self._attempt += 1
        if self.request_done and self._per_try < self._route_deadline - loop_now:
            self._try_deadline = loop_now + self._per_try
        if self._hedging and self._attempt == 1 and self.request_done:
            self._hedge_at = loop_now + route.hedge
        attempt = self.head.attempt if route.relay else self._attempt
        data = http1.upstream_request(
            self.head, self.ds.client_ip, attempt, self._left_ms(loop_now)
        )
        if resend:
            self._pending_size += len(data) - len(self._pending[0])
            self._pending[0] = data
        elif self._attempt > 1:  # another try: the body again, from the replay
            assert self._replay is not None
            self._pending = [data, *self._replay]
            self._pending_size = len(data) + self._replay_size
        else:
            self._pending.insert(0, data)
            self._pending_size += len(data)
        self._arm()
        pool = route.pool_for(endpoint)
        conn = pool.take_idle()
        if conn is not None:
            self._send_on(conn)
        else:
            self._connect(pool)

    def _left_ms(self, loop_now: float) -> int:
        """What the next hop may spend: this try's time left (``x-meshlet-deadline-ms``), so
        that it gives up when this hop does."""
        left = min(self._route_deadline, self._try_deadline) - loop_now
        if not self.request_done and self._timeout < left:
            left = self._timeout  # (the wait for the head starts when the body has come)
        return int(left * 1000) if left > 0 else 0

    def _arm(self) -> None:
        """The connection's timer: at the route deadline, the try's or the hedge's, whichever
        is first."""
        route, at = self._route_deadline, self._try_deadline
        if route < at:
            at = route
        if self._hedge_at < at:
            at = self._hedge_at
        self.ds.expect_route_at(at)

    def _progress(self) -> None:
        """The request is complete: the wait for the head (and the first try's) counts from
        here."""
        now = self.ds.loop.time()
        self._route_deadline = min(now + self._timeout, self._hard_deadline)
        if (
            self.request_done
            and self._attempt == 1
            and self.state is not State.RESPONDING
            and self._per_try < self._route_deadline - now
        ):
            self._try_deadline = now + self._per_try
        if self._hedging and self.request_done and self._attempt == 1:
            assert self.route is not None
            self._hedge_at = now + self.route.hedge
        self._arm()

    def request_body(self, data: bytes) -> None:
        if self.head.chunked:
            data = http1.chunk(data)
        self._out(data)  # (its pace and silence are the connection's to watch)

    def request_trailer(self, name: bytes, value: bytes) -> None:
        self._trailer(name, value)

    def _trailer(self, name: bytes, value: bytes) -> None:
        if self._trailers is None:
            self._trailers = []
        self._trailers.append((name, value))

    def _take_trailers(self) -> bytes:
        """The last chunk, with the trailers held so far (request's, then response's)."""
        trailers, self._trailers = self._trailers, None
        return http1.last_chunk(trailers or [])

    def request_complete(self) -> None:
        self.request_done = True
        state = self.state
        if (
            self.head.has_body
            and self.route is not None
            and (state is State.SENT or state is State.CONNECTING or state is State.BACKOFF)
        ):
            # as Envoy's route timeout: from the end of the request to the response head
            # (a request without a body ended where it started: start() set the deadline)
            self._progress()
        if self.head.chunked:
            self._out(self._take_trailers())

    def _out(self, data: bytes) -> None:
        if self._replay is not None:
            self._replay.append(data)
            self._replay_size += len(data)
            if self._replay_size > REPLAY_LIMIT:
                self._replay = None
        state = self.state
        if state is State.SENT or state is State.RESPONDING:
            if self.conn is not None:
                self.conn.write(data)
        elif state is not State.DONE and state is not State.BACKOFF:
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size > PENDING_LIMIT:
                self.ds.pause_reading("pending", True)

    # -- connecting -------------------------------------------------------------------------

    def _connect(self, pool: Pool) -> None:
        route = self.route
        assert route is not None
        policy = route.policy
        service = route.service
        full = pool.size() >= policy.max_connections
        if full or service.pending >= policy.max_pending:
            service.overloaded += 1
            limit = "max_connections" if full else "max_pending"
            self._end_try()
            self._give_up(Reason.OVERLOADED, f"service {route.name} is at its {limit} limit")
            return
        self.state = State.CONNECTING
        service.pending += 1
        self._waiting = True
        timeout = policy.connect_timeout_ms / 1000

        async def connect() -> UpstreamConnection:
            async with asyncio.timeout(timeout):
                return await pool.connect()

        task = self.ds.loop.create_task(connect())
        self._connect_task = task
        task.add_done_callback(self._connected)

    def _not_waiting(self) -> None:
        if self._waiting and self.route is not None:
            self._waiting = False
            self.route.service.pending -= 1

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
            assert self.endpoint is not None
            e = self.endpoint
            what = (
                f"timed out after {self.route.policy.connect_timeout_ms} ms"
                if isinstance(exc, TimeoutError) and self.route is not None
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

    def _stop_connecting(self) -> None:
        if self._connect_task is not None:
            # _connected still runs: a connect that finished just now is released, not leaked
            self._connect_task.cancel()
            self._connect_task = None
        self._not_waiting()

    def _send_on(self, conn: UpstreamConnection) -> None:
        """Send on a live connection (a pooled one is checked by ``take_idle``)."""
        self.conn = conn
        self.state = State.SENT
        if self.ds.write_paused:
            conn.pause_reading(True)
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        self._sent = True  # from here on the app may see it
        conn.send(self, data)
        self.ds.pause_reading("pending", False)

    # -- tries --------------------------------------------------------------------------------

    def _try_failed(self, reason: Reason, detail: str) -> None:
        """The current try failed before any of its response reached the client. One that
        sent nothing goes to another endpoint at once (``_resend``); otherwise retry if the
        policy, the budget and the time left allow, else answer with the failure."""
        sent = self._sent
        self._abandon_try(True, retry_after=None)
        if not sent and self._resend(reason, detail):
            return
        event = RETRY_EVENT.get(reason, 0)
        delay = self._retry_delay(event, None)
        if delay is None:
            self._give_up(reason, detail)
        else:
            self._backoff(delay, reason, detail, RETRY_REASON.get(reason, str(event)))

    def _give_up(self, reason: Reason, detail: str) -> None:
        """The current try failed for good: the answer, unless a hedged try still waits."""
        if self._hedged is None:
            self.fail(reason, detail)
        else:
            self._take(self._hedged)

    def _abandon_try(self, failed: bool, retry_after: float | None) -> None:
        """The current try is given up (``failed``: a failure for the endpoint's statistics,
        not a 4xx that ``retry_on`` lists): let go of its connection and endpoint."""
        self._outcome(failed=failed, retry_after=retry_after)
        self._hedge_at = math.inf  # only a first try is hedged
        endpoint = self.endpoint
        if endpoint is not None and endpoint not in self._failed_at:
            self._failed_at = (*self._failed_at, endpoint)  # the next tries go elsewhere
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
        self._stop_connecting()
        self._end_try()

    def _resend(self, reason: Reason, detail: str) -> bool:
        """The try that just failed sent nothing (a refused or timed-out connect, a
        connection closed before the request was written to it), so no app has seen the
        request: send it to another endpoint at once, whatever its method, outside
        ``retries``, ``retry_on``, the backoff and ``max_retries``, but from the retry budget
        and only with time left; at most ``MAX_RESENDS`` times, never to an endpoint
        that failed this request. False: not resent (the retry policy decides)."""
        route = self.route
        assert route is not None
        if self._hedged is not None or self._resends >= MAX_RESENDS:
            return False  # (with a hedged try still running, that one may answer)
        loop_now = self.ds.loop.time()
        if self._route_deadline - loop_now < MIN_TRY:
            return False
        failed = self._failed_at
        member = route.balancer.pick(self._key, failed)
        if member is None or member.endpoint in failed:
            return False  # no other endpoint to send it to
        service = route.service
        budget = route.policy.retry_budget
        if not service.budget.spend(route.clock.monotonic(), budget.ratio, budget.min_per_s):
            self._give_up(reason, detail)
            return True
        self._resends += 1
        service.retries += 1
        service.retries_unsent += 1
        why = RETRY_REASON.get(reason, reason.code)
        service.retry_reasons[why] = service.retry_reasons.get(why, 0) + 1
        self._send_to(member, loop_now, resend=True)
        return True

    def _backoff(self, delay: float, reason: Reason, detail: str, why: str) -> None:
        """Wait ``delay``, then retry; ``why`` names the failure for the retry metric."""
        route = self.route
        assert route is not None
        self._failure = (reason, detail)
        self.state = State.BACKOFF
        self._try_deadline = math.inf
        self._arm()
        service = route.service
        if not self._retry_slot:  # held until the request ends (max_retries)
            self._retry_slot = True
            service.retrying += 1
        service.retries += 1
        service.retry_reasons[why] = service.retry_reasons.get(why, 0) + 1
        self._retry_timer = self.ds.loop.call_later(delay, self._retry)

    def _retry_delay(self, event: str | int, retry_after: float | None) -> float | None:
        """Seconds to wait before retrying after ``event``, or None: no retry."""
        route = self.route
        if route is None or not self._may_retry or self._replay is None:
            return None
        policy = route.policy
        if self._attempt > policy.retries or event not in policy.retry_on:
            return None
        if isinstance(event, int) and not self.request_done:
            return None  # answered before the whole request came: nothing to replay yet
        delay = backoff(self._attempt)
        if retry_after is not None and not self._elsewhere():
            delay = max(delay, retry_after)  # only the endpoint that asked for a pause is left
        if self._route_deadline - self.ds.loop.time() - delay < MIN_TRY:
            return None  # it would not fit in the time left
        service = route.service
        if not self._retry_slot and service.retrying >= policy.max_retries:
            service.retries_over_limit += 1
            return None
        budget = policy.retry_budget
        if not service.budget.spend(route.clock.monotonic(), budget.ratio, budget.min_per_s):
            return None
        return delay

    def _elsewhere(self) -> bool:
        """Another endpoint than the last try's is available now."""
        route = self.route
        assert route is not None
        now = route.clock.monotonic()
        return any(
            m.endpoint is not self.endpoint and m.stats.excluded_until <= now
            for m in route.balancer.members
        )

    def _retry(self) -> None:
        self._retry_timer = None
        if self.state is not State.BACKOFF:
            return
        if self._replay is None:  # the body grew past what is kept while waiting
            assert self._failure is not None
            self.fail(*self._failure)
            return
        self.state = State.QUEUED
        self._try(self.endpoint, self.ds.loop.time())

    def _end_try(self) -> None:
        """The current try's endpoint has it in flight no more."""
        stats, self._stats = self._stats, None
        if stats is not None:
            stats.in_flight -= 1
            if self._probing and self._tried_at:  # a probe that got no answer
                outlier.abandon(stats, self.route.clock.monotonic() if self.route else 0.0)
            self._tried_at = 0.0
            self._probing = False

    def _panic(self, now: float) -> None:
        route = self.route
        assert route is not None
        members = route.balancer.members
        available = sum(1 for m in members if m.stats.excluded_until <= now)
        route.service.panic(now, available, len(members))

    # -- hedging ----------------------------------------------------------------------------

    def _hedge(self, loop_now: float) -> None:
        """The first try has not answered in ``hedge.after_ms``: leave it waiting (as a
        ``Hedged``) and send another try to another endpoint, if the budget has one."""
        route, conn, stats, endpoint = self.route, self.conn, self._stats, self.endpoint
        assert route is not None
        if conn is None or stats is None or endpoint is None or self._replay is None:
            return
        if not self._elsewhere():
            return
        budget = route.policy.retry_budget
        if not route.service.budget.spend(route.clock.monotonic(), budget.ratio, budget.min_per_s):
            return
        route.service.hedges += 1
        self._hedged = conn.owner = Hedged(
            self, conn, endpoint, stats, self._tried_at, self._probing
        )
        self.conn, self._stats, self._tried_at, self._probing = None, None, 0.0, False
        self.state = State.QUEUED
        self._try_deadline = math.inf
        self._try(endpoint, loop_now)

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
        self.endpoint, self._stats = hedged.endpoint, hedged.stats
        self._tried_at, self._probing = hedged.tried_at, hedged.probing
        self._sent = True
        self.state = State.SENT
        conn.pause_reading(self.ds.write_paused)
        self._arm()

    def _adopt(self, hedged: Hedged, resp: http1.ResponseHead) -> bool:
        """The hedged try answered first: the current try loses, and that answer goes on."""
        route = self.route
        assert route is not None
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        if self._retry_slot:  # the first try answers: this request is retrying no more
            self._retry_slot = False
            route.service.retrying -= 1
        self._stop_connecting()
        self._end_try()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
        self._pending.clear()
        self._pending_size = 0
        self._take(hedged)
        return self.response_head(resp)

    def _drop_hedged(self) -> None:
        hedged, self._hedged = self._hedged, None
        if hedged is not None:
            hedged.end()

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
            self._status = 101
            ds.write(http1.interim_response(resp))
            return False
        retry_after = http1.retry_after(resp) if status in (429, 503) else None
        if self._may_retry:
            delay = self._retry_delay(status, retry_after)
            if delay is not None:  # this response goes nowhere: the request goes again
                self._abandon_try(status >= 500, retry_after)
                detail = f"the upstream answered {status}; the request body grew too large to retry"
                self._backoff(delay, Reason.UPSTREAM_RESET, detail, str(status))
                return False
        if self._hedged is not None:
            assert self.route is not None
            if status in self.route.policy.retry_on:  # the hedged try may still do better
                self._abandon_try(status >= 500, retry_after)
                self._take(self._hedged)
                return False
            self._drop_hedged()
            self.route.service.hedges_won += 1
        self.state = State.RESPONDING
        self._status = status
        self._try_deadline = math.inf
        self._hedge_at = math.inf
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
            self._trailer(name, value)

    def response_complete(self) -> None:
        if self.state is State.DONE:
            return
        if self._chunk_out:
            self.ds.write(self._take_trailers())
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
        for data in self._tunnel_early or ():
            conn.write(data)
        self._tunnel_early = None
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
            and not self._stale_retried
            and self._replay is not None
            and self.head.method in http1.IDEMPOTENT
        ):
            self._stale_retried = True  # the same try again, on a fresh connection
            route = self.route
            assert route is not None
            attempt = self.head.attempt if route.relay else self._attempt
            left_ms = self._left_ms(self.ds.loop.time())
            data = http1.upstream_request(self.head, self.ds.client_ip, attempt, left_ms)
            self._pending = [data, *self._replay]
            self._pending_size = len(data) + self._replay_size
            self._connect(conn.pool)
            return
        if protocol_error:
            self.fail(Reason.UPSTREAM_PROTOCOL_ERROR, "the upstream sent a malformed response")
        elif conn is not None and conn.received:
            detail = f"{type(exc).__name__}: {exc}" if exc else "connection closed"
            self.fail(Reason.UPSTREAM_RESET, f"upstream closed the connection mid-head ({detail})")
        else:
            detail = f"{type(exc).__name__}: {exc}" if exc else "connection closed"
            self._try_failed(Reason.UPSTREAM_RESET, f"upstream closed the connection ({detail})")

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
            if self._tunnel_early is None:
                self._tunnel_early = []
            self._tunnel_early.append(data)

    # -- endings --------------------------------------------------------------------------

    def route_timeout(self) -> None:
        """The connection's timer: the route deadline, or the current try's."""
        assert self.route is not None
        now = self.ds.loop.time()
        if now < self._route_deadline:
            if now >= self._hedge_at:
                self._hedge_at = math.inf
                if self.state is State.SENT and self._hedged is None:
                    self._hedge(now)
                    if self._hedge_out():
                        return
            if now >= self._try_deadline and (
                self.state is State.SENT or self.state is State.CONNECTING
            ):
                ms = round(self._per_try * 1000)
                self._try_failed(Reason.UPSTREAM_TIMEOUT, f"no response within {ms} ms (per try)")
            else:
                self._arm()
            return
        timeout = round(self._timeout * 1000)
        if self.state is State.RESPONDING:
            if now < self._hard_deadline:  # the body: only the caller's deadline bounds it
                self._route_deadline = self._hard_deadline
                self._arm()
            else:
                self._finish(close=True, abort=True)  # the caller's deadline, mid-body
        elif not self.request_done:
            self.fail(Reason.UPSTREAM_TIMEOUT, "the caller's deadline ran out during the upload")
        elif now >= self._hard_deadline:
            self.fail(Reason.UPSTREAM_TIMEOUT, "no response within the caller's deadline")
        else:
            self.fail(Reason.UPSTREAM_TIMEOUT, f"no response within {timeout} ms")

    def idle_timeout(self, seconds: float, *, client_stalled: bool) -> None:
        """The connection's timer: nothing moved either way for ``seconds``, the route's
        ``stream_idle_timeout_ms`` (``tunnel_idle_timeout_ms`` for a tunnel). A request body
        the client stopped sending is a 408; no response head yet, a 504; a response or a
        tunnel under way is cut."""
        ms = round(seconds * 1000)
        if self.state is State.TUNNEL:
            self._finish(close=True)
        elif self.state is State.RESPONDING:
            self._finish(close=True, abort=True)
        elif not self.request_done and client_stalled:
            self.fail(Reason.REQUEST_TIMEOUT, f"no request body bytes for {ms} ms")
        else:
            self.fail(Reason.UPSTREAM_TIMEOUT, f"nothing moved either way for {ms} ms")

    def fail(self, reason: Reason, detail: str) -> None:
        """Answer with a synthetic error instead of an upstream response."""
        if self.state is State.DONE:
            return
        if reason in UPSTREAM_FAILURES:
            self._outcome(failed=True)
        # A body still coming would have to be read first: close instead.
        unread_body = not self.request_done and (self.head.has_body or self.head.chunked)
        close = not self.keep_alive or unread_body or self.head.upgrade
        self._status = reason.status
        self._error = reason.code
        self.ds.write(error_response(reason, detail, close=close))
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

    def _record(self) -> None:
        """Into the metrics and the access log, once."""
        seconds = time.monotonic() - self._started
        self._started = -1.0
        self.ds.tracker.record(
            self.route,
            self.head,
            self._status,
            seconds,
            self.endpoint,
            self._attempt + self._resends,
            self._error,
        )

    def _outcome(self, *, failed: bool, retry_after: float | None = None) -> None:
        """Tell the endpoint's stats and outlier state how the try went: its time to the
        response head (or to the failure), once. It stays in flight until the try ends."""
        stats, route = self._stats, self.route
        if stats is not None and route is not None and self._tried_at:
            record(route, self.endpoint, stats, self._tried_at, self._probing, failed, retry_after)
            self._tried_at = 0.0

    def cancel(self) -> None:
        """Stop all upstream work: a connect in progress, the connection in use, a retry
        waiting; the request leaves the service's count, and goes into its metrics."""
        if self._started >= 0:
            self._record()
        if self._stats is not None:
            self._end_try()  # (a client gone mid-try: nothing learnt)
        if self._hedged is not None:
            self._drop_hedged()
        if self._connect_task is not None or self._waiting:
            self._stop_connecting()
        route = self.route
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        if self._retry_slot and route is not None:
            self._retry_slot = False
            route.service.retrying -= 1
        if self._counted and route is not None:
            self._counted = False
            route.service.in_flight -= 1
            if self.ds.source is not None:
                self.ds.source.in_flight -= 1
        self.state = State.DONE
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()
        self._pending.clear()


def record(
    route: Route,
    endpoint: Endpoint | None,
    stats: EndpointStats,
    tried_at: float,
    probing: bool,
    failed: bool,
    retry_after: float | None,
) -> None:
    """Tell an endpoint's stats and outlier state how a try that began at ``tried_at`` went."""
    now = route.clock.monotonic()
    stats.record(now, now - tried_at, failed, retry_after)
    ejection = stats.ejection
    if ejection is None:
        if not failed:
            return
    elif ejection.phase is not Phase.HEALTHY and not probing:
        return  # a panic pick of an endpoint that is out: its probe decides
    members = route.balancer.members
    if outlier.record(stats, failed, now, route.policy.outlier, members, route.name, endpoint):
        route.service.ejections += 1


class Hedged:
    """The first try of a hedged request, still waiting for its response head while the
    exchange's next try runs. A usable head (not a ``retry_on`` status) wins: the exchange
    adopts this try and drops its own. A failure leaves the exchange to its own try."""

    __slots__ = ("conn", "endpoint", "exchange", "probing", "stats", "tried_at")

    def __init__(
        self,
        exchange: Exchange,
        conn: UpstreamConnection,
        endpoint: Endpoint,
        stats: EndpointStats,
        tried_at: float,
        probing: bool,
    ) -> None:
        self.exchange = exchange
        self.conn = conn
        self.endpoint = endpoint
        self.stats = stats
        self.tried_at = tried_at
        self.probing = probing

    def __repr__(self) -> str:
        return f"<Hedged {self.endpoint.address}:{self.endpoint.port}>"

    def end(self, failed: bool | None = None, retry_after: float | None = None) -> None:
        """This try is over: ``failed`` says how it went (None: nobody knows, it was cut)."""
        self.conn.close()
        self.stats.in_flight -= 1
        route = self.exchange.route
        if route is not None and self.tried_at:
            if failed is not None:
                record(
                    route,
                    self.endpoint,
                    self.stats,
                    self.tried_at,
                    self.probing,
                    failed,
                    retry_after,
                )
            elif self.probing:
                outlier.abandon(self.stats, route.clock.monotonic())
        self.tried_at = 0.0

    def _lose(self, failed: bool, retry_after: float | None = None) -> None:
        exchange = self.exchange
        if exchange._hedged is self:
            exchange._hedged = None
            self.end(failed, retry_after)

    # -- ResponseSink -----------------------------------------------------------------------

    def response_head(self, resp: http1.ResponseHead) -> bool:
        status = resp.status
        if status < 200:
            return False  # an interim response: the real one follows
        route = self.exchange.route
        if status == 101 or route is None or status in route.policy.retry_on:
            retry_after = http1.retry_after(resp) if status in (429, 503) else None
            self._lose(status >= 500, retry_after)
            return False
        return self.exchange._adopt(self, resp)

    def response_body(self, data: bytes) -> None:
        pass  # (only after a head, and a head that wins makes the exchange the owner)

    def response_trailer(self, name: bytes, value: bytes) -> None:
        pass

    def response_complete(self) -> None:
        pass

    def response_upgraded(self, rest: bytes) -> None:
        pass

    def upstream_failed(self, exc: BaseException | None, protocol_error: bool) -> None:
        self._lose(True)

    def upstream_paused(self, paused: bool) -> None:
        pass

    def cork(self) -> None:
        self.exchange.cork()

    def uncork(self) -> None:
        self.exchange.uncork()
