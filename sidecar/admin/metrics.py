"""The sidecar's Prometheus metrics, served at ``/metrics`` on the admin and metrics ports.

Nothing on the data path touches a metrics library: a request is recorded into plain lists
(``RequestStats``: a bisect and two increments), and the counters the resilience code keeps
anyway (``ServiceState``) are read as they are. At scrape time ``SidecarMetrics`` turns all
of it, and the process's own figures, into metric families (``exposition``) and writes them
out. (No prometheus-client: it would cost the sidecar about 4 MB of its idle memory.)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from itertools import chain
from typing import TYPE_CHECKING

from sidecar.admin.exposition import Family, Rows, chunks, counter, gauge, histogram
from sidecar.admin.process import ProcessMetrics
from sidecar.balancing.ewma import EndpointStats, Phase
from sidecar.clock import wall
from sidecar.http import grpc
from sidecar.telemetry.stats import BUCKETS, CODES, RequestStats

if TYPE_CHECKING:
    from control_plane.wire import ServiceEntry
    from sidecar.admin.view import SidecarView
    from sidecar.resilience.service import ServiceState

MAX_ENDPOINT_SERIES = 100
"""a service with more endpoints gets no per-endpoint series (cardinality)"""
#: metric: (its key in ``ServiceState.counters()``, help)
SERVICE_COUNTERS = {
    "meshlet_retries_suppressed": ("retries_suppressed", "retries the retry budget refused"),
    "meshlet_retries_over_limit": ("retries_over_limit", "retries max_retries refused"),
    "meshlet_retries_unsent": (
        "retries_unsent",
        "retries of tries none of which was sent, resent elsewhere at once",
    ),
    "meshlet_hedges": ("hedges", "hedged tries sent"),
    "meshlet_outlier_ejections": ("ejections", "endpoints ejected"),
    "meshlet_overloaded": ("overloaded", "requests refused by a limit (503 overloaded)"),
    "meshlet_panics": ("panics", "picks among all endpoints, too few available"),
}
ENDPOINT_STATES = ("healthy", "ejected", "probing", "paused", "draining")


class SidecarMetrics:
    """Everything ``/metrics`` shows, read from the sidecar when Prometheus scrapes."""

    def __init__(self, sidecar: SidecarView) -> None:
        self.sidecar = sidecar
        self.process = ProcessMetrics()

    def __repr__(self) -> str:
        return f"<SidecarMetrics {self.sidecar.config.service}>"

    def chunks(self) -> Iterator[bytes]:
        """The text exposition (``exposition.CONTENT_TYPE``), in pieces produced as they are
        taken: the sidecar's families, then the process's."""
        return chunks(chain(self.collect(), self.process.families()))

    def collect(self) -> Iterator[Family]:
        outbound = self.sidecar.services.states()
        yield from self._requests(outbound)
        retries = counter(
            "meshlet_upstream_retries", "retries by what failed", labels=["service", "reason"]
        )
        for state in outbound:
            for reason, n in sorted(state.retry_reasons.items()):
                retries.add([state.name, reason], n)
        yield retries
        counters = [state.counters() for state in outbound]
        for name, (key, doc) in SERVICE_COUNTERS.items():
            family = counter(name, doc, labels=["service"])
            for state, values in zip(outbound, counters, strict=True):
                family.add([state.name], values[key])
            yield family
        yield from self._endpoints()
        yield from self._table()
        yield from self._identity()
        yield from self._listeners()

    def _identity(self) -> Iterator[Family]:
        """The workload certificate (``--mtls on`` with a control plane only)."""
        identity = self.sidecar.identity
        if identity is None:
            return
        yield gauge(
            "meshlet_identity_expiry_seconds",
            "until the workload certificate in force expires (0: none in force)",
            value=identity.seconds_to_expiry(),
        )
        yield counter(
            "meshlet_identity_rotations",
            "workload certificates installed in place of an earlier one",
            value=identity.rotations,
        )
        errors = counter(
            "meshlet_identity_errors",
            "CSRs and certificates that came to nothing, and certificates that expired",
            labels=["reason"],
        )
        for reason, n in identity.errors.items():
            errors.add([reason], n)
        yield errors

    def _listeners(self) -> Iterator[Family]:
        """Client connections per listener, and what its limits did (``limits``)."""
        sc = self.sidecar
        trackers = (sc.outbound, sc.inbound)
        open_ = gauge(
            "meshlet_listener_connections", "client connections open", labels=["direction"]
        )
        refused = counter(
            "meshlet_listener_refused",
            "connections closed at once, or requests answered 503, by a listener limit",
            labels=["direction", "limit"],
        )
        timeouts = counter(
            "meshlet_listener_timeouts",
            "requests and connections ended for their pace or their silence",
            labels=["direction", "timeout"],
        )
        backpressure = counter(
            "meshlet_listener_backpressure",
            "times a client connection stopped being read (a pipeline full, a client not "
            "reading its answers)",
            labels=["direction", "cause"],
        )
        opaque = counter(
            "meshlet_listener_opaque_streams",
            "intercepted connections relayed as TCP, unparsed (not HTTP, or an opaque port)",
            labels=["direction"],
        )
        handshakes = counter(
            "meshlet_listener_tls_handshakes",
            "mesh TLS sessions a listener's clients opened (ok) or whose handshake failed: no "
            "certificate, another CA's, expired, not TLS",
            labels=["direction", "result"],
        )
        sessions = counter(
            "meshlet_listener_tls_sessions",
            "mesh TLS sessions a listener's clients opened, by the protocol chosen by ALPN (h2: "
            "HTTP/2; http/1.1 also when the client offered none)",
            labels=["direction", "alpn"],
        )
        forbidden = counter(
            "meshlet_inbound_forbidden",
            "requests refused 403 by the service's allow_from or mtls: strict, by caller "
            "(a service, or plaintext)",
            labels=["caller"],
        )
        h2_connections = counter(
            "meshlet_h2_connections",
            "client connections that spoke HTTP/2 (h2c, prior knowledge, or h2 over mesh TLS)",
            labels=["direction"],
        )
        h2_streams = counter(
            "meshlet_h2_streams", "HTTP/2 streams (requests) clients opened", labels=["direction"]
        )
        h2_refused = counter(
            "meshlet_h2_refused",
            "HTTP/2 client connections closed with a GOAWAY for a limit they broke (rapid "
            "reset, CONTINUATION or SETTINGS or PING flood, header size, streams) or an error "
            "of the protocol",
            labels=["direction", "reason"],
        )
        guard = sc.inbound.guard
        for caller, n in sorted((guard.forbidden if guard is not None else {}).items()):
            forbidden.add([caller], n)
        for tracker in trackers:
            direction = tracker.direction
            open_.add([direction], len(tracker.connections))
            counters = tracker.counters
            opaque.add([direction], counters.opaque_streams)
            handshakes.add([direction, "ok"], counters.tls_handshakes)
            handshakes.add([direction, "failed"], counters.tls_failures)
            if counters.tls_handshakes:
                sessions.add([direction, "h2"], counters.tls_h2)
                sessions.add([direction, "http/1.1"], counters.tls_handshakes - counters.tls_h2)
            h2 = tracker.h2
            h2_connections.add([direction], h2.connections)
            h2_streams.add([direction], h2.streams)
            for reason, n in h2.refused.items():
                h2_refused.add([direction, reason], n)
            for family, values in (
                (refused, counters.refused()),
                (timeouts, counters.timeouts()),
                (backpressure, counters.backpressure()),
            ):
                for name, n in values.items():
                    family.add([direction, name], n)
        yield open_
        yield refused
        yield timeouts
        yield backpressure
        yield opaque
        yield handshakes
        yield sessions
        yield forbidden
        yield h2_connections
        yield h2_streams
        yield h2_refused

    def _requests(self, outbound: list[ServiceState]) -> Iterator[Family]:
        sc = self.sidecar
        labels = ["direction", "service", "code"]
        total = counter("meshlet_requests", "requests answered, by status class", labels=labels)
        duration = histogram(
            "meshlet_request_duration_seconds",
            "from the request head to the end of the response",
            labels=labels,
        )
        sources: list[tuple[str, str, RequestStats | None]] = [
            ("outbound", state.name, state.requests) for state in outbound
        ]
        sources.append(("inbound", sc.config.service, sc.app_router.service.requests))
        sources += [
            ("outbound", "", sc.outbound.unrouted),
            ("inbound", "", sc.inbound.unrouted),
        ]
        grpc_calls = counter(
            "meshlet_grpc_responses",
            "gRPC calls answered, by grpc-status (the sidecar's own answers too; a code "
            "outside the 17 is other)",
            labels=labels,
        )
        bounds = [*(repr(b) for b in BUCKETS), "+Inf"]
        for direction, service, stats in sources:
            if stats is None:
                continue
            for code, n in enumerate(stats.grpc or ()):
                if n:
                    grpc_calls.add([direction, service, grpc.name(code)], n)
            for code, name in enumerate(CODES):
                counts = stats.buckets[code]
                if counts is None:
                    continue
                n = sum(counts)
                key = [direction, service, name]
                total.add(key, n)
                running, cumulative = 0, []
                for bound, c in zip(bounds, counts, strict=True):
                    running += c
                    cumulative.append((bound, running))
                duration.add_histogram(key, cumulative, stats.sums[code])
        yield total
        yield duration
        yield grpc_calls

    def _endpoints(self) -> Iterator[Family]:
        """Per endpoint (10,000 of them in a 1,000 x 10 table: rows, see ``exposition``) and
        per service, of the table in force when the scrape began."""
        sc = self.sidecar
        table = sc.tables.current
        services = table.table.services if table else {}
        called = self._called(services)
        labels = ["service", "endpoint"]
        yield gauge(
            "meshlet_endpoint_state",
            f"1 for each endpoint's state (services this sidecar called, of up to "
            f"{MAX_ENDPOINT_SERIES} endpoints)",
            labels=["service", "endpoint", "state"],
            rows=self._endpoint_states(called, sc.pools.clock.monotonic()),
        )
        yield counter(
            "meshlet_endpoint_tries",
            "tries answered or failed, per endpoint",
            labels=labels,
            rows=self._endpoint_counts(called, failures=False),
        )
        yield counter(
            "meshlet_endpoint_failures",
            "tries that failed (5xx, reset, timeout, refused connect, a gRPC status that "
            "means a 5xx), per endpoint",
            labels=labels,
            rows=self._endpoint_counts(called, failures=True),
        )
        connections = gauge(
            "meshlet_upstream_connections",
            "pooled connections to the service's endpoints",
            labels=["service", "state"],
        )
        handshakes = counter(
            "meshlet_upstream_tls_handshakes",
            "mesh TLS sessions opened to the service's endpoints, by the protocol chosen by "
            "ALPN (h2: HTTP/2)",
            labels=["service", "alpn"],
        )
        for name, entry in services.items():
            idle = busy = h2 = tls = tls_h2 = 0
            for e in entry.endpoints:
                pool = sc.pools.find(e)
                if pool is not None:
                    counts = pool.statistics()
                    idle += counts.idle
                    busy += counts.busy
                    h2 += counts.h2_connections
                    tls += pool.tls_handshakes
                    tls_h2 += counts.tls_h2
            connections.add([name, "idle"], idle)
            connections.add([name, "busy"], busy)
            if h2:  # (HTTP/2 connections carry many requests: neither idle nor busy)
                connections.add([name, "http2"], h2)
            if tls:
                handshakes.add([name, "h2"], tls_h2)
                handshakes.add([name, "http/1.1"], tls - tls_h2)
        yield connections
        yield handshakes

    def _called(self, services: Mapping[str, ServiceEntry]) -> list[tuple[str, ServiceEntry]]:
        """The services whose endpoints get series: those of up to ``MAX_ENDPOINT_SERIES``
        endpoints that this sidecar has sent a try to (one endpoint tried or with one in
        flight). A table names every service of the mesh (10,000 endpoints for 1,000 x 10:
        6.1 MB a scrape), a sidecar calls a few; as Envoy keeps per-host stats off and
        Linkerd labels only the destinations it saw traffic to."""
        find = self.sidecar.pools.find_stats
        called = []
        for name, entry in services.items():
            if len(entry.endpoints) > MAX_ENDPOINT_SERIES:
                continue
            for e in entry.endpoints:
                stats = find(e)
                if stats is not None and (stats.tries or stats.in_flight):
                    called.append((name, entry))
                    break
        return called

    def _endpoint_states(self, services: list[tuple[str, ServiceEntry]], now: float) -> Rows:
        """Each endpoint's state as five series, one of them 1."""
        for name, entry in services:
            for e in entry.endpoints:
                where = f"{e.address}:{e.port}"
                current = endpoint_state(e.draining, self.sidecar.pools.find_stats(e), now)
                for s in ENDPOINT_STATES:
                    yield [name, where, s], float(s == current)

    def _endpoint_counts(self, services: list[tuple[str, ServiceEntry]], failures: bool) -> Rows:
        """Each endpoint's tries, or failures, once it has statistics."""
        for name, entry in services:
            for e in entry.endpoints:
                stats = self.sidecar.pools.find_stats(e)
                if stats is not None:
                    yield (
                        [name, f"{e.address}:{e.port}"],
                        stats.failures if failures else stats.tries,
                    )

    def _table(self) -> Iterator[Family]:
        sc = self.sidecar
        table = sc.tables.current
        yield gauge(
            "meshlet_table_version",
            "the routing table in force (0: none yet)",
            value=table.info.version if table else 0,
        )
        yield gauge(
            "meshlet_table_age_seconds",
            "since the control plane built the table in force (a file's: since it was loaded; "
            "NaN: none yet)",
            value=table.info.age(wall()) if table else math.nan,
        )
        if sc.discovery is not None:
            yield gauge(
                "meshlet_control_plane_connected",
                "1 while the push stream is up",
                value=float(sc.discovery.connected),
            )
            yield counter(
                "meshlet_control_plane_failovers",
                "streams welcomed by another control-plane address than the stream before "
                "(replicas: --control-plane lists several, or its name resolves to several)",
                value=sc.discovery.failover.failovers,
            )
        if sc.access_log is not None:
            yield counter(
                "meshlet_access_log_dropped",
                "access log lines dropped (the writer fell behind, or writing failed)",
                value=sc.access_log.dropped,
            )
        if sc.health is not None:
            yield gauge(
                "meshlet_app_healthy",
                "1 while the app passes its health check",
                value=float(sc.health.healthy),
            )


def endpoint_state(draining: bool, stats: EndpointStats | None, now: float) -> str:
    """One word for an endpoint: draining, ejected or probing (outlier ejection), paused
    (``Retry-After``), or healthy."""
    if draining:
        return "draining"
    if stats is not None:
        ejection = stats.ejection
        if ejection is not None and ejection.phase is not Phase.HEALTHY:
            return ejection.phase.name.lower()
        if stats.excluded_until > now:
            return "paused"
    return "healthy"
