"""Parsing of outside input to the REST API: JSON bodies and path parameters.

Handlers call these and hand the core typed documents; the core never sees raw dicts. Every
error is a ``BadRequest`` naming the field.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from dataclasses import dataclass
from typing import Any

from control_plane import locks, wire
from control_plane.errors import BadRequest
from control_plane.model import TOKEN_DESCRIPTION_MAX
from control_plane.wire import Registration, WireError, default_instance_id, spec

__all__ = [
    "InstancePatch",
    "LockGrantRequest",
    "LockRelease",
    "LockRenewal",
    "LockRequest",
    "Registration",
    "RootRequest",
    "TokenRequest",
    "decode_json",
    "default_instance_id",
    "document",
]

#: request bodies larger than this are refused with 413
MAX_BODY_BYTES = 1024 * 1024


def decode_json(body: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN or Infinity, no duplicate keys, no lone surrogates."""

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
        text = body.decode("utf-8")
        data = json.loads(text, parse_constant=no_constants, object_pairs_hook=no_duplicates)
    except (ValueError, RecursionError) as e:
        message = str(e) if not isinstance(e, RecursionError) else "nested too deeply"
        raise BadRequest(f"malformed JSON: {message}") from None
    try:
        wire.check_unicode(text, data)
    except WireError as e:
        raise BadRequest(e.message, e.field) from None
    return data


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


_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_BROADCAST = ipaddress.ip_address("255.255.255.255")


def routable(address: str, *, loopback: bool) -> str:
    """An instance address callers may be sent to: never unspecified, multicast, broadcast or
    link-local (the cloud metadata service is link-local), loopback only when ``loopback``
    (a control plane on loopback runs a local mesh). Hostnames are not resolved, except that
    ``localhost`` is loopback."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        host = address.lower().removesuffix(".")
        if not loopback and (host == "localhost" or host.endswith(".localhost")):
            raise BadRequest(_LOOPBACK, "address") from None
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    why = (
        "is unspecified" if ip.is_unspecified or ip in _THIS_NETWORK else
        "is multicast" if ip.is_multicast else
        "is the broadcast address" if ip == _BROADCAST else
        "is link-local (as the cloud metadata address is)" if ip.is_link_local else
        ""
    )  # fmt: skip
    if why:
        raise BadRequest(f"address {address} {why}: no caller may be sent there", "address")
    if ip.is_loopback and not loopback:
        raise BadRequest(_LOOPBACK, "address")
    return address


_LOOPBACK = (
    "loopback addresses are refused: this control plane does not listen on loopback, so its "
    "sidecars are not on one host (start it with --allow-loopback if they are)"
)


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


def _description(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise WireError(path, "must be a string")
    if len(value) > TOKEN_DESCRIPTION_MAX or not value.isprintable():
        raise WireError(
            path, f"must be at most {TOKEN_DESCRIPTION_MAX} printable characters (no newlines)"
        )
    return value


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """Body of ``POST /v1/tokens``: a service token for one service."""

    service: str = spec(
        dataclasses.MISSING,
        "the service the token acts for (its stream and its instances)",
        parse=lambda value, path: wire.check_service_name(value, path),
        schema={"type": "string", "pattern": f"^{wire.SERVICE_NAME.pattern}$"},
    )
    description: str = spec(
        "",
        "what the token is for, for people (where it is deployed)",
        parse=_description,
        schema={"type": "string", "maxLength": TOKEN_DESCRIPTION_MAX},
    )


_TOKEN_MAX = 2**63 - 1
_TTL = spec(
    dataclasses.MISSING,
    "how long the lease lasts unless renewed",
    unit="milliseconds",
    lo=locks.TTL_MS[0],
    hi=locks.TTL_MS[1],
)


def _token() -> Any:
    return spec(
        dataclasses.MISSING,
        "the fencing token the acquisition answered",
        lo=1,
        hi=_TOKEN_MAX,
    )


@dataclass(frozen=True, slots=True)
class LockRequest:
    """Body of ``POST /v1/services/{svc}/locks/{name}``: take the lock."""

    ttl_ms: int = _TTL
    wait_ms: int = spec(
        0,
        "how long to wait while another holds it (409 after)",
        unit="milliseconds",
        lo=locks.WAIT_MS[0],
        hi=locks.WAIT_MS[1],
    )

    def __post_init__(self) -> None:
        wire.check_bounds(self)


@dataclass(frozen=True, slots=True)
class LockRenewal:
    """Body of ``PUT /v1/services/{svc}/locks/{name}/renew``: extend the lease."""

    token: int = _token()
    ttl_ms: int = _TTL

    def __post_init__(self) -> None:
        wire.check_bounds(self)


@dataclass(frozen=True, slots=True)
class LockRelease:
    """Body of ``DELETE /v1/services/{svc}/locks/{name}``: let it go."""

    token: int = _token()

    def __post_init__(self) -> None:
        wire.check_bounds(self)


def _services(value: Any, path: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise WireError(path, "must be a list of service names")
    if not 1 <= len(value) <= locks.MAX_GRANT_SERVICES:
        raise WireError(path, f"must list 1 to {locks.MAX_GRANT_SERVICES} services")
    return tuple(wire.check_service_name(v, f"{path}[{i}]") for i, v in enumerate(value))


@dataclass(frozen=True, slots=True)
class LockGrantRequest:
    """Body of ``PUT /v1/lock-grants/{name}``: the services that share lock ``name``."""

    services: tuple[str, ...] = spec(
        dataclasses.MISSING,
        "services whose lock of this name is one and the same lock",
        parse=_services,
        schema={
            "type": "array",
            "minItems": 1,
            "maxItems": locks.MAX_GRANT_SERVICES,
            "items": {"type": "string", "pattern": f"^{wire.SERVICE_NAME.pattern}$"},
        },
    )


def _pem(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise WireError(path, "must be a PEM certificate (a string)")
    if len(value) > wire.MAX_ROOT_BYTES:
        raise WireError(path, f"is over {wire.MAX_ROOT_BYTES} bytes")
    return value


@dataclass(frozen=True, slots=True)
class RootRequest:
    """Body of ``POST /v1/trust-bundle``: a root certificate sidecars are to trust."""

    pem: str = spec(
        dataclasses.MISSING,
        "one CA certificate (basicConstraints CA:TRUE), PEM",
        parse=_pem,
        schema={"type": "string", "maxLength": wire.MAX_ROOT_BYTES},
    )
