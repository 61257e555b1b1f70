"""A sidecar process: listeners, the routing table, the admin port, and their lifecycle.

Start-up: load a table (the routing file, or the table saved from the control plane), open the
outbound and inbound listeners, the admin port and the metrics port, then run the background
work (watch the file; or hold the control-plane stream and check the app's health). Shutdown on
SIGTERM or SIGINT, in steps:
  0. deregister from the control plane (callers stop sending here)
  1. not ready (``/readyz`` answers 503)
  2. stop accepting connections
  3. idle keep-alive connections close; in-flight requests finish (their responses carry
     ``Connection: close``) within ``--drain-timeout``
  4. whatever is left is cut; pooled upstream connections close
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import resource
import signal
import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvloop

from control_plane.flags import setup_logging
from control_plane.wire import Endpoint, Registration, following
from sidecar import build
from sidecar.admin.httpd import Port
from sidecar.admin.metrics import SidecarMetrics, endpoint_state
from sidecar.admin.server import Site, admin_site, metrics_site
from sidecar.clock import monotonic
from sidecar.config import DEFAULT_MAX_CONNECTIONS, Listen, SidecarConfig
from sidecar.control import state
from sidecar.control.discovery import Discovery
from sidecar.control.health import AppHealth
from sidecar.control.locks import LockClient
from sidecar.control.tablefile import file_signature, load_table_file
from sidecar.errors import ConfigError, TableError
from sidecar.proxy.egress import Egress
from sidecar.proxy.guard import InboundGuard
from sidecar.proxy.intercept import Interception
from sidecar.proxy.limits import ListenerLimits, MinRate, connections_that_fit, raise_fd_limit
from sidecar.proxy.listener import Downstream
from sidecar.proxy.routing import (
    AppRouter,
    Pools,
    Router,
    TableHolder,
)
from sidecar.proxy.tracker import ConnectionTracker
from sidecar.proxy.watch import Timeouts
from sidecar.resilience.service import Services
from sidecar.telemetry.accesslog import AccessLog
from sidecar.tls import MeshTls, client_context

if TYPE_CHECKING:
    from sidecar.control.identity import IdentityManager

log = logging.getLogger("meshlet.sidecar")


class Sidecar:
    def __init__(self, config: SidecarConfig, timeouts: Timeouts | None = None) -> None:
        self.config = config
        self.timeouts = timeouts or Timeouts()
        self.mesh_tls = MeshTls()
        """the mesh credentials the listeners read at each handshake"""
        # outbound calls originate mesh TLS to endpoints that take it, with --mtls on
        self.pools = Pools(mesh=self.mesh_tls if config.mtls == "on" else None)
        self.app_pools = Pools()
        metrics = config.metrics == "on"
        self.services = Services(metrics=metrics)
        self.tables = TableHolder(
            self.pools,
            service=config.service,
            zone=config.zone,
            services=self.services,
            cluster_domain=config.cluster_domain,
        )
        self.access_log = AccessLog(config.access_log) if config.access_log else None
        outbound, inbound = listener_limits(config)
        self.egress = Egress(self.tables, config.outbound_policy)
        opaque = frozenset(config.opaque_ports)
        self.outbound = ConnectionTracker(
            "outbound",
            metrics=metrics,
            access_log=self.access_log,
            limits=outbound,
            interception=Interception(opaque),
            egress=self.egress,
        )
        self.inbound = ConnectionTracker(
            "inbound",
            config.service,
            metrics=metrics,
            access_log=self.access_log,
            limits=inbound,
            interception=Interception(opaque, local=True, http_port=config.app.port),
            guard=InboundGuard(self.mesh_tls, config.service),
        )
        self.tables.guard = self.inbound.guard
        self.app_router = AppRouter(
            Endpoint(config.app.host, config.app.port),
            self.app_pools,
            metrics=metrics,
            protocol=config.app_protocol,
        )
        self.metrics = SidecarMetrics(self) if metrics else None
        self.draining = False
        self.listening = False
        self.last_reload_error = ""
        self._servers: list[asyncio.Server] = []
        self._ports: list[Port] = []
        self._table_signature: tuple[int, int, int] | None = None
        self._background: asyncio.Task[None] | None = None
        self.discovery: Discovery | None = None
        self.health: AppHealth | None = None
        self.locks: LockClient | None = None
        """the app's lock calls, forwarded to the control plane (none with ``--table``)"""
        self.state_path = Path(config.state_dir) / f"{config.service}.table"
        self.addresses: dict[str, Listen] = {}
        self.identity: IdentityManager | None = None
        """keeps a certificate in ``mesh_tls`` (None: ``--mtls off``, or ``--table``)"""
        if config.control_plane and config.mtls == "on":
            # imported here: a sidecar on a static table does without the identity's modules
            # (its checks, its key maker: about 0.4 MB)
            from sidecar.control.identity import IdentityManager

            self.identity = IdentityManager(
                service=config.service, namespace=config.namespace, tls=self.mesh_tls
            )

    def __repr__(self) -> str:
        table = self.tables.current
        version = table.info.version if table else None
        return (
            f"<Sidecar {self.config.service} [table v{version}, "
            f"{len(self.outbound.connections)} outbound and {len(self.inbound.connections)} "
            f"inbound connections{', draining' if self.draining else ''}]>"
        )

    # -- start ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load a table (the file, or the one saved from the control plane), listen, and start
        the background work. A table file that cannot be used raises TableError."""
        self._say_mtls()
        if self.config.control_plane:
            self._load_saved()
            c = self.config
            self.locks = LockClient(
                c.control_planes,
                c.service,
                c.token,
                self._control_plane_tls(),
                lambda: self.discovery.replica if self.discovery else None,
            )
        if self.config.table:
            self._table_signature = file_signature(self.config.table)
            table = load_table_file(self.config.table)
            self.tables.install(table, f"file:{self.config.table}")
            log.info(
                "routing table loaded from %s: %d services", self.config.table, len(table.services)
            )
        if self.access_log is not None:
            self.access_log.open()
        c = self.config
        await self._listen("outbound", c.outbound, self.tables, self.outbound)
        await self._listen("inbound", c.inbound, self.app_router, self.inbound)
        await self._serve("admin", c.admin, admin_site(self))
        await self._serve("metrics", c.metrics_listen, metrics_site(self))
        self.listening = True
        if self.config.app_health != "none" and self.config.control_plane:
            url = f"http://{self.config.app}{self.config.app_health}"
            self.health = AppHealth(
                url, self._app_health_changed, interval=self.config.app_health_interval
            )
        if self.config.control_plane:
            self.discovery = Discovery(
                control_planes=self.config.control_planes,
                token=self.config.token,
                tls=self._control_plane_tls(),
                service=self.config.service,
                registration=self._registration(),
                tables=self.tables,
                state_path=self.state_path,
                app_healthy=self.health is None or self.health.healthy,
                identity=self.identity,
            )
        self._background = asyncio.create_task(self._run_background(), name="sidecar-background")
        self._background.add_done_callback(_crashed)

    async def _run_background(self) -> None:
        """The sidecar's own tasks, in one group: table watcher, stream, app health."""
        async with asyncio.TaskGroup() as tasks:
            if self.config.table:
                tasks.create_task(self._watch_table(), name="table-watcher")
            if self.discovery is not None:
                tasks.create_task(self.discovery.run(), name="discovery")
            if self.health is not None:
                tasks.create_task(self.health.run(), name="app-health")
            if self.identity is not None:
                tasks.create_task(self.identity.run(), name="identity")

    def _say_mtls(self) -> None:
        """Whether this sidecar will speak mesh TLS, and if not why (a plaintext mesh should
        be a choice someone made)."""
        if self.identity is not None:
            log.info("mesh TLS on: a certificate will be asked of the control plane")
        elif self.config.mtls == "off":
            log.info("mesh TLS off (--mtls off): plaintext with other sidecars")
        else:
            log.info(
                "mesh TLS off: a static --table file has no control plane to sign a certificate"
            )

    def _load_saved(self) -> None:
        """Fail-static: start from the last table the control plane gave us, if it is sound."""
        if not self.state_path.exists():
            log.info(
                "no saved table at %s: not ready until the control plane answers", self.state_path
            )
            return
        try:
            table = state.load(self.state_path)
            self.tables.install(table, f"saved:{self.state_path}")
        except (state.StateError, TableError) as e:
            log.warning("saved table ignored: %s", e)
            return
        if self.identity is not None:
            self.identity.on_table(table)  # its trust bundle, until the control plane's
        log.info(
            "serving the saved table version %d until the control plane answers", table.version
        )

    def _control_plane_tls(self) -> ssl.SSLContext | None:
        """How an ``https://`` control plane's certificate is checked (``--ca-file``)."""
        if not any(url.startswith("https://") for url in self.config.control_planes):
            return None
        return client_context(self.config.ca_file)

    def _registration(self) -> Registration:
        c = self.config
        if c.register == "app":
            address, port = c.app.host, c.app.port
        else:
            address, port = c.advertise or _host_address(), self.addresses["inbound"].port
        return Registration(
            address=address, port=port, zone=c.zone or None, namespace=c.namespace or None
        )

    def _app_health_changed(self, healthy: bool) -> None:
        if self.discovery is not None:
            self.discovery.set_app_health(healthy)

    async def _listen(
        self, name: str, where: Listen, router: Router, tracker: ConnectionTracker
    ) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: Downstream(router, tracker, self.timeouts, loop),
            where.host,
            where.port,
            reuse_address=True,
        )
        self._servers.append(server)
        host, port = server.sockets[0].getsockname()[:2]
        self.addresses[name] = Listen(host, port)
        log.info("%s listening on %s", name, self.addresses[name])

    async def _serve(self, name: str, where: Listen, site: Site) -> None:
        port = Port(name, site.answer)
        host, number = await port.start(where.host, where.port)
        self._ports.append(port)
        self.addresses[name] = Listen(host, number)
        log.info("%s listening on %s", name, self.addresses[name])

    # -- the routing file -------------------------------------------------------------------

    def reload(self) -> bool:
        """Load the routing file again; a bad one is logged and the old table stays. A
        service whose entry did not change keeps its route and balancer state."""
        path = self.config.table
        try:
            with following(self.tables.in_force()):
                table = load_table_file(path)
            self.tables.install(table, f"file:{path}")
        except TableError as e:
            self.last_reload_error = str(e)
            log.warning("routing table rejected, keeping version in force: %s", e)
            return False
        self.last_reload_error = ""
        log.info("routing table reloaded from %s: %d services", path, len(table.services))
        return True

    async def _watch_table(self) -> None:
        """Reload the routing file whenever it changes (polled; also on SIGHUP)."""
        while True:
            await asyncio.sleep(self.config.table_poll_interval)
            signature = file_signature(self.config.table)
            if signature != self._table_signature and signature is not None:
                self._table_signature = signature
                self.reload()

    # -- admin --------------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if not self.listening:
            return False, "listeners are not up yet"
        if self.tables.current is None:
            return False, "no routing table loaded"
        return True, ""

    def config_dump(self) -> dict[str, Any]:
        table = self.tables.current
        return {
            "service": self.config.service,
            "zone": self.config.zone,
            "namespace": self.config.namespace,
            "listeners": {name: str(where) for name, where in self.addresses.items()},
            "app": str(self.config.app),
            "draining": self.draining,
            "last_reload_error": self.last_reload_error or None,
            "control_plane": self._stream_state(),
            "table": table.dump() if table else None,
            "identity": self._identity_state(),
            "build": build(),
        }

    def endpoint_stats(self) -> dict[str, Any]:
        """Per service of the table in force: its counters (limits, retries, ejections,
        panics) and what the balancers know of each endpoint."""
        table = self.tables.current
        now = self.pools.clock.monotonic()
        services: dict[str, dict[str, Any]] = {}
        if table is None:
            return {"services": services}
        for name, entry in table.table.services.items():
            state = self.services.find(name)
            rows: list[dict[str, Any]] = []
            services[name] = {
                "counters": state.counters() if state else {},
                "endpoints": rows,
            }
            route = table.named(name)
            ramps: dict[Endpoint, float] = {}
            if route is not None:
                members = route.balancer.members
                factors = route.balancer.slow_start(now)
                ramps = {m.endpoint: f for m, f in zip(members, factors, strict=True)}
            for e in entry.endpoints:
                stats = self.pools.find_stats(e)
                row: dict[str, Any] = {
                    "address": e.address,
                    "port": e.port,
                    "instance": e.instance,
                    "weight": e.weight,
                    "zone": e.zone,
                    "namespace": e.namespace,
                    "draining": e.draining,
                    "state": endpoint_state(e.draining, stats, now),
                    "slow_start": round(ramps[e], 3) if e in ramps else None,
                }
                if stats is not None:
                    row |= dataclasses.asdict(stats.statistics(now))
                    if math.isinf(row["excluded_for_s"]):
                        row["excluded_for_s"] = None  # probing: out until its probe ends
                    ejection = stats.ejection
                    row["outlier"] = ejection.phase.name.lower() if ejection else "healthy"
                pool = self.pools.find(e)
                if pool is not None and pool.identity:  # (mesh TLS: sessions by ALPN)
                    row["mesh_tls"] = {
                        "identity": pool.identity,
                        "handshakes": pool.tls_handshakes,
                        "resumed": pool.tls_resumed,
                        "h2": pool.tls_h2,
                        "h2_fallback": pool.h2_fallback,
                    }
                rows.append(row)
        return {"services": services}

    def _identity_state(self) -> dict[str, Any]:
        if self.identity is None:
            why = "--mtls off" if self.config.mtls == "off" else "no control plane (--table)"
            return {"mtls": "off", "why": why}
        return {"mtls": "on", **dataclasses.asdict(self.identity.statistics())}

    def _stream_state(self) -> dict[str, Any] | None:
        d = self.discovery
        if d is None:
            return None
        on = d.replica
        return {
            "url": d.url,
            "targets": list(d.targets),
            "connected_to": {"url": on.url, "address": on.address} if on else None,
            "failovers": d.failover.failovers,
            "connected": d.connected,
            "instance": d.instance,
            "node": d.node,
            "version": d.version,
            "app_healthy": d.app_healthy,
            "last_error": d.last_error or None,
        }

    def drain(self) -> None:
        """Not ready; keep-alive connections close once their in-flight requests finish."""
        if not self.draining:
            log.info("draining")
        self.draining = True
        self.outbound.drain()
        self.inbound.drain()

    # -- stop -------------------------------------------------------------------------------

    async def stop(self) -> None:
        if self.discovery is not None and self.discovery.connected:
            await self.discovery.deregister()  # step 0: callers stop routing here first,
            await asyncio.sleep(self.config.deregister_delay)  # once their tables say so
        if self._background is not None:
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._background
        self.drain()  # step 1
        for server in self._servers:  # step 2
            server.close()
        deadline = monotonic() + self.config.drain_timeout  # step 3
        while self.outbound.connections or self.inbound.connections:
            self.outbound.drain()
            self.inbound.drain()
            if monotonic() >= deadline:
                left = len(self.outbound.connections) + len(self.inbound.connections)
                log.warning("drain timeout: cutting %d connections", left)
                break
            await asyncio.sleep(0.05)
        for tracker in (self.outbound, self.inbound):  # step 4
            for ds in list(tracker.connections):
                if ds.transport is not None:
                    ds.transport.abort()
        self.pools.close()
        self.app_pools.close()
        self.egress.close()
        for server in self._servers:
            await server.wait_closed()
        for port in self._ports:
            await port.close()
        if self.access_log is not None:
            await self.access_log.close()


def listener_limits(config: SidecarConfig) -> tuple[ListenerLimits, ListenerLimits]:
    """The outbound and inbound listeners' limits. ``max_connections`` is lowered to what the
    file-descriptor limit holds, with a warning: a refused connection is counted, running
    out of descriptors is not. Only the inbound listener has sources to share among (the
    outbound one serves the app alone)."""
    fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if fd_limit == resource.RLIM_INFINITY:
        fd_limit = 1 << 20
    most = connections_that_fit(config.max_connections, fd_limit)
    if most < config.max_connections:
        asked = config.max_connections != DEFAULT_MAX_CONNECTIONS  # (a default just fits)
        log.log(
            logging.WARNING if asked else logging.INFO,
            "--max-connections %d lowered to %d per listener: the file-descriptor limit is %d",
            config.max_connections,
            most,
            fd_limit,
        )
    rate = MinRate(config.min_data_rate, config.data_rate_grace)
    outbound = ListenerLimits(max_connections=most, min_rate=rate)
    return outbound, dataclasses.replace(outbound, source_share=config.source_share)


def _host_address() -> str:
    """This host's address as its name resolves, else loopback (set --advertise to be sure)."""
    try:
        return str(socket.gethostbyname(socket.gethostname()))
    except OSError:
        return "127.0.0.1"


async def serve(config: SidecarConfig, stop: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set (by default until SIGTERM or SIGINT); SIGHUP reloads."""
    loop = asyncio.get_running_loop()
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
    sidecar = Sidecar(config)
    try:
        await sidecar.start()
        if config.table:
            loop.add_signal_handler(signal.SIGHUP, sidecar.reload)
        await stop.wait()
        log.info("shutting down")
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGHUP)
        await sidecar.stop()
    log.info("stopped")


def run(config: SidecarConfig) -> int:
    setup_logging(config.log_level)
    raise_fd_limit()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(config))
    except (TableError, ConfigError) as e:
        log.error("cannot start: %s", e)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        log.error("cannot start: %s%s", where, e.strerror or e)
        return 2
    return 0


def _crashed(task: asyncio.Task[None]) -> None:
    """The stream, the table watcher and app health end only when cancelled: one that ended
    otherwise is a bug, said at once (the data path goes on with the table in force)."""
    if not task.cancelled() and task.exception() is not None:
        log.error(
            "bug: the sidecar's background tasks died (no more table updates, heartbeats or "
            "app health checks)",
            exc_info=task.exception(),
        )
