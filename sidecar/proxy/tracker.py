"""The client connections of one listener (``ConnectionTracker``): for draining and statistics,
what they may take of it (``limits``), and where their requests are recorded (metrics and the
access log).
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from typing import TYPE_CHECKING, Protocol

from sidecar.clock import wall
from sidecar.errors import Reason
from sidecar.http.http1 import RequestHead
from sidecar.proxy.egress import Egress
from sidecar.proxy.guard import InboundGuard
from sidecar.proxy.h2guard import H2Counters, H2Limits
from sidecar.proxy.intercept import Interception
from sidecar.proxy.limits import Admission, ListenerCounters, ListenerLimits, Source
from sidecar.proxy.routing import Route
from sidecar.telemetry.accesslog import AccessLog
from sidecar.telemetry.stats import BOUNDS, RequestStats

if TYPE_CHECKING:
    from control_plane.wire import Endpoint


class Tracked(Protocol):
    """What a tracker asks of a client connection (``listener.Downstream``)."""

    client_ip: bytes
    source: Source | None
    transport: asyncio.Transport | None

    def drain(self) -> None:
        """Finish what is in flight, then close."""
        ...


class ConnectionTracker:
    """The client connections of one listener, for draining and statistics, and what they
    may take of it (``limits``)."""

    def __init__(
        self,
        direction: str = "outbound",
        service: str = "",
        *,
        metrics: bool = True,
        access_log: AccessLog | None = None,
        limits: ListenerLimits | None = None,
        interception: Interception | None = None,
        egress: Egress | None = None,
        guard: InboundGuard | None = None,
        h2_limits: H2Limits | None = None,
    ) -> None:
        self.direction = direction
        #: the service every request here is for (inbound: this sidecar's); "": by route
        self.service = service
        self.connections: set[Tracked] = set()
        self.draining = False
        #: requests answered before they had a service (no route, malformed), for /metrics
        self.unrouted = RequestStats() if metrics else None
        self.access_log = access_log
        self.limits = limits or ListenerLimits()
        self.counters = ListenerCounters()
        self.admission = Admission(self.limits, self.counters)
        #: what becomes of connections ``meshlet iptables`` redirected here (None: not read)
        self.interception = interception
        #: outbound: the way out of the mesh, for hosts it does not know
        self.egress = egress
        #: inbound: mesh TLS and who may call (None: plaintext only, anyone)
        self.guard = guard
        #: what an HTTP/2 client connection may ask (``h2guard``), and what they did
        self.h2_limits = h2_limits or H2Limits()
        self.h2 = H2Counters()

    def __repr__(self) -> str:
        return (
            f"<ConnectionTracker {self.direction} [{len(self.connections)} connections, "
            f"{self.admission.sources()} sources{', draining' if self.draining else ''}]>"
        )

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
        call's, -1 if none): into the metrics (its route's service, else ``unrouted``) and
        the access log."""
        stats = route.service.requests if route is not None else self.unrouted
        if stats is not None:
            # (``RequestStats.record``, inline once its status class has been seen: once a
            # request, a Python call fewer)
            code = status // 100 if 100 <= status < 600 else 0
            counts = stats.buckets[code]
            if counts is None:
                stats.record(status, seconds)
            else:
                counts[bisect_left(BOUNDS, seconds)] += 1
                stats.sums[code] += seconds
            if grpc_status >= 0:
                stats.record_grpc(grpc_status)
        if self.access_log is not None:
            service = self.service or (route.name if route is not None else "")
            started = wall() - seconds
            entry = (started, self.direction, service, head, status, seconds, endpoint)
            self.access_log.add((*entry, attempts, error, grpc_status))

    def rejected(self, reason: Reason, seconds: float) -> None:
        """A request the connection answered itself before it became an exchange."""
        self.record(None, None, reason.status, seconds, error=reason.code)

    def add(self, ds: Tracked) -> bool:
        """A new connection: False when a limit refuses it (it is to be closed at once)."""
        admitted, ds.source = self.admission.admit(ds.client_ip)
        if admitted:
            self.connections.add(ds)
        return admitted

    def discard(self, ds: Tracked) -> None:
        if ds in self.connections:
            self.connections.remove(ds)
            self.admission.release(ds.source)

    def source_limit(self, max_requests: int) -> int:
        """Requests of ``max_requests`` one source address may have in flight."""
        return self.limits.per_source(max_requests)

    def drain(self) -> None:
        self.draining = True
        for ds in list(self.connections):
            ds.drain()
