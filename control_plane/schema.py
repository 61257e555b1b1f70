"""Parsing of outside input to the REST API: JSON bodies and path parameters.

Handlers call these and hand the core typed documents; the core never sees raw dicts. Every
error is a ``BadRequest`` naming the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from control_plane import model, wire
from control_plane.errors import BadRequest
from control_plane.wire import WireError, spec

#: request bodies larger than this are refused with 413
MAX_BODY_BYTES = 1024 * 1024


def decode_json(body: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN or Infinity, no duplicate keys."""

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) != len(pairs):
            seen: set[str] = set()
            dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
            raise ValueError(f"duplicate key {dup!r}")
        return result

    try:
        return json.loads(
            body.decode("utf-8"), parse_constant=no_constants, object_pairs_hook=no_duplicates
        )
    except (ValueError, RecursionError) as e:
        message = str(e) if not isinstance(e, RecursionError) else "nested too deeply"
        raise BadRequest(f"malformed JSON: {message}") from None


def document(cls: type[wire.D], data: Any) -> wire.D:
    """A wire document from a decoded body; field errors become 400s."""
    try:
        return wire.parse(cls, data)
    except WireError as e:
        raise BadRequest(e.message, e.field) from None


def service_name(name: str) -> str:
    try:
        return wire.check_service_name(name)
    except WireError as e:
        raise BadRequest(f"service name {name[:80]!r} {e.message}", "service") from None


def instance_id(value: str) -> str:
    try:
        return wire.check_instance_id(value)
    except WireError as e:
        raise BadRequest(f"instance id {value[:80]!r} {e.message}", "id") from None


_ID_SCHEMA = {"type": "string", "pattern": f"^{wire.INSTANCE_ID.pattern}$"}
_ZONE_SCHEMA = {"type": "string", "pattern": f"^{wire.ZONE.pattern}$"}
_METADATA_SCHEMA = {
    "type": "object",
    "maxProperties": model.METADATA_MAX_ENTRIES,
    "propertyNames": {"minLength": 1, "maxLength": model.METADATA_KEY_MAX},
    "additionalProperties": {"type": "string", "maxLength": model.METADATA_VALUE_MAX},
}


@dataclass(frozen=True, slots=True)
class Registration:
    """Body of ``POST /v1/services/{svc}/instances``.

    Re-registering an id updates the fields given and keeps the others; it counts as a
    heartbeat and does not undo a drain.
    """

    address: str = spec(
        dataclasses.MISSING,
        "IP address or hostname callers connect to",
        parse=wire.check_address,
        schema={"type": "string", "minLength": 1, "maxLength": 253},
    )
    port: int = spec(dataclasses.MISSING, "TCP port", lo=wire.PORT_RANGE[0], hi=wire.PORT_RANGE[1])
    id: str | None = spec(
        None,
        "instance id, unique in the service; default: from address and port",
        parse=wire.check_instance_id,
        schema=_ID_SCHEMA,
    )
    zone: str | None = spec(
        None, "locality zone, empty for none", parse=wire.check_zone, schema=_ZONE_SCHEMA
    )
    weight: int | None = spec(
        None,
        f"relative share of traffic; default {wire.DEFAULT_WEIGHT}",
        lo=wire.WEIGHT_RANGE[0],
        hi=wire.WEIGHT_RANGE[1],
    )
    metadata: dict[str, str] | None = spec(
        None,
        "string labels, at most 64",
        parse=model.check_metadata,
        schema=_METADATA_SCHEMA,
    )

    def __post_init__(self) -> None:
        wire.check_bounds(self)

    def instance_id(self) -> str:
        return self.id if self.id is not None else default_instance_id(self.address, self.port)


def default_instance_id(address: str, port: int) -> str:
    """``10.0.0.7-8080``: the same instance registered twice without an id keeps one id.

    IPv6 addresses (compressed, so one address has one id) become ``fd00__7-8080``: an ``_``
    never occurs in a hostname or IPv4 address, so no two addresses share an id.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        candidate = f"{address}-{port}"  # a hostname: already [A-Za-z0-9.-]
    else:
        candidate = f"{ip.compressed.replace(':', '_').replace('%', '.')}-{port}"
    if len(candidate) <= 128 and wire.INSTANCE_ID.fullmatch(candidate):
        return candidate
    return hashlib.blake2b(candidate.encode(), digest_size=16).hexdigest()


def _patch_status(value: Any, path: str) -> str:
    if value not in ("draining", "healthy"):
        raise WireError(
            path,
            "may be set to draining or back to healthy; health otherwise comes from heartbeats",
        )
    return str(value)


@dataclass(frozen=True, slots=True)
class InstancePatch:
    """Body of ``PATCH /v1/services/{svc}/instances/{id}``: what an operator may change."""

    weight: int | None = spec(
        None, "relative share of traffic", lo=wire.WEIGHT_RANGE[0], hi=wire.WEIGHT_RANGE[1]
    )
    status: str | None = spec(
        None,
        "draining: callers finish existing requests and send no new ones; healthy: undrain",
        parse=_patch_status,
        schema={"enum": ["draining", "healthy"]},
    )

    def __post_init__(self) -> None:
        wire.check_bounds(self)
        if self.weight is None and self.status is None:
            raise WireError("(body)", "nothing to change: give weight and/or status")
