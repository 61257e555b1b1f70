"""The push stream (WebSocket ``/v1/stream``): the messages both sides exchange, as JSON
text frames with a ``type``."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from control_plane.wire.checks import (
    MAX_CSR_BYTES,
    WireError,
    _json_type,
    check_instance_id,
    check_service_name,
    check_unicode,
)
from control_plane.wire.documents import check_bounds, lenient, parse, spec, to_json
from control_plane.wire.table import _ID_SCHEMA, Registration, Table

STREAM_PATH = "/v1/stream"
HEALTH = ("healthy", "unhealthy")


@dataclass(frozen=True, slots=True)
class Hello:
    """Sidecar -> control plane, first: who it is, and the table version it has."""

    node: str = spec(
        dataclasses.MISSING, "this sidecar process's id", parse=check_instance_id, schema=_ID_SCHEMA
    )
    service: str = spec(
        dataclasses.MISSING,
        "the service it stands beside",
        parse=check_service_name,
        schema={"type": "string"},
    )
    instance: Registration = spec(dataclasses.MISSING, "the instance it registers")
    version: int = spec(0, "the last table version it applied (0: none)", lo=0)
    health: str = spec("healthy", "its app's health", choices=HEALTH)
    epoch: str = spec("", "the epoch of the table it has (empty: none)", schema={"type": "string"})
    tls: bool = spec(False, "its inbound listener accepts mesh TLS")

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Sidecar -> control plane, every 5 s (and when its app's health changes)."""

    health: str = spec("healthy", "its app's health", choices=HEALTH)

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass(frozen=True, slots=True)
class Ack:
    """Sidecar -> control plane: this table version is in force."""

    version: int = spec(dataclasses.MISSING, "the table version applied", lo=1)

    def __post_init__(self) -> None:
        check_bounds(self)


def _error_text(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise WireError(path, f"must be a string, got {_json_type(value)}")
    return value[:1024]


@dataclass(frozen=True, slots=True)
class Nack:
    """Sidecar -> control plane: this table version was refused; the old one stays."""

    version: int = spec(dataclasses.MISSING, "the table version refused", lo=0)
    error: str = spec("", "why, for a person", parse=_error_text, schema={"type": "string"})

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass(frozen=True, slots=True)
class Deregister:
    """Sidecar -> control plane, on shutdown: remove my instance now."""


@dataclass(frozen=True, slots=True)
class Welcome:
    """Control plane -> sidecar, answering hello: its instance id and the current version."""

    instance: str = spec(
        dataclasses.MISSING, "the instance id", parse=check_instance_id, schema=_ID_SCHEMA
    )
    version: int = spec(dataclasses.MISSING, "the current table version", lo=0)
    epoch: str = spec(
        "",
        "the control plane's table history: versions compare only within one epoch",
        schema={"type": "string"},
    )

    def __post_init__(self) -> None:
        check_bounds(self)


def _pem_text(value: Any, path: str) -> str:
    """A PEM document; its size is the signer's to judge (it answers a refusal, and the
    stream's frame limit bounds what arrives)."""
    if not isinstance(value, str):
        raise WireError(path, f"must be a string, got {_json_type(value)}")
    return value


@dataclass(frozen=True, slots=True)
class Csr:
    """Sidecar -> control plane, after hello: sign my key for my service's identity."""

    csr: str = spec(
        dataclasses.MISSING,
        f"a PEM certificate signing request, at most {MAX_CSR_BYTES} bytes, of an ECDSA "
        "P-256 key; it may ask for no identity but the stream's",
        parse=_pem_text,
        schema={"type": "string", "maxLength": MAX_CSR_BYTES},
    )


@dataclass(frozen=True, slots=True)
class Certificate:
    """Control plane -> sidecar, answering a csr: the certificate, or why not."""

    chain: str = spec(
        "",
        "PEM: the workload certificate, then any intermediates up to (not including) the "
        "root; empty when refused",
        parse=_pem_text,
        schema={"type": "string"},
    )
    error: str = spec(
        "",
        "why the CSR was refused; empty on success",
        parse=_error_text,
        schema={"type": "string"},
    )


Message = Hello | Heartbeat | Ack | Nack | Deregister | Welcome | Table | Csr | Certificate
_MESSAGES: dict[str, type[Any]] = {
    "hello": Hello,
    "heartbeat": Heartbeat,
    "ack": Ack,
    "nack": Nack,
    "deregister": Deregister,
    "welcome": Welcome,
    "table": Table,
    "csr": Csr,
    "certificate": Certificate,
}
_TYPES = {cls: name for name, cls in _MESSAGES.items()}


def encode(message: Message) -> str:
    return json.dumps({"type": _TYPES[type(message)], **to_json(message)}, separators=(",", ":"))


def decode(text: str | bytes) -> Message:
    """One stream message; WireError names what is wrong (``type`` for an unknown one)."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise WireError("(message)", f"not JSON: {e}") from None
    if not isinstance(data, dict):
        raise WireError("(message)", f"must be an object, got {_json_type(data)}")
    check_unicode(text, data)
    kind = data.pop("type", None)
    cls = _MESSAGES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise WireError("type", f"must be one of {', '.join(_MESSAGES)}; got {kind!r}")
    with lenient():  # a peer of a newer version may send fields this one does not know
        message: Message = parse(cls, data)
    return message
