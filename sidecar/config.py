"""Settings of a sidecar process, validated when built."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from control_plane import wire
from sidecar.errors import ConfigError

LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_MAX_CONNECTIONS = 10_000
OUTBOUND_POLICIES = ("allow_any", "registry_only")
#: Linkerd's default opaque ports: SMTP, MySQL, Galera, PostgreSQL, Redis, Elasticsearch,
#: Memcached (their servers speak first, or their clients never send an HTTP request line)
OPAQUE_PORTS = (25, 587, 3306, 4444, 5432, 6379, 9300, 11211)
MAX_CONTROL_PLANES = 16
"""URLs ``--control-plane`` may list"""


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    service: str
    """the service this sidecar stands beside (a DNS label)"""
    app: Listen = Listen("127.0.0.1", 8080)
    """where inbound traffic goes: the local application"""
    outbound: Listen = Listen("127.0.0.1", 15001)
    """the app's calls to other services come in here"""
    inbound: Listen = Listen("0.0.0.0", 15006)
    """other services' calls to this one come in here"""
    admin: Listen = Listen("127.0.0.1", 15000)
    """health, readiness, metrics, config dump, clusters, drain"""
    admin_token: str = ""
    """when set, the admin port's mutating calls need ``Authorization: Bearer <it>``; when
    empty, only loopback peers may make them"""
    metrics_listen: Listen = Listen("127.0.0.1", 15020)
    """a listener for ``/metrics``, ``/healthz`` and ``/readyz`` only (Prometheus, probes)"""
    table: str = ""
    """static routing file (YAML or JSON); empty for none"""
    control_plane: str = ""
    """control plane URL (``http://HOST:PORT`` or ``https://``), or several separated by
    commas (replicas: the stream fails over between them); tables are pushed from it"""
    token: str = ""
    """bearer token sent on the control plane's stream (a service token, or the mesh's join
    token); empty: none"""
    ca_file: str = ""
    """PEM CA bundle that an ``https://`` control plane's certificate must chain to; empty:
    the system's trust store"""
    advertise: str = ""
    """address other sidecars reach this one at; empty: this host's address"""
    register: str = "sidecar"
    """register the inbound listener (sidecar) or the app itself (app)"""
    app_protocol: str = "http1"
    """how the inbound speaks to the app: http1, http2 (h2c, prior knowledge) or auto (the
    caller's protocol); gRPC apps want http2 or auto"""
    state_dir: str = ".meshlet"
    """where the last good table is kept for starts without a control plane"""
    app_health: str = "/healthz"
    """path on the app checked every ``app_health_interval`` seconds, or none"""
    app_health_interval: float = 5.0
    """seconds between app health checks"""
    zone: str = ""
    """this sidecar's locality zone"""
    drain_timeout: float = 20.0
    """seconds in-flight requests get to finish on SIGTERM"""
    deregister_delay: float = 1.0
    """seconds between deregistering and draining, for callers' tables to change"""
    log_level: str = "info"
    metrics: str = "on"
    """``on``: /metrics on the admin and metrics ports, requests timed; ``off``: neither"""
    access_log: str = ""
    """JSON lines of every request to this file, ``-`` for stdout; empty: none"""
    table_poll_interval: float = 1.0
    """seconds between checks of the routing file for changes"""
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    """client connections per listener; more are closed at once (lowered to what the
    process's file-descriptor limit holds)"""
    source_share: float = 0.5
    """inbound: the share of ``max_connections``, and of the app's ``max_requests`` in
    flight, that one source address may hold (0: no per-source limit)"""
    min_data_rate: float = 240.0
    """bytes per second a request body, or a client reading its answers, must average
    after ``data_rate_grace`` (0: off)"""
    data_rate_grace: float = 5.0
    """seconds before ``min_data_rate`` counts"""
    outbound_policy: str = "allow_any"
    """requests for hosts the mesh does not know: passed through (``allow_any``) or answered
    502 (``registry_only``)"""
    opaque_ports: tuple[int, ...] = OPAQUE_PORTS
    """intercepted connections to these ports are relayed as TCP, unparsed"""
    cluster_domain: str = "cluster.local"
    """Kubernetes' DNS domain: ``SERVICE.NAMESPACE.svc.<it>`` names SERVICE"""
    namespace: str = ""
    """the Kubernetes namespace this instance is registered in (empty: none)"""
    mtls: str = "on"
    """``on``: ask the control plane for a workload certificate and speak mesh TLS with other
    sidecars (none with ``--table``: no control plane signs); ``off``: plaintext only"""

    def __post_init__(self) -> None:
        try:
            wire.check_service_name(self.service)
            wire.check_zone(self.zone)
        except wire.WireError as e:
            raise ConfigError(e.field, e.message) from None
        if self.drain_timeout < 0:
            raise ConfigError("drain_timeout", "must not be negative")
        if self.deregister_delay < 0:
            raise ConfigError("deregister_delay", "must not be negative")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError("log_level", f"must be one of {', '.join(LOG_LEVELS)}")
        if self.metrics not in ("on", "off"):
            raise ConfigError("metrics", "must be on or off")
        if self.mtls not in ("on", "off"):
            raise ConfigError("mtls", "must be on or off")
        if self.max_connections < 1:
            raise ConfigError("max_connections", "must be at least 1")
        if not 0 <= self.source_share <= 1:
            raise ConfigError("source_share", "must be from 0 to 1")
        if self.min_data_rate < 0:
            raise ConfigError("min_data_rate", "must not be negative")
        if self.data_rate_grace < 0:
            raise ConfigError("data_rate_grace", "must not be negative")
        if self.outbound_policy not in OUTBOUND_POLICIES:
            raise ConfigError("outbound_policy", f"must be one of {', '.join(OUTBOUND_POLICIES)}")
        if not all(0 < port < 65536 for port in self.opaque_ports):
            raise ConfigError("opaque_ports", "must be ports (1-65535)")
        if not self.cluster_domain or not all(
            label.isalnum() or label.replace("-", "").isalnum()
            for label in self.cluster_domain.split(".")
        ):
            raise ConfigError("cluster_domain", "must be a DNS name, like cluster.local")
        try:
            wire.check_namespace(self.namespace)
        except wire.WireError as e:
            raise ConfigError("namespace", e.message) from None
        if self.app.port == 0:
            raise ConfigError("app", "needs a port")
        if self.table and self.control_plane:
            raise ConfigError("table", "use either --table or --control-plane, not both")
        urls = control_plane_urls(self.control_plane)
        if self.ca_file and not any(url.startswith("https://") for url in urls):
            raise ConfigError("ca_file", "verifies an https:// --control-plane; there is none")
        if self.app_protocol not in wire.PROTOCOLS:
            raise ConfigError("app_protocol", f"must be one of {', '.join(wire.PROTOCOLS)}")
        if self.register not in ("sidecar", "app"):
            raise ConfigError("register", "must be sidecar or app")
        if not self.app_health_interval > 0:
            raise ConfigError("app_health_interval", "must be more than 0 seconds")
        if self.app_health != "none" and not self.app_health.startswith("/"):
            raise ConfigError("app_health", "must be a path starting with / or none")
        if self.advertise:
            try:
                wire.check_address(self.advertise)
            except wire.WireError as e:
                raise ConfigError("advertise", e.message) from None

    @property
    def control_planes(self) -> tuple[str, ...]:
        """The control plane's URLs, in the order given (none: no control plane)."""
        return control_plane_urls(self.control_plane)


def control_plane_urls(value: str) -> tuple[str, ...]:
    """``--control-plane``'s comma-separated URLs; ConfigError naming the first bad one."""
    if not value.strip():
        return ()
    entries = [entry.strip() for entry in value.split(",")]
    if len(entries) > MAX_CONTROL_PLANES:
        raise ConfigError(
            "control_plane", f"lists {len(entries)} URLs; at most {MAX_CONTROL_PLANES}"
        )
    for n, entry in enumerate(entries, 1):
        problem = _url_problem(entry)
        if problem:
            raise ConfigError("control_plane", f"URL {n} of {len(entries)}, {problem}")
        if entry in entries[: n - 1]:
            raise ConfigError(
                "control_plane", f"URL {n} of {len(entries)}, {entry!r}, is listed twice"
            )
    return tuple(entries)


def _url_problem(entry: str) -> str:
    """What is wrong with one control-plane URL, or ``""``."""
    if not entry:
        return "is empty (a stray comma?)"
    if "@" in entry.partition("://")[2].partition("/")[0]:  # not shown: it holds a password
        return "has credentials in it: give them with --token"
    shown = repr(entry[:200])
    if not entry.isascii() or not entry.isprintable() or " " in entry:
        return f"{shown}, has spaces, control or non-ASCII characters (an IDN: its xn-- form)"
    try:
        parts = urlsplit(entry)
    except ValueError as e:  # an unbalanced [ or ]
        return f"{shown}, is not a URL: {e}"
    try:
        port = parts.port
    except ValueError:
        return f"{shown}, has a port that is not 1-65535"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{shown}, is not http://HOST:PORT or https://HOST:PORT"
    if port == 0:
        return f"{shown}, has a port that is not 1-65535"
    if parts.query or parts.fragment or "?" in entry or "#" in entry:
        return f"{shown}, has a query or fragment; a control plane URL takes neither"
    return ""
