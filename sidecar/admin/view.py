"""What the admin and metrics ports read of the running sidecar (``sidecar.app.Sidecar``): a
Protocol, so that the ports sit below the process that serves them and import nothing of it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from sidecar.config import SidecarConfig
from sidecar.control.discovery import Discovery
from sidecar.control.health import AppHealth
from sidecar.control.locks import LockClient
from sidecar.proxy.routing import AppRouter, Pools, TableHolder
from sidecar.proxy.tracker import ConnectionTracker
from sidecar.resilience.service import Services
from sidecar.telemetry.accesslog import AccessLog

if TYPE_CHECKING:
    from sidecar.control.identity import IdentityManager


class Exposition(Protocol):
    def chunks(self) -> Iterator[bytes]:
        """Every metric, in the Prometheus text format (``exposition.CONTENT_TYPE``), in
        pieces produced as they are taken."""
        ...


class SidecarView(Protocol):
    config: SidecarConfig
    services: Services
    tables: TableHolder
    pools: Pools
    app_router: AppRouter
    outbound: ConnectionTracker
    inbound: ConnectionTracker
    access_log: AccessLog | None
    discovery: Discovery | None
    health: AppHealth | None
    locks: LockClient | None
    """None: no control plane (``--table``)"""
    identity: IdentityManager | None
    """None: no mesh TLS (``--mtls off``, or ``--table``)"""

    @property
    def metrics(self) -> Exposition | None:
        """None: ``--metrics off``"""
        ...

    def readiness(self) -> tuple[bool, str]: ...

    def config_dump(self) -> dict[str, Any]: ...

    def endpoint_stats(self) -> dict[str, Any]: ...

    def drain(self) -> None: ...
