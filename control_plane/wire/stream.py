"""The push stream (WebSocket ``/v1/stream``): the messages both sides exchange, as JSON
text frames with a ``type``."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from control_plane.wire.checks import (
    _SURROGATE_ESCAPE,
    MAX_CSR_BYTES,
    WireError,
    _json_type,
    check_instance_id,
    check_service_name,
    check_unicode,
)
from control_plane.wire.documents import check_bounds, lenient, parse, spec, to_json
from control_plane.wire.table import _ID_SCHEMA, Registration, ServiceEntries, Table

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
    if isinstance(text, str) and text.startswith(_TABLE_START):
        table = _table_by_service(text)
        if table is not None:
            return table
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


_TABLE_START = '{"type":"table",'
"""how the control plane's table messages begin (``control_plane.table.message``)"""
_DECODER = json.JSONDecoder()


def _table_by_service(text: str) -> Table | None:
    """A table message decoded one service at a time: the JSON objects of a whole large
    table (7 MB for 1,000 services x 10 endpoints, twice the table they make) are never in
    memory together, only one service's. None for anything this path does not take as it
    comes (a lone surrogate's escape to look for, a second ``services`` or ``type``) or
    finds wrong: ``decode`` then reads the text whole, and says what is wrong as it always
    did."""
    if _SURROGATE_ESCAPE.search(text) is not None:
        return None
    services = ServiceEntries()
    rest: dict[str, Any] = {}

    def member(key: str, at: int) -> int:
        if key == "services" and "services" not in rest:
            rest[key] = None  # (seen: a second one goes the whole-text way)
            return _members(text, at, entry)
        if key in ("services", "type"):
            raise ValueError(f"a second {key!r}")
        rest[key], end = _DECODER.raw_decode(text, at)
        return end

    def entry(name: str, at: int) -> int:
        value, end = _DECODER.raw_decode(text, at)
        services.add(name, value, text[at:end])
        return end

    try:
        with lenient():  # (as ``decode`` parses: a newer peer's fields are skipped)
            end = _members(text, len(_TABLE_START), member, opened=True)
            if _skip(text, end) != len(text) or "services" not in rest:
                return None
            rest["services"] = {}
            table = parse(Table, rest)
    except (WireError, ValueError, RecursionError):
        return None
    if services.following is not None:
        services.following.digests = services.digests
    return dataclasses.replace(table, services=services.parsed)


def _members(text: str, at: int, take: Callable[[str, int], int], opened: bool = False) -> int:
    """Walk the JSON object at ``text[at]`` (``opened``: just inside its brace, where a first
    member follows): ``take(key, start)`` decodes each member's value from ``start`` and says
    where it ends. Where the object ends; ValueError if it is not one."""
    at = _skip(text, at)
    if not opened:
        if not text.startswith("{", at):
            raise ValueError("not an object")
        at = _skip(text, at + 1)
        if text.startswith("}", at):
            return at + 1
    while True:
        key, at = _DECODER.raw_decode(text, at)
        if not isinstance(key, str):
            raise ValueError("a key that is not a string")
        at = _skip(text, at)
        if not text.startswith(":", at):
            raise ValueError("no colon after a key")
        at = take(key, _skip(text, at + 1))
        at = _skip(text, at)
        if text.startswith("}", at):
            return at + 1
        if not text.startswith(",", at):
            raise ValueError("no comma between members")
        at = _skip(text, at + 1)


def _skip(text: str, at: int) -> int:
    """Past the JSON whitespace at ``text[at]``."""
    while text.startswith((" ", "\t", "\n", "\r"), at):
        at += 1
    return at
