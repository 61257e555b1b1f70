"""The exchange without a socket or an event loop: a fake client, pools of upstream
connections on fake transports (their answers read by the real parser), and the loop's
timers on a fake clock. What the client reads, what each
endpoint was sent, and the counters, after retries, per-try timeouts, hedges and deadlines
(the same cases test_resilience runs over real sockets, here in microseconds)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import pytest

from control_plane.wire import Endpoint, parse_policy
from sidecar.balancing import balancer
from sidecar.balancing.balancer import Member
from sidecar.balancing.ewma import EndpointStats, Exclusions
from sidecar.clock import FakeClock
from sidecar.errors import Reason
from sidecar.http import http1
from sidecar.proxy.attempt import Attempt
from sidecar.proxy.client import Http1Answer
from sidecar.proxy.exchange import Exchange
from sidecar.proxy.limits import Source
from sidecar.proxy.pool import Pool
from sidecar.proxy.routing import Route
from sidecar.proxy.upstream import UpstreamConnection
from sidecar.resilience.service import ServiceState
from sidecar.resilience.tries import State


class Timer:
    def __init__(self, at: float, callback: Callable[[], None]) -> None:
        self.at = at
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    """The loop as an exchange uses it: its time and timers (no connects here)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.timers: list[Timer] = []

    def time(self) -> float:
        return self.clock.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(self.clock.now + delay, callback)
        self.timers.append(timer)
        return timer


class Transport:
    """A connection's transport: what was written to it, and whether it was closed."""

    def __init__(self, taken: list[UpstreamConnection], conn: UpstreamConnection) -> None:
        self.taken = taken
        self.conn = conn
        self.sent = b""
        self.closing = False

    def write(self, data: bytes) -> None:
        if not self.sent:
            self.taken.append(self.conn)
        self.sent += data

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def sent(conn: UpstreamConnection) -> bytes:
    return cast(Transport, conn.transport).sent


def closed(conn: UpstreamConnection) -> bool:
    return cast(Transport, conn.transport).closing


def answer(conn: UpstreamConnection, status: int, body: bytes = b"") -> None:
    """The upstream answers on ``conn``, its response read by the real parser."""
    conn.data_received(b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n\r\n%b" % (status, len(body), body))


class Client:
    """The client connection: what it was written, and what the exchange asked of it."""

    def __init__(self, route: Route, loop: Loop) -> None:
        self._route = route
        self.loop = cast(asyncio.AbstractEventLoop, loop)
        self.client_ip = b"10.0.0.1"
        self.draining = False
        self.write_paused = False
        self.source: Source | None = None
        self.written = b""
        self.answer = Http1Answer(self.write)
        self.deadline = 0.0
        self.done: list[tuple[bool, bool]] = []
        self.records: list[tuple[Any, ...]] = []

    def route(self, authority: bytes | None) -> Route | tuple[Reason, str]:
        return self._route

    def egress(self, authority: bytes, proxied: bool) -> Route | tuple[Reason, str] | None:
        return None

    def relay_to(
        self, destination: tuple[str, int], first: bytes, opened: Callable[[bool], None]
    ) -> None:
        raise AssertionError("no CONNECT here")

    def source_allows(self, max_requests: int) -> bool:
        return True

    def write(self, data: bytes) -> None:
        self.written += data

    def cork(self) -> None:
        pass

    def uncork(self) -> None:
        pass

    def pause_reading(self, reason: str, paused: bool) -> None:
        pass

    def expect_route_at(self, when: float) -> None:
        self.deadline = when

    def become_tunnel(self) -> None:
        pass

    def exchange_done(self, ex: object, *, close: bool, abort: bool) -> None:
        self.done.append((close, abort))

    def record(self, *entry: Any) -> None:
        self.records.append(entry)


class Mesh:
    """One service of two endpoints (round robin) and one client request at a time."""

    def __init__(self, **policy: Any) -> None:
        self.clock = FakeClock()
        self.loop = Loop(self.clock)
        exclusions = Exclusions()
        endpoints = [Endpoint(address="10.0.1.1", port=80), Endpoint(address="10.0.1.2", port=80)]
        self.taken: list[UpstreamConnection] = []
        self.stats = [EndpointStats(self.clock.now, exclusions) for _ in endpoints]
        fake_loop = cast(asyncio.AbstractEventLoop, self.loop)
        self.pools = [
            Pool(e, stats=s, loop=fake_loop) for e, s in zip(endpoints, self.stats, strict=True)
        ]
        for pool in self.pools:  # two idle connections each: no connect needed
            for _ in range(2):
                conn = UpstreamConnection(pool)
                conn.connection_made(cast(asyncio.Transport, Transport(self.taken, conn)))
                pool.release(conn)
        members = [Member(e, s) for e, s in zip(endpoints, self.stats, strict=True)]
        parsed = parse_policy(
            {"lb": "round_robin", "outlier": {"consecutive_failures": 0}, **policy}
        )
        self.service = ServiceState("svc")
        by_address = {e.address: p for e, p in zip(endpoints, self.pools, strict=True)}
        self.route = Route(
            "svc",
            parsed,
            balancer.make(parsed, members, self.clock),
            lambda e: by_address[e.address],
            self.service,
            clock=self.clock,
        )
        self.client = Client(self.route, self.loop)

    def request(self, *headers: tuple[bytes, bytes], method: bytes = b"GET") -> Exchange:
        head = http1.parse_request_head(method, b"/", "1.1", [(b"host", b"svc"), *headers], True)
        ex = Exchange(self.client, head)
        ex.request_complete()  # (a request without a body: whole before it starts)
        ex.start()
        return ex

    def conns(self) -> list[UpstreamConnection]:
        """Every connection used, in the order they were taken."""
        return list(self.taken)

    def ring(self, ex: Exchange) -> None:
        """Move the clock to what is due next, a timer's or the connection's deadline."""
        timers = [t for t in self.loop.timers if not t.cancelled]
        timer = min(timers, key=lambda t: t.at, default=None)
        if timer is not None and timer.at <= self.client.deadline:
            self.loop.timers.remove(timer)
            self.clock.now = max(self.clock.now, timer.at)
            timer.callback()
        else:
            self.clock.now = max(self.clock.now, self.client.deadline)
            ex.route_timeout()

    def status(self) -> int:
        line = self.client.written.split(b"\r\n", 1)[0]
        return int(line.split()[1])


def sent_header(conn: UpstreamConnection, name: bytes) -> bytes:
    for line in sent(conn).split(b"\r\n"):
        if line.startswith(name + b": "):
            return line.split(b": ")[1]
    return b""


def attempt_header(conn: UpstreamConnection) -> bytes:
    return sent_header(conn, b"x-meshlet-attempt")


def test_a_retriable_status_is_retried_on_the_other_endpoint() -> None:
    mesh = Mesh()
    ex = mesh.request()
    (first,) = mesh.conns()
    answer(first, 503)
    assert mesh.client.written == b""  # the 503 goes nowhere
    assert (ex.state, closed(first)) == (State.BACKOFF, True)
    mesh.ring(ex)  # the backoff
    _, second = mesh.conns()
    assert (first.pool is not second.pool, attempt_header(second)) == (True, b"2")
    answer(second, 200, b"ok")
    assert mesh.status() == 200
    assert mesh.client.written.endswith(b"\r\n\r\nok")
    assert (mesh.service.retries, mesh.service.retry_reasons) == (1, {"503": 1})
    assert ([s.failures for s in mesh.stats], [s.in_flight for s in mesh.stats]) == (
        [1, 0],
        [0, 0],
    )
    assert mesh.client.done == [(False, False)]
    assert isinstance(second.pool, Pool)
    assert second.pool.statistics().idle == 2  # back to its pool for the next request


def test_each_member_keeps_the_pool_its_first_try_found() -> None:
    """the pool is asked of the route once a member (``Dispatch._send_to``), then kept"""
    mesh = Mesh()
    asked: list[Endpoint] = []
    find = mesh.route.pool_for

    def pool_for(endpoint: Endpoint) -> Pool:
        asked.append(endpoint)
        return find(endpoint)

    object.__setattr__(mesh.route, "pool_for", pool_for)
    for _ in range(4):  # round robin: two requests each
        mesh.request()
        answer(mesh.conns()[-1], 200)
        assert mesh.status() == 200
    assert [m.pool for m in mesh.route.balancer.members] == mesh.pools
    assert sorted(e.address for e in asked) == ["10.0.1.1", "10.0.1.2"]  # once each


def test_a_retried_429_is_no_failure_of_the_endpoint() -> None:
    mesh = Mesh(retry_on=[429])
    ex = mesh.request()
    answer(mesh.conns()[0], 429)
    mesh.ring(ex)
    answer(mesh.conns()[1], 200)
    assert mesh.status() == 200
    assert [s.failures for s in mesh.stats] == [0, 0]


def test_a_post_gets_the_upstreams_answer() -> None:
    mesh = Mesh(retry_on=[500])
    mesh.request((b"content-length", b"0"), method=b"POST")
    answer(mesh.conns()[0], 500)
    assert (mesh.status(), len(mesh.conns())) == (500, 1)


def test_a_stalled_try_times_out_and_the_retry_answers() -> None:
    mesh = Mesh(timeout_ms=2000)
    started = mesh.clock.now
    ex = mesh.request()
    mesh.ring(ex)  # the per-try timeout: 2000 ms / (1 retry + 1)
    assert mesh.clock.now == pytest.approx(started + 1.0)
    (stalled,) = mesh.conns()
    assert closed(stalled)
    mesh.ring(ex)  # the backoff
    answer(mesh.conns()[1], 200)
    assert mesh.status() == 200
    assert mesh.service.retry_reasons == {"timeout": 1}


def test_the_budget_caps_retries_and_the_upstreams_answer_goes_through() -> None:
    mesh = Mesh(retry_budget={"ratio": 0, "min_per_s": 0})
    mesh.request()
    answer(mesh.conns()[0], 503)
    assert (mesh.status(), mesh.service.budget.suppressed) == (503, 1)


def test_a_hedged_try_answers_for_a_stalled_first_try() -> None:
    mesh = Mesh(hedge={"after_ms": 50})
    ex = mesh.request()
    mesh.ring(ex)  # the hedge
    first, hedge = mesh.conns()
    assert (attempt_header(first), attempt_header(hedge)) == (b"1", b"2")
    answer(hedge, 200)
    assert mesh.status() == 200
    assert closed(first)  # the loser is let go
    assert (mesh.service.hedges, mesh.service.hedges_won) == (1, 1)
    assert [s.in_flight for s in mesh.stats] == [0, 0]


def test_the_first_try_wins_when_it_answers_first() -> None:
    mesh = Mesh(hedge={"after_ms": 50})
    ex = mesh.request()
    mesh.ring(ex)
    first, hedge = mesh.conns()
    answer(first, 200, b"first")
    assert mesh.client.written.endswith(b"first")
    assert closed(hedge)
    assert (mesh.service.hedges, mesh.service.hedges_won) == (1, 0)
    assert [s.in_flight for s in mesh.stats] == [0, 0]


def test_a_hedge_answering_503_leaves_the_first_try_to_answer() -> None:
    mesh = Mesh(hedge={"after_ms": 50})
    ex = mesh.request()
    mesh.ring(ex)
    first, hedge = mesh.conns()
    answer(hedge, 503)
    assert mesh.client.written == b""
    answer(first, 200)
    assert mesh.status() == 200


def test_a_spent_deadline_is_504_at_once_with_nothing_sent() -> None:
    mesh = Mesh()
    mesh.request((b"x-meshlet-deadline-ms", b"0"))
    assert mesh.status() == 504
    assert b"x-meshlet-error: upstream-timeout" in mesh.client.written
    assert mesh.conns() == []


def test_the_callers_deadline_ends_the_wait_without_a_retry() -> None:
    mesh = Mesh()
    started = mesh.clock.now
    ex = mesh.request((b"x-meshlet-deadline-ms", b"300"))
    (conn,) = mesh.conns()
    assert 299 <= int(sent_header(conn, b"x-meshlet-deadline-ms")) <= 300
    mesh.ring(ex)
    assert mesh.clock.now == pytest.approx(started + 0.3)
    assert mesh.status() == 504
    assert b"no response within the caller's deadline" in mesh.client.written
    assert (closed(conn), len(mesh.conns()), mesh.service.retries) == (True, 1, 0)
    assert mesh.stats[0].failures == 1


def test_the_deadline_header_is_the_tries_time_left() -> None:
    mesh = Mesh()  # 15 s, one retry: 7.5 s a try
    mesh.request()
    assert b"x-meshlet-deadline-ms: 7500" in sent(mesh.conns()[0])


def test_a_trys_latency_counts_from_its_connection_up_not_from_its_connect() -> None:
    """A try that had to open a connection: its endpoint's latency is from the connection
    up to the response head (Linkerd's peak EWMA measures on a ready connection); a connect
    that fails is a failure all the same."""
    mesh = Mesh()
    member = mesh.route.balancer.members[0]
    attempt = Attempt(mesh.route, member)
    mesh.clock.advance(0.200)  # the connect and its TLS handshake
    attempt.connected()
    mesh.clock.advance(0.010)
    attempt.record(False)
    attempt.end()
    stats = mesh.stats[0].statistics(mesh.clock.now)
    # a peak EWMA takes a sample above its estimate at once: 210 ms, had the connect counted
    assert stats.rtt_ms < 50
    failing = Attempt(mesh.route, mesh.route.balancer.members[1])
    mesh.clock.advance(0.200)  # a connect timing out
    failing.record(True)
    failing.end()
    assert mesh.stats[1].failures == 1
