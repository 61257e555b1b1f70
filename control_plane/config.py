"""Settings of a control-plane process, validated when built."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from control_plane.errors import ConfigError
from control_plane.wire import WireError
from control_plane.wire.checks import check_trust_domain

LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True)
class ControlPlaneConfig:
    host: str = "127.0.0.1"
    """address the REST API listens on"""
    port: int = 7070
    """TCP port of the REST API; 0 picks a free one"""
    store: str = "sqlite:///meshlet.db"
    """``sqlite:///PATH``, ``redis://HOST:PORT/DB`` (replicas share it) or ``memory``"""
    admin_token: str = ""
    """may do everything; with it (or ``join_token``) set, every ``/v1`` call needs a token"""
    join_token: str = ""
    """mesh-wide bootstrap secret: acts for any service's instances, never as the admin"""
    tls_cert: str = ""
    """PEM certificate chain to serve HTTPS (REST and stream) with; empty: plain HTTP"""
    tls_key: str = ""
    """PEM private key of ``tls_cert``"""
    ca_cert: str = ""
    """PEM certificate of the CA that signs workload certificates (a root, or an intermediate
    followed by the intermediates above it); empty: the store's, made on first start"""
    ca_key: str = ""
    """PEM private key (ECDSA, unencrypted) of ``ca_cert``"""
    trust_domain: str = "cluster.local"
    """the SPIFFE trust domain of workload identities"""
    cert_ttl: float = 86400.0
    """seconds a workload certificate lasts (sidecars renew at two thirds of it)"""
    allow_loopback: bool = False
    """accept loopback instance addresses even when not listening on loopback"""
    max_instances: int = 100_000
    """instances the registry holds at most; registrations beyond are refused"""
    max_instances_per_service: int = 10_000
    """instances one service holds at most"""
    protect_max: float = 900.0
    """seconds protection may hold expiry; then expiry resumes at a bounded rate"""
    debounce_quiet: float = 0.1
    """seconds without another change before a new table is pushed"""
    debounce_max: float = 2.0
    """seconds at most between a change and its push, however busy"""
    heartbeat_ttl: float = 15.0
    """seconds without a heartbeat before an instance turns unhealthy"""
    remove_after: float = 30.0
    """seconds without a heartbeat before an instance is removed"""
    protect_percent: float = 15.0
    """expire nothing while more than this % of all instances (and >= 3) lapse at once"""
    lease_ttl: float = 5.0
    """replicas on Redis: seconds the reaper's lease lasts unless renewed (a dead reaper's
    successor takes over within this)"""
    log_level: str = "info"
    shutdown_timeout: float = 10.0
    """seconds in-flight requests get to finish on SIGTERM"""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError("listen", f"port must be from 0 to 65535, got {self.port}")
        if not self.heartbeat_ttl > 0:
            raise ConfigError("heartbeat_ttl", "must be more than 0 seconds")
        if not self.remove_after > self.heartbeat_ttl:
            raise ConfigError("remove_after", "must be more than --heartbeat-ttl")
        if not 0 <= self.protect_percent <= 100:
            raise ConfigError("protect_percent", "must be from 0 to 100 (100 turns it off)")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError("log_level", f"must be one of {', '.join(LOG_LEVELS)}")
        if not self.debounce_quiet > 0:
            raise ConfigError("debounce_quiet", "must be more than 0 seconds")
        if not self.debounce_max >= self.debounce_quiet:
            raise ConfigError("debounce_max", "must be at least --debounce-quiet")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert", "--tls-cert and --tls-key go together")
        if bool(self.ca_cert) != bool(self.ca_key):
            raise ConfigError("ca_cert", "--ca-cert and --ca-key go together")
        try:
            check_trust_domain(self.trust_domain)
        except WireError as e:
            raise ConfigError("trust_domain", e.message) from None
        if self.max_instances < 1:
            raise ConfigError("max_instances", "must be at least 1")
        if not 1 <= self.max_instances_per_service <= self.max_instances:
            raise ConfigError("max_instances_per_service", "must be from 1 to --max-instances")
        if not self.protect_max >= 0:
            raise ConfigError("protect_max", "must not be negative (0: protection never holds)")
        if not 5.0 <= self.cert_ttl <= 30 * 86400.0:
            raise ConfigError("cert_ttl", "must be from 5 seconds to 30 days")
        if not 1.0 <= self.lease_ttl <= 300.0:
            raise ConfigError("lease_ttl", "must be from 1 to 300 seconds")
        if self.shutdown_timeout < 0:
            raise ConfigError("shutdown_timeout", "must not be negative")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls_cert else 'http'}://{host}:{self.port}"

    @property
    def loopback_instances(self) -> bool:
        """Whether instances may register loopback addresses: only a control plane on
        loopback (a local mesh) routes to them, unless ``allow_loopback`` says otherwise."""
        return self.allow_loopback or is_loopback_host(self.host)


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
