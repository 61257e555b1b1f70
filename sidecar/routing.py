"""Routing tables: which service a request names, and that service's route.

A ``RoutingTable`` is built once from a ``wire.Table`` (a static file now, a pushed snapshot
later) and never changes; a reload builds a new one and swaps it into the ``TableHolder``
that the listeners route through. Connection pools outlive tables: they are kept per endpoint
address in ``Pools``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import yaml

from control_plane.wire import Endpoint, Policy, Table, WireError, parse_table, to_json
from sidecar.balancer import Balancer, RoundRobin
from sidecar.errors import Reason, TableError
from sidecar.upstream import Pool


@dataclass(slots=True)
class Route:
    """Where a request goes: a service's policy, balancer and connection pools."""

    name: str
    policy: Policy
    balancer: Balancer
    pool_for: Callable[[Endpoint], Pool]


class Router(Protocol):
    def route(self, authority: bytes | None) -> Route | tuple[Reason, str]:
        """The route for a request's authority, or why there is none."""
        ...


_CACHE_LIMIT = 4096


def service_of(authority: bytes) -> str:
    """``payments``, ``Payments:80``, ``payments.mesh`` and ``payments.`` all name payments."""
    host = authority.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host  # an IPv6 literal names no service
    host = host.partition(":")[0].rstrip(".")
    return host.removesuffix(".mesh")


class Pools:
    """One connection pool per endpoint address, shared by every table."""

    def __init__(self, *, max_idle: int = 64, idle_timeout: float = 30.0) -> None:
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self._pools: dict[tuple[str, int], Pool] = {}

    def get(self, endpoint: Endpoint) -> Pool:
        key = (endpoint.address, endpoint.port)
        pool = self._pools.get(key)
        if pool is None:
            pool = Pool(endpoint, max_idle=self.max_idle, idle_timeout=self.idle_timeout)
            self._pools[key] = pool
        return pool

    def retain(self, endpoints: set[tuple[str, int]]) -> None:
        """Close the idle connections of endpoints no table routes to any more."""
        for key in list(self._pools):
            if key not in endpoints:
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


class RoutingTable:
    def __init__(self, table: Table, info: TableInfo, pools: Pools) -> None:
        self.table = table
        self.info = info
        self._routes = {
            name: Route(
                name,
                entry.policy,
                RoundRobin([e for e in entry.endpoints if not e.draining]),  # draining: no new
                pools.get,
            )
            for name, entry in table.services.items()
        }
        self._cache: dict[bytes, Route] = {}

    def route(self, authority: bytes | None) -> Route | tuple[Reason, str]:
        if authority is None:
            return Reason.NO_ROUTE, "the request names no service (no Host header)"
        route = self._cache.get(authority)
        if route is not None:
            return route
        name = service_of(authority)
        route = self._routes.get(name)
        if route is None:
            return Reason.NO_ROUTE, f"no service {name[:100]!r} in the routing table"
        if len(self._cache) < _CACHE_LIMIT:
            self._cache[authority] = route
        return route

    def endpoints(self) -> set[tuple[str, int]]:
        return {(e.address, e.port) for s in self.table.services.values() for e in s.endpoints}

    def dump(self) -> dict[str, object]:
        return {
            "version": self.info.version,
            "source": self.info.source,
            "loaded_at": self.info.loaded_at,
            "age_s": round(time.time() - self.info.loaded_at, 3),
            "services": to_json(self.table)["services"],
        }


class TableHolder:
    """The table in force; listeners route through it, reloads swap it."""

    def __init__(self, pools: Pools) -> None:
        self.pools = pools
        self.current: RoutingTable | None = None

    def route(self, authority: bytes | None) -> Route | tuple[Reason, str]:
        if self.current is None:
            return Reason.NO_ROUTE, "no routing table loaded yet"
        return self.current.route(authority)

    def install(self, table: Table, source: str) -> RoutingTable:
        new = RoutingTable(table, TableInfo(table.version, source, time.time()), self.pools)
        self.current = new
        self.pools.retain(new.endpoints())
        return new


class AppRouter:
    """The inbound listener's only route: the local application."""

    def __init__(self, endpoint: Endpoint, pools: Pools, policy: Policy | None = None) -> None:
        self._route = Route("app", policy or Policy(), RoundRobin([endpoint]), pools.get)

    def route(self, authority: bytes | None) -> Route | tuple[Reason, str]:
        return self._route


def load_table_file(path: str) -> Table:
    """A static routing file (YAML or JSON); TableError names what is wrong."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise TableError(f"{path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise TableError(f"{path}: not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise TableError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    try:
        return parse_table(data if data is not None else {})
    except WireError as e:
        raise TableError(f"{path}: {e}") from None


def file_signature(path: str) -> tuple[int, int, int] | None:
    """What changes when a file is rewritten (or replaced by rename); None if missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)
