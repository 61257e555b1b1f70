"""What the registry holds: instance records (persisted) and their views (with liveness)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from control_plane import wire

METADATA_MAX_ENTRIES = 64
METADATA_KEY_MAX = 128
METADATA_VALUE_MAX = 1024


class Status(enum.StrEnum):
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"


def check_metadata(metadata: object, field: str = "metadata") -> dict[str, str]:
    """String to string, at most 64 entries, keys 1-128 and values 0-1024 characters."""
    if not isinstance(metadata, dict):
        raise wire.WireError(field, "must be an object of strings")
    if len(metadata) > METADATA_MAX_ENTRIES:
        raise wire.WireError(field, f"has {len(metadata)} entries; at most {METADATA_MAX_ENTRIES}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not 1 <= len(key) <= METADATA_KEY_MAX:
            raise wire.WireError(field, f"keys must be 1-{METADATA_KEY_MAX} characters")
        if not isinstance(value, str) or len(value) > METADATA_VALUE_MAX:
            raise wire.WireError(
                f"{field}.{key}", f"must be a string of at most {METADATA_VALUE_MAX} characters"
            )
    return dict(metadata)


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

    def __post_init__(self) -> None:
        wire.check_service_name(self.service)
        wire.check_instance_id(self.id)
        wire.check_address(self.address)
        wire.check_int(self.port, "port", wire.PORT_RANGE)
        wire.check_int(self.weight, "weight", wire.WEIGHT_RANGE)
        wire.check_zone(self.zone)
        check_metadata(self.metadata)

    @property
    def key(self) -> tuple[str, str]:
        return (self.service, self.id)


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
