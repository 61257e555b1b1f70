"""What the registry holds: instance records (persisted) and their views (with liveness)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from control_plane import wire


class Origin(enum.StrEnum):
    """How an instance was registered, which decides who may change it (``ownership``)."""

    ADMIN = "admin"
    """with the admin token: only the admin may change or remove it"""
    REST = "rest"
    """over the REST API with another token (or none): no stream may take it over"""
    STREAM = "stream"
    """by a sidecar's stream: the stream owns it while connected"""


class Status(enum.StrEnum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """One registered instance as the store keeps it. Health is not here: it is soft state."""

    service: str
    id: str
    address: str
    port: int
    zone: str = ""
    weight: int = wire.DEFAULT_WEIGHT
    metadata: dict[str, str] = field(default_factory=dict)
    draining: bool = False
    origin: Origin = Origin.REST
    namespace: str = ""
    tls: bool = False
    """its sidecar said its inbound accepts mesh TLS (a REST registration: no)"""

    def __post_init__(self) -> None:
        wire.check_service_name(self.service)
        wire.check_instance_id(self.id)
        wire.check_address(self.address)
        wire.check_int(self.port, "port", wire.PORT_RANGE)
        wire.check_int(self.weight, "weight", wire.WEIGHT_RANGE)
        wire.check_zone(self.zone)
        wire.check_namespace(self.namespace)
        wire.check_metadata(self.metadata)

    @property
    def key(self) -> tuple[str, str]:
        return (self.service, self.id)


@dataclass(frozen=True, slots=True)
class Health:
    """An instance's health as replicas share it (``store_redis``): soft state, not durable
    like its record."""

    lapsed: bool = False
    """no heartbeat for the TTL, or its sidecar's stream closed"""
    sick: bool = False
    """its sidecar says its app is unhealthy"""
    as_of: float = 0.0
    """wall-clock time of the last sign of life it was judged on: a replica that heard from
    the instance later knows better (``Registry.apply_health``)"""

    def encode(self) -> str:
        """``lapsed,sick@AS_OF`` (each flag only when set); "" for healthy."""
        flags = ",".join(name for name, on in (("lapsed", self.lapsed), ("sick", self.sick)) if on)
        return f"{flags}@{self.as_of!r}" if flags else ""

    @classmethod
    def decode(cls, value: str | None) -> Health:
        flags, _, as_of = (value or "").partition("@")
        names = set(flags.split(","))
        return cls("lapsed" in names, "sick" in names, float(as_of or 0))


@dataclass(frozen=True, slots=True)
class InstanceView:
    """An instance as the API shows it: the record plus what its heartbeats say."""

    record: InstanceRecord
    status: Status
    #: wall-clock time of the last heartbeat seen by this process; None since a restart
    last_heartbeat: float | None


@dataclass(frozen=True, slots=True)
class ServiceSummary:
    name: str
    lb: str
    counts: dict[Status, int]


@dataclass(frozen=True, slots=True)
class ServiceView:
    name: str
    policy: wire.Policy
    policy_set: bool
    instances: list[InstanceView]


TOKEN_DESCRIPTION_MAX = 256


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """A service token as the store keeps it: never the secret, only its SHA-256."""

    id: str
    """public name of the token (in lists, logs and ``DELETE /v1/tokens/{id}``)"""
    service: str
    """the one service it acts for"""
    description: str
    digest: str
    """hex SHA-256 of the secret"""
    created: float
    """wall-clock seconds since the epoch"""
    last_used: float | None = None
    """wall-clock seconds of its last use, as last saved (None: never)"""
