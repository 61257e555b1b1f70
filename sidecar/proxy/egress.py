"""Requests for hosts the mesh does not know (Istio's ``outboundTrafficPolicy``).

Under ``allow_any`` (the default) a request that was going somewhere else, an intercepted
connection's (its original destination) or an ``http_proxy`` client's absolute-form request
(its host, resolved), is passed through to there; under ``registry_only`` it is answered
``502 no-route``. A request made to the sidecar itself with a ``Host`` it does not know is
answered ``404 no-route`` either way: it was going nowhere else.

Passed-through requests are counted as the service ``passthrough``; each destination gets a
route of one endpoint, no retries and no ejection, made on first use and kept for the last
``MAX_DESTINATIONS`` destinations (a client names them: they are bounded). Their connections
pool in pools of their own, which routing tables do not prune.
"""

from __future__ import annotations

from typing import Final

from control_plane.wire import Endpoint, Outlier, Policy, WireError
from sidecar.balancing import balancer
from sidecar.balancing.balancer import Member
from sidecar.config import OUTBOUND_POLICIES
from sidecar.errors import Reason
from sidecar.proxy.routing import Pools, Route, TableHolder

ALLOW_ANY, REGISTRY_ONLY = OUTBOUND_POLICIES
#: the service passed-through requests count as
PASSTHROUGH: Final = "passthrough"
MAX_DESTINATIONS: Final = 1024
_POLICY: Final = Policy(
    lb="round_robin",
    retries=0,
    outlier=Outlier(consecutive_failures=0, failure_rate_percent=0),
)


class Egress:
    """The outbound listener's way out of the mesh."""

    def __init__(self, tables: TableHolder, policy: str = ALLOW_ANY) -> None:
        if policy not in OUTBOUND_POLICIES:
            raise ValueError(f"outbound policy {policy!r}: one of {', '.join(OUTBOUND_POLICIES)}")
        self.tables = tables
        self.policy = policy
        self.pools = Pools(clock=tables.pools.clock)
        self._routes: dict[tuple[str, int], Route] = {}

    def __repr__(self) -> str:
        return f"<Egress {self.policy} [{len(self._routes)} destinations]>"

    def route(
        self, authority: bytes, original: tuple[str, int] | None
    ) -> Route | tuple[Reason, str]:
        """The route out for a request the table has no service for: to ``original`` (an
        intercepted connection's destination), else to ``authority``."""
        if self.tables.current is None:  # the mesh may yet know it
            return Reason.NO_ROUTE, "no routing table loaded yet"
        where = original or host_port(authority)
        if where is None:
            return Reason.BAD_REQUEST, f"{authority[:100]!r} is not a host to pass through to"
        if self.policy == REGISTRY_ONLY:
            host, port = where
            return (
                Reason.OUTSIDE_MESH,
                f"{host}:{port} is not in the mesh (outbound_policy registry_only)",
            )
        return self._routes.get(where) or self._route(where)

    def _route(self, where: tuple[str, int]) -> Route | tuple[Reason, str]:
        try:
            endpoint = Endpoint(where[0], where[1])
        except WireError as e:
            return Reason.BAD_REQUEST, f"not a host to pass through to: {e}"
        if len(self._routes) >= MAX_DESTINATIONS:  # the oldest goes, and its pool with it
            del self._routes[next(iter(self._routes))]
            self.pools.retain(set(self._routes))
        pools = self.pools
        route = Route(
            PASSTHROUGH,
            _POLICY,
            balancer.make(_POLICY, [Member(endpoint, pools.stats(endpoint))], pools.clock),
            pools.get,
            self.tables.services.get(PASSTHROUGH),
            clock=pools.clock,
            external=True,
        )
        self._routes[where] = route
        return route

    def close(self) -> None:
        self.pools.close()


def host_port(authority: bytes) -> tuple[str, int] | None:
    """``host[:port]`` (port 80 when absent); None when it is not that."""
    text = authority.decode("latin-1").strip().lower()
    if text.startswith("["):  # an IPv6 literal
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = text.partition(":")
    if not host:
        return None
    if not port:
        return host.rstrip("."), 80
    if not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.rstrip("."), int(port)
