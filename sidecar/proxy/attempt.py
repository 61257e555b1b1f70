"""One try of a request on one endpoint, and the first try of a hedged request left waiting.

An ``Attempt`` lasts from the pick of its endpoint to the end of its try: the endpoint counts
it in flight meanwhile; a pick of an ejected endpoint whose time is up makes it the probe
(``outlier``); and its outcome (``classify``: failed or not, a Retry-After) goes into the
endpoint's statistics and outlier state once, when its response head came or it failed (a
gRPC call's, when its trailers came: its latency is still the head's).

A ``Hedged`` try is the first try of a request whose hedge (``hedge.after_ms``) was sent: it
keeps its connection and waits for its head while the hedge runs, and hands what it gets to
the exchange that hedged it (a ``HedgeOwner``), which decides whether it wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from control_plane.wire import Endpoint
from sidecar.balancing import outlier
from sidecar.balancing.balancer import Member
from sidecar.balancing.ewma import EndpointStats, Phase
from sidecar.http import http1
from sidecar.http.http1 import RequestHead, ResponseHead
from sidecar.proxy.routing import Route
from sidecar.proxy.upstream import Carrier, ResponseSink
from sidecar.resilience import classify
from sidecar.resilience.tries import Tries


class Attempt:
    """One try's endpoint: in flight there from the pick to the end of the try."""

    __slots__ = ("answered_at", "endpoint", "probing", "route", "stats", "tried_at")

    def __init__(self, route: Route, member: Member) -> None:
        self.route = route
        self.endpoint: Endpoint = member.endpoint
        stats: EndpointStats = member.stats
        self.stats = stats
        now = route.clock.monotonic()
        #: this try probes an ejected endpoint: its outcome restores or ejects it again
        self.probing = False
        if stats.excluded_until > now:  # the balancer chose among all: too few are available
            members = route.balancer.members
            route.service.panic(now, _available(members, now), len(members))
        elif stats.ejection is not None and stats.ejection.phase is Phase.EJECTED:
            outlier.probe(stats)  # an ejected endpoint whose time is up: this try probes it
            self.probing = True
        stats.in_flight += 1
        #: when the try began on the route's clock; 0 once its outcome is recorded
        self.tried_at = now
        #: when its response head came, if its outcome is recorded later (``answered``)
        self.answered_at = 0.0

    def __repr__(self) -> str:
        e = self.endpoint
        what = "probe" if self.probing else "try"
        return f"<Attempt {what} {e.address}:{e.port}{'' if self.tried_at else ', recorded'}>"

    def record(self, failed: bool, retry_after: float | None = None) -> None:
        """How the try went (``classify``): its time to the response head (or to its
        failure), into the endpoint's statistics and outlier state, once. It stays in flight
        until ``end``."""
        if not self.tried_at:
            return
        route, stats = self.route, self.stats
        now = route.clock.monotonic()
        stats.record(now, (self.answered_at or now) - self.tried_at, failed, retry_after)
        self.tried_at = 0.0
        ejection = stats.ejection
        if ejection is None:
            if not failed:
                return
        elif ejection.phase is not Phase.HEALTHY and not self.probing:
            return  # a panic pick of an endpoint that is out: its probe decides
        config, members = route.policy.outlier, route.balancer.members
        if outlier.record(stats, failed, now, config, members, route.name, self.endpoint):
            route.service.ejections += 1

    def connected(self) -> None:
        """The try had to open a connection, and it is up: its latency counts from now, as
        Linkerd's peak EWMA counts from the call on a ready connection. A connect (and mesh
        TLS handshake) is the pool's cost, not the endpoint's: counted, it held a latency
        spike for ~10 s against an endpoint whose idle connections had been closed, sending
        it still less traffic. A connect that fails is a failure all the same."""
        if self.tried_at:
            self.tried_at = self.route.clock.monotonic()

    def answered(self) -> None:
        """The response head came, but not the outcome: a gRPC call's status comes in its
        trailers. Its latency is counted to now when ``record`` comes."""
        if self.tried_at:
            self.answered_at = self.route.clock.monotonic()

    def end(self) -> None:
        """The try is over: the endpoint has it in flight no more. A probe that got no answer
        (its client left, or it was cut) lets the next request probe."""
        self.stats.in_flight -= 1
        if self.probing and self.tried_at:
            outlier.abandon(self.stats, self.route.clock.monotonic())
        self.tried_at = 0.0
        self.probing = False


def _available(members: Sequence[Member], now: float) -> int:
    """How many of ``members`` are not excluded (apart from ``Attempt``: a generator makes
    CPython 3.11 build a closure cell at each call of the function holding it)."""
    return sum(1 for m in members if m.stats.excluded_until <= now)


def elsewhere(route: Route, endpoint: Endpoint | None) -> bool:
    """Whether an endpoint of ``route`` other than ``endpoint`` is available now."""
    now = route.clock.monotonic()
    return any(
        m.endpoint is not endpoint and m.stats.excluded_until <= now for m in route.balancer.members
    )


class HedgeOwner(Protocol):
    """What a hedged first try tells the request that hedged it."""

    tries: Tries
    head: RequestHead
    """the request's (a gRPC call's trailers-only answer is judged by its code)"""

    def hedged_won(self, hedged: Hedged, resp: ResponseHead) -> bool:
        """Its head is the answer (the return is ``ResponseSink.response_head``'s)."""
        ...

    def hedged_lost(
        self, hedged: Hedged, failed: bool, retry_after: float | None = None
    ) -> None: ...


class Hedged(ResponseSink):
    """The first try of a hedged request, still waiting for its response head on its
    connection (as the connection's ``ResponseSink``) while the exchange's hedge runs."""

    __slots__ = ("attempt", "conn", "owner")

    def __init__(self, owner: HedgeOwner, conn: Carrier, attempt: Attempt) -> None:
        self.owner = owner
        self.conn = conn
        self.attempt = attempt

    def __repr__(self) -> str:
        return f"<Hedged {self.attempt.endpoint.address}:{self.attempt.endpoint.port}>"

    def end(self, failed: bool | None = None, retry_after: float | None = None) -> None:
        """This try lost: ``failed`` says how it went (None: nobody knows, it was cut)."""
        self.conn.close()
        if failed is not None:
            self.attempt.record(failed, retry_after)
        self.attempt.end()

    # -- ResponseSink -----------------------------------------------------------------------

    def response_head(self, resp: ResponseHead) -> bool:
        """A usable answer wins; one that ``retry_on`` lists loses (the hedge may still do
        better)."""
        if resp.status < 200:
            return False  # an interim response: the real one follows (no upgrade is hedged)
        outcome = classify.response_head(resp, self.owner.head.grpc)
        if self.owner.tries.listed(outcome):
            retry_after = http1.retry_after(resp) if outcome.pauses else None
            self.owner.hedged_lost(self, outcome.failed, retry_after)
            return False
        return self.owner.hedged_won(self, resp)

    def response_body(self, data: bytes) -> None:
        pass  # (only after a head, and a head that wins makes the exchange the owner)

    def response_trailer(self, name: bytes, value: bytes) -> None:
        pass

    def response_complete(self) -> None:
        pass

    def response_upgraded(self, rest: bytes) -> None:
        pass

    def upstream_failed(self, exc: BaseException | None, protocol_error: bool) -> None:
        self.owner.hedged_lost(self, True)

    def upstream_paused(self, paused: bool) -> None:
        pass
