"""Routing tables: which service a request names, and that service's route.

A ``RoutingTable`` is built once from a ``wire.Table`` (a static file now, a pushed snapshot
later) and never changes; a reload builds a new one and swaps it into the ``TableHolder``
that the listeners route through. Connection pools outlive tables: they are kept per endpoint
address in ``Pools``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

from control_plane import ring
from control_plane.ring import Ring
from control_plane.wire import (
    Endpoint,
    Outlier,
    Policy,
    ServiceEntry,
    Table,
    to_json,
)
from control_plane.wire.spiffe import spiffe_id
from sidecar.balancing import balancer
from sidecar.balancing.balancer import Balancer, Locality, Member
from sidecar.balancing.ewma import EndpointStats, Exclusions
from sidecar.balancing.hashing import KeyOf, key_function
from sidecar.clock import Clock, SystemClock, wall
from sidecar.errors import Reason, TableError
from sidecar.http import http1
from sidecar.http.http1 import RequestHead
from sidecar.proxy.guard import InboundGuard
from sidecar.proxy.pool import Pool
from sidecar.resilience.service import Services, ServiceState
from sidecar.resilience.trypolicy import TryPolicy
from sidecar.telemetry.stats import RequestStats
from sidecar.tls import MeshTls


@dataclass(slots=True)
class Route:
    """Where a request goes: a service's policy, balancer and connection pools."""

    name: str
    policy: Policy
    balancer: Balancer
    pool_for: Callable[[Endpoint], Pool]
    service: ServiceState
    """what outlives tables: limits' counters, the retry budget"""
    key_of: KeyOf | None = None
    """hash policies: the request's key"""
    clock: Clock = field(default_factory=SystemClock)
    """the balancer's clock: try times are measured on it"""
    relay: bool = False
    """the inbound route: no retries; the caller's try number is passed on as it came"""
    external: bool = False
    """a destination outside the mesh (``egress``): sent no ``x-meshlet-*`` headers"""
    tries: TryPolicy = field(init=False)
    """what each request's tries may do: timeouts, retries, hedging, the budget"""
    http1: bool = field(init=False)
    """``protocol: http1``: every request goes upstream over HTTP/1.1 (``h2`` need not be
    asked, once a request)"""

    def __post_init__(self) -> None:
        self.tries = TryPolicy.of(self.policy, relay=self.relay)
        self.http1 = self.policy.protocol == "http1"

    def h2(self, head: RequestHead) -> bool:
        """Whether a request goes upstream over HTTP/2 (``protocol``; ``auto``: as it came).
        An upgrade (WebSocket) goes over HTTP/1.1, where it exists."""
        if self.http1 or head.upgrade:
            return False
        return self.policy.protocol == "http2" or head.version == http1.HTTP2_VERSION


class Router(Protocol):
    def route(self, authority: bytes | None) -> Route | tuple[Reason, str]:
        """The route for a request's authority, or why there is none."""
        ...


_CACHE_LIMIT = 4096


CLUSTER_DOMAIN = "cluster.local"


def service_of(authority: bytes, cluster_domain: str = CLUSTER_DOMAIN) -> str:
    """The name an authority gives: ``payments``, ``Payments:80``, ``payments.mesh`` and
    ``payments.`` give payments; so do Kubernetes' ``payments.NS.svc.CLUSTER-DOMAIN`` and
    ``payments.NS.svc`` give ``payments.NS`` (which names payments if the table has it:
    ``RoutingTable.route``)."""
    host = authority.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host  # an IPv6 literal names no service
    host = host.partition(":")[0].rstrip(".").removesuffix(".mesh")
    if host.endswith(".svc"):
        return host[:-4]
    return host.removesuffix(".svc." + cluster_domain)


class Pools:
    """One connection pool per endpoint address, shared by every table.

    What balancers know of an endpoint (its ``EndpointStats``) is kept from when a table
    first routes to it; its pool only from its first connection: a sidecar calls few of the
    services a large table names, and an empty pool costs ~500 bytes (5 MB per 10,000).
    """

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        max_idle: int = 64,
        idle_timeout: float = 30.0,
        mesh: MeshTls | None = None,
    ) -> None:
        self.clock = clock or SystemClock()
        #: this sidecar's mesh credentials, for endpoints with an identity (None: no mesh TLS)
        self.mesh = mesh
        # the identity each endpoint's sidecar proves over mesh TLS, by address (``secure``)
        self._identities: dict[tuple[str, int], str] = {}
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._stats: dict[tuple[str, int], EndpointStats] = {}
        self._pools: dict[tuple[str, int], Pool] = {}
        self.exclusions = Exclusions()
        """whether any of these endpoints may be out of the pick (``ewma.Exclusions``)"""

    def stats(self, endpoint: Endpoint) -> EndpointStats:
        """The endpoint's stats, made when a table first routes to it (slow start counts
        from then)."""
        key = (endpoint.address, endpoint.port)
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = EndpointStats(self.clock.monotonic(), self.exclusions)
        return stats

    def get(self, endpoint: Endpoint) -> Pool:
        key = (endpoint.address, endpoint.port)
        pool = self._pools.get(key)
        if pool is None:
            pool = Pool(
                endpoint,
                max_idle=self.max_idle,
                idle_timeout=self.idle_timeout,
                stats=self.stats(endpoint),
                mesh=self.mesh,
            )
            pool.rekey(self._identities.get(key, ""))
            self._pools[key] = pool
        return pool

    def find(self, endpoint: Endpoint) -> Pool | None:
        """The endpoint's pool, if anything connected to it yet."""
        return self._pools.get((endpoint.address, endpoint.port))

    def find_stats(self, endpoint: Endpoint) -> EndpointStats | None:
        """The endpoint's stats, if a table routed to it."""
        return self._stats.get((endpoint.address, endpoint.port))

    def secure(self, table: Table) -> None:
        """Which endpoints are called over mesh TLS, and the identity each must prove: those
        whose sidecar said it takes mesh TLS (``tls``), when this sidecar has credentials."""
        found: dict[tuple[str, int], str] = {}
        if self.mesh is not None and table.trust_domain:
            for name, entry in table.services.items():
                for e in entry.endpoints:
                    if e.tls:
                        found[(e.address, e.port)] = spiffe_id(
                            table.trust_domain, e.namespace, name
                        )
        self._identities = found
        for key, pool in self._pools.items():
            pool.rekey(found.get(key, ""))

    def retain(self, endpoints: set[tuple[str, int]]) -> None:
        """Forget endpoints no table routes to any more; close their idle connections."""
        for key in [k for k in self._stats if k not in endpoints]:
            del self._stats[key]
        for key in [k for k in self._pools if k not in endpoints]:
            self._pools.pop(key).close()

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._pools.values())


@dataclass(frozen=True, slots=True)
class TableInfo:
    version: int
    source: str
    loaded_at: float
    """wall-clock seconds"""
    built_at: float = 0.0
    """when the control plane built it (wall clock); 0: unknown (a file)"""

    def age(self, now: float) -> float:
        """Seconds since the control plane built the table, else since it was loaded: a saved
        table a sidecar starts from is as old as its content, not its loading."""
        return now - (self.built_at or self.loaded_at)


class RoutingTable:
    """Built once per table: each service's route, with its balancer over the endpoints that
    are not draining (draining ones only finish what they have).

    A service whose entry is the one of the ``previous`` table (``wire.following`` made it
    so: it did not change) keeps its route, balancer state included, while the locality the
    balancers were made for stays the same: a new version builds only what changed."""

    def __init__(
        self,
        table: Table,
        info: TableInfo,
        pools: Pools,
        services: Services,
        locality: Locality = Locality(),  # noqa: B008
        cluster_domain: str = CLUSTER_DOMAIN,
        previous: RoutingTable | None = None,
    ) -> None:
        self.table = table
        self.info = info
        self.locality = locality
        self.cluster_domain = cluster_domain
        # the namespaces a service's instances are in, where they say (SERVICE.NAMESPACE)
        self._namespaces = {
            name: spaces
            for name, entry in table.services.items()
            if (spaces := frozenset(e.namespace for e in entry.endpoints if e.namespace))
        }
        kept = previous if previous is not None and previous.locality == locality else None
        tries: dict[TryPolicy, TryPolicy] = {}
        self._routes: dict[str, Route] = {
            name: (
                kept._routes[name]
                if kept is not None and kept.table.services.get(name) is entry
                else self._route(name, entry, pools, services.get(name), locality, tries)
            )
            for name, entry in table.services.items()
        }
        #: routes by the authorities requests named, as found (at most ``_CACHE_LIMIT``)
        self.cache: dict[bytes, Route] = {}

    @staticmethod
    def _route(
        name: str,
        entry: ServiceEntry,
        pools: Pools,
        service: ServiceState,
        locality: Locality,
        tries: dict[TryPolicy, TryPolicy],
    ) -> Route:
        """``tries``: the try policies of the table's routes so far: routes of equal policies
        share one (its ``retry_on`` set is 700 bytes: 0.7 MB for 1,000 services)."""
        index: list[int] = []
        members: list[Member] = []
        for e in entry.endpoints:
            index.append(-1 if e.draining else len(members))
            if not e.draining:
                members.append(Member(e, pools.stats(e)))
        policy = entry.policy
        hashing = policy.hashes and bool(members)
        built = _ring(name, entry) if hashing else None
        route = Route(
            name,
            policy,
            balancer.make(policy, members, pools.clock, locality, built, index),
            pools.get,
            service,
            key_function(policy.hash_on) if hashing else None,
            pools.clock,
        )
        route.tries = tries.setdefault(route.tries, route.tries)
        return route

    def route(self, authority: bytes | None) -> Route | tuple[Reason, str]:
        if authority is None:
            return Reason.NO_ROUTE, "the request names no service (no Host header)"
        route = self.cache.get(authority)
        if route is not None:
            return route
        name = service_of(authority, self.cluster_domain)
        route = self._routes.get(name)
        if route is None and name.count(".") == 1:  # Kubernetes' SERVICE.NAMESPACE
            service, _, namespace = name.partition(".")
            spaces = self._namespaces.get(service)
            if spaces is None or namespace in spaces:  # (instances that say none: any)
                route = self._routes.get(service)
        if route is None:
            return Reason.NO_ROUTE, f"no service {name[:100]!r} in the routing table"
        if len(self.cache) < _CACHE_LIMIT:
            self.cache[authority] = route
        return route

    def named(self, name: str) -> Route | None:
        """A service's route by its name (not cached: for the admin port)."""
        return self._routes.get(name)

    def endpoints(self) -> set[tuple[str, int]]:
        return {(e.address, e.port) for s in self.table.services.values() for e in s.endpoints}

    def dump(self) -> dict[str, object]:
        return {
            "version": self.info.version,
            "source": self.info.source,
            "loaded_at": self.info.loaded_at,
            "built_at": self.info.built_at or None,
            "age_s": round(self.info.age(wall()), 3),
            "services": _services_json(self.table),
        }


class TableHolder:
    """The table in force; listeners route through it, reloads swap it."""

    def __init__(
        self,
        pools: Pools,
        *,
        service: str = "",
        zone: str = "",
        services: Services | None = None,
        cluster_domain: str = CLUSTER_DOMAIN,
    ) -> None:
        self.pools = pools
        self.cluster_domain = cluster_domain
        self.services = services or Services()
        self.service = service
        self.zone = zone
        self.current: RoutingTable | None = None
        #: the inbound listener's rules, from each table put in force (None: no inbound)
        self.guard: InboundGuard | None = None

    def route(self, authority: bytes | None) -> Route | tuple[Reason, str]:
        current = self.current
        if current is None:
            return Reason.NO_ROUTE, "no routing table loaded yet"
        # (a route found before, inline: once a request; ``RoutingTable.route`` finds the rest)
        route = current.cache.get(authority) if authority is not None else None
        return route if route is not None else current.route(authority)

    def in_force(self) -> Mapping[str, ServiceEntry]:
        """The services of the table in force (none yet: empty), for the next table to be
        parsed ``following``."""
        return self.current.table.services if self.current is not None else {}

    def install(self, table: Table, source: str) -> RoutingTable:
        """Build the table's routes and put them in force; TableError (nothing changes) if
        a ring does not fit its service."""
        info = TableInfo(table.version, source, wall(), table.built)
        locality = self._locality(table)
        new = RoutingTable(
            table, info, self.pools, self.services, locality, self.cluster_domain, self.current
        )
        self.current = new
        self.pools.secure(table)
        self.pools.retain(new.endpoints())
        if self.guard is not None:
            self.guard.apply(table)
        return new

    def _locality(self, table: Table) -> Locality:
        """Where this sidecar's own service's endpoints are: the callers' share of the zone."""
        own = table.services.get(self.service)
        if not self.zone or own is None or not own.endpoints:
            return Locality(self.zone)
        local = sum(1 for e in own.endpoints if e.zone == self.zone)
        return Locality(self.zone, local / len(own.endpoints))


APP_CONNECT_TIMEOUT_MS = 5_000


class AppRouter:
    """The inbound listener's only route: the local application."""

    def __init__(
        self, endpoint: Endpoint, pools: Pools, *, metrics: bool = True, protocol: str = "http1"
    ) -> None:
        policy = Policy(
            lb="round_robin",
            protocol=protocol,
            retries=0,
            # A busy app whose accept queue is full drops the SYN, and the kernel sends it again
            # only after 1 s (its first retransmission timeout): 1 s, the outbound default,
            # turned a slow accept into a 502. Envoy's default, 5 s, outlasts two retransmissions.
            connect_timeout_ms=APP_CONNECT_TIMEOUT_MS,
            outlier=Outlier(consecutive_failures=0, failure_rate_percent=0),
        )
        members = [Member(endpoint, pools.get(endpoint).stats)]
        self.service = ServiceState("app", requests=RequestStats() if metrics else None)
        self._route = Route(
            "app",
            policy,
            balancer.make(policy, members, pools.clock),
            pools.get,
            self.service,
            clock=pools.clock,
            relay=True,
        )

    def route(self, authority: bytes | None) -> Route | tuple[Reason, str]:
        return self._route


_ENDPOINT_FIELDS: Final = tuple(f.name for f in dataclasses.fields(Endpoint))


def _services_json(table: Table) -> dict[str, object]:
    """The table's services as ``to_json`` gives them, built in one pass: ``to_json`` copies a
    document twice over (``asdict``, then tuples to lists), a policy per service included,
    and for 1,000 services x 10 endpoints that garbage left the sidecar 10 MB larger after
    each ``/config_dump``. A policy's JSON is made once and shared by the services that share
    the policy; an endpoint's fields are taken as they are (none is a tuple)."""
    policies: dict[Policy, dict[str, object]] = {}
    services: dict[str, object] = {}
    for name, entry in table.services.items():
        policy = policies.get(entry.policy)
        if policy is None:
            policy = policies[entry.policy] = to_json(entry.policy)
        services[name] = {
            "policy": policy,
            "endpoints": [{f: getattr(e, f) for f in _ENDPOINT_FIELDS} for e in entry.endpoints],
            "ring": None if entry.ring is None else dict(entry.ring),
        }
    return services


def _ring(name: str, entry: ServiceEntry) -> Ring:
    """The ring the control plane pushed, or (a static file) one built here the same way."""
    if entry.ring is not None:
        try:
            return ring.decode(entry.ring, len(entry.endpoints))
        except ring.RingError as e:
            raise TableError(f"services.{name}.ring: {e}") from None
    live = [e for e in entry.endpoints if not e.draining]
    built = ring.build(
        entry.policy.lb,
        [e.instance or f"{e.address}:{e.port}" for e in live],
        [e.weight for e in live],
    )
    positions = [i for i, e in enumerate(entry.endpoints) if not e.draining]
    owners = type(built.owners)(built.owners.typecode, (positions[o] for o in built.owners))
    return Ring(built.algorithm, owners, built.points)
