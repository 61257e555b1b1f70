"""What one client may take of a listener: connections, a source address's share, the pace
of its bodies, the depth of its pipeline (anchors: nginx ``limit_conn``, Kestrel's
``MinRequestBodyDataRate``/``MinResponseDataRate``, Envoy's per-connection buffer limits).

Plain decisions and counters; ``proxy.Downstream`` asks them and does the I/O.

    max_connections   client connections per listener; more are closed at once
    source_share      inbound: the share of max_connections, and of the app's max_requests,
                      that one source address may hold
    min_rate          a body read from the client, or written to a client whose socket is
                      full, must move at least ``bytes_per_s`` on average after ``grace``
    MAX_PIPELINED     requests parsed and waiting per connection; the rest waits unparsed
"""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass, field, fields
from typing import Final

from sidecar.errors import ConfigError

MAX_PIPELINED: Final = 1000
"""requests parsed and waiting behind the active one on a connection (about 1 KiB each)"""
FD_RESERVE: Final = 128
"""file descriptors kept for everything but client connections (ports, files, the stream)"""
FDS_PER_CONNECTION: Final = 4
"""a client connection and its upstream connection, on each of the two listeners"""


@dataclass(frozen=True, slots=True)
class MinRate:
    """A minimum data rate (Kestrel's: 240 bytes/s after a 5 s grace)."""

    bytes_per_s: float = 240.0
    """bytes per second, averaged since the start; 0 turns it off"""
    grace: float = 5.0
    """seconds before the rate counts"""

    def __post_init__(self) -> None:
        if self.bytes_per_s < 0:
            raise ConfigError("min_data_rate", "must not be negative")
        if self.grace < 0:
            raise ConfigError("data_rate_grace", "must not be negative")

    def deadline(self, since: float, moved: int) -> float:
        """When ``moved`` bytes since ``since`` fall below the rate if no more move (inf:
        never, the rate is off)."""
        if self.bytes_per_s <= 0:
            return math.inf
        return since + max(self.grace, moved / self.bytes_per_s)


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    max_connections: int = 10_000
    """client connections at once; more are closed as they come"""
    source_share: float = 0.0
    """the share (0-1] of ``max_connections`` and of a route's ``max_requests`` that one
    source address may hold; 0: no per-source limit (the outbound listener: one app)"""
    min_rate: MinRate = field(default_factory=MinRate)

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ConfigError("max_connections", "must be at least 1")
        if not 0 <= self.source_share <= 1:
            raise ConfigError("source_share", "must be from 0 to 1")

    def per_source(self, limit: int) -> int:
        """What one source address may hold of ``limit`` (at least 1)."""
        return max(1, int(limit * self.source_share))


class Source:
    """One source address's connections and in-flight requests on a listener."""

    __slots__ = ("address", "connections", "in_flight")

    def __init__(self, address: bytes) -> None:
        self.address = address
        self.connections = 0
        self.in_flight = 0

    def __repr__(self) -> str:
        counts = f"{self.connections} connections, {self.in_flight} in flight"
        return f"<Source {self.address.decode(errors='replace')} [{counts}]>"


@dataclass(slots=True)
class ListenerCounters:
    """What a listener's limits did, since the start (``meshlet_listener_*`` metrics)."""

    refused_max_connections: int = 0
    """connections closed at once: the listener had ``max_connections``"""
    refused_source_connections: int = 0
    """connections closed at once: their source address held its share"""
    refused_source_requests: int = 0
    """requests answered 503 ``overloaded``: their source address held its share"""
    request_body_rate: int = 0
    """requests answered 408: the body came slower than the minimum rate"""
    response_rate: int = 0
    """connections closed: the client read its answers slower than the minimum rate"""
    stream_idle: int = 0
    """requests cut: nothing moved either way for ``stream_idle_timeout_ms``"""
    tunnel_idle: int = 0
    """tunnels closed: nothing moved either way for ``tunnel_idle_timeout_ms``"""
    pipeline_full: int = 0
    """reads left unparsed: ``MAX_PIPELINED`` requests were waiting"""
    client_not_reading: int = 0
    """times reading stopped because the client did not read its answers"""
    opaque_streams: int = 0
    """intercepted connections relayed as opaque TCP (not HTTP, or an opaque port)"""
    tls_handshakes: int = 0
    """inbound mesh TLS sessions opened"""
    tls_h2: int = 0
    """of those, sessions whose client chose HTTP/2 by ALPN (``h2``)"""
    tls_failures: int = 0
    """inbound TLS handshakes that failed (no certificate, another CA's, expired, garbage)"""

    def refused(self) -> dict[str, int]:
        return {
            "max_connections": self.refused_max_connections,
            "source_connections": self.refused_source_connections,
            "source_requests": self.refused_source_requests,
        }

    def timeouts(self) -> dict[str, int]:
        return {
            "request_body_rate": self.request_body_rate,
            "response_rate": self.response_rate,
            "stream_idle": self.stream_idle,
            "tunnel_idle": self.tunnel_idle,
        }

    def backpressure(self) -> dict[str, int]:
        return {"pipeline_full": self.pipeline_full, "client_not_reading": self.client_not_reading}

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Admission:
    """Who may open a connection to one listener: the listener's limit, and each source
    address's share of it."""

    def __init__(self, limits: ListenerLimits, counters: ListenerCounters) -> None:
        self.limits = limits
        self.counters = counters
        self.open = 0
        self._sources: dict[bytes, Source] = {}
        self._per_source = limits.per_source(limits.max_connections)

    def __repr__(self) -> str:
        return (
            f"<Admission [{self.open} of {self.limits.max_connections} connections, "
            f"{len(self._sources)} sources]>"
        )

    def admit(self, address: bytes) -> tuple[bool, Source | None]:
        """A new connection from ``address``: may it stay (else it is closed at once, and
        counted), and its ``Source`` (None when sources are not counted)."""
        if self.open >= self.limits.max_connections:
            self.counters.refused_max_connections += 1
            return False, None
        if not self.limits.source_share:
            self.open += 1
            return True, None
        source = self._sources.get(address)
        if source is None:
            source = self._sources[address] = Source(address)
        elif source.connections >= self._per_source:
            self.counters.refused_source_connections += 1
            return False, None
        source.connections += 1
        self.open += 1
        return True, source

    def release(self, source: Source | None) -> None:
        """A connection ``admit`` let in has closed."""
        self.open -= 1
        if source is not None:
            source.connections -= 1
            if source.connections == 0 and source.in_flight == 0:
                self._sources.pop(source.address, None)

    def sources(self) -> int:
        return len(self._sources)


def raise_fd_limit() -> int:
    """Raise this process's soft file-descriptor limit to its hard one (as Go programs and
    nginx's ``worker_rlimit_nofile`` do); the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connections_that_fit(wanted: int, fd_limit: int) -> int:
    """``max_connections`` per listener that ``fd_limit`` descriptors can hold: each client
    connection may need an upstream one, on two listeners (HAProxy sizes ``maxconn`` from
    ``ulimit -n`` the same way); at least 1."""
    return max(1, min(wanted, (fd_limit - FD_RESERVE) // FDS_PER_CONNECTION))
