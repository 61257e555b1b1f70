"""Instances as they register, and the routing table a sidecar routes by."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import ipaddress
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from control_plane.wire.checks import (
    DEFAULT_WEIGHT,
    INSTANCE_ID,
    MAX_ROOT_BYTES,
    MAX_ROOTS,
    METADATA_KEY_MAX,
    METADATA_MAX_ENTRIES,
    METADATA_VALUE_MAX,
    PORT_RANGE,
    WEIGHT_RANGE,
    ZONE,
    WireError,
    _json_type,
    check_address,
    check_instance_id,
    check_metadata,
    check_namespace,
    check_service_name,
    check_trust_domain,
    check_zone,
)
from control_plane.wire.documents import check_bounds, parse, spec, to_json
from control_plane.wire.pem import parse_bundle
from control_plane.wire.policy import DEFAULT_POLICY, Policy

_ID_SCHEMA = {"type": "string", "pattern": f"^{INSTANCE_ID.pattern}$"}
_ZONE_SCHEMA = {"type": "string", "pattern": f"^{ZONE.pattern}$"}
_NAMESPACE_SCHEMA = {"type": "string", "pattern": "^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)?$"}
_NAMESPACE = "Kubernetes namespace (SERVICE.NAMESPACE names it), empty for none"
_METADATA_SCHEMA = {
    "type": "object",
    "maxProperties": METADATA_MAX_ENTRIES,
    "propertyNames": {"minLength": 1, "maxLength": METADATA_KEY_MAX},
    "additionalProperties": {"type": "string", "maxLength": METADATA_VALUE_MAX},
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
        parse=check_address,
        schema={"type": "string", "minLength": 1, "maxLength": 253},
    )
    port: int = spec(dataclasses.MISSING, "TCP port", lo=PORT_RANGE[0], hi=PORT_RANGE[1])
    id: str | None = spec(
        None,
        "instance id, unique in the service; default: from address and port",
        parse=check_instance_id,
        schema=_ID_SCHEMA,
    )
    zone: str | None = spec(
        None, "locality zone, empty for none", parse=check_zone, schema=_ZONE_SCHEMA
    )
    namespace: str | None = spec(None, _NAMESPACE, parse=check_namespace, schema=_NAMESPACE_SCHEMA)
    weight: int | None = spec(
        None,
        f"relative share of traffic; default {DEFAULT_WEIGHT}",
        lo=WEIGHT_RANGE[0],
        hi=WEIGHT_RANGE[1],
    )
    metadata: dict[str, str] | None = spec(
        None,
        "string labels, at most 64",
        parse=check_metadata,
        schema=_METADATA_SCHEMA,
    )

    def __post_init__(self) -> None:
        check_bounds(self)

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
    if len(candidate) <= 128 and INSTANCE_ID.fullmatch(candidate):
        return candidate
    return hashlib.blake2b(candidate.encode(), digest_size=16).hexdigest()


# -- the routing table ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One place a service can be reached."""

    address: str = spec(
        dataclasses.MISSING,
        "IP address or hostname",
        parse=check_address,
        schema={"type": "string", "minLength": 1, "maxLength": 253},
    )
    port: int = spec(dataclasses.MISSING, "TCP port", lo=PORT_RANGE[0], hi=PORT_RANGE[1])
    weight: int = spec(
        DEFAULT_WEIGHT, "relative share of traffic", lo=WEIGHT_RANGE[0], hi=WEIGHT_RANGE[1]
    )
    zone: str = spec(
        "", "locality zone, empty for none", parse=check_zone, schema={"type": "string"}
    )
    draining: bool = spec(False, "in-flight requests finish; no new ones are sent")
    instance: str = spec("", "the registry's instance id, empty in static files")
    namespace: str = spec("", _NAMESPACE, parse=check_namespace, schema=_NAMESPACE_SCHEMA)
    tls: bool = spec(False, "its sidecar accepts mesh TLS on this address")

    def __post_init__(self) -> None:
        check_bounds(self)
        check_address(self.address)
        check_zone(self.zone)
        check_namespace(self.namespace)
        if self.instance:
            check_instance_id(self.instance, "instance")


def _parse_endpoints(value: Any, path: str) -> tuple[Endpoint, ...]:
    if not isinstance(value, list):
        raise WireError(path, f"must be an array, got {_json_type(value)}")
    endpoints = tuple(parse(Endpoint, item, f"{path}[{i}]") for i, item in enumerate(value))
    seen: set[tuple[str, int]] = set()
    for i, e in enumerate(endpoints):
        if (e.address, e.port) in seen:
            raise WireError(f"{path}[{i}]", f"{e.address}:{e.port} is listed twice")
        seen.add((e.address, e.port))
    return endpoints


def _parse_ring(value: Any, path: str) -> dict[str, str]:
    """A ring's packed form (``ring.encode``); its content is checked where it is decoded."""
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise WireError(path, "must be an object of strings (a packed ring)")
    return value


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    """A service as callers see it: how to call it and where."""

    policy: Policy = spec(DEFAULT_POLICY, "how callers balance, retry and time out")
    endpoints: tuple[Endpoint, ...] = spec(
        (),
        "routable endpoints",
        parse=_parse_endpoints,
        schema={"type": "array", "items": {"type": "object"}},
    )
    ring: dict[str, str] | None = spec(
        None,
        "hash policies: the ring over the endpoints not draining, built by the control plane",
        parse=_parse_ring,
        schema={"type": "object", "additionalProperties": {"type": "string"}},
    )

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass(slots=True)
class Following:
    """The table in force while the next one is parsed (``following``): its services, and
    for those it was sent in a table message a digest of the JSON they came in, ``sent``.
    ``digests``: the same for the table parsed, once a table message was read service by
    service (one read whole makes none)."""

    services: Mapping[str, ServiceEntry]
    sent: Mapping[str, bytes]
    digests: Mapping[str, bytes] = dataclasses.field(default_factory=dict)


#: the table in force while the next one is parsed (``following``)
_in_force: contextvars.ContextVar[Following | None] = contextvars.ContextVar(
    "in_force", default=None
)


@contextlib.contextmanager
def following(
    services: Mapping[str, ServiceEntry], sent: Mapping[str, bytes] = MappingProxyType({})
) -> Iterator[Following]:
    """Within: a table parsed takes the entry of ``services`` (the table in force) for every
    service whose entry equals it, and shares their policies. A new version then holds new
    objects only for what changed (a sidecar keeps the routes of the others too), and the
    old and new copies of a large table are never alive together. A service a table message
    sends in the very JSON ``sent`` has a digest of is taken without parsing it again: an
    unchanged 1,000 x 10 table costs 30 ms instead of 0.5 s. Pass the digests only with the
    services they were made with (``Following.digests`` of the message that made them)."""
    now = Following(services, sent)
    token = _in_force.set(now)
    try:
        yield now
    finally:
        _in_force.reset(token)


def _parse_services(value: Any, path: str) -> dict[str, ServiceEntry]:
    if not isinstance(value, dict):
        raise WireError(path, f"must be an object of services, got {_json_type(value)}")
    services = ServiceEntries(path)
    for name, entry in value.items():
        services.add(name, entry)
    return services.parsed


class ServiceEntries:
    """A table's services, parsed one at a time (``decode`` takes a large table's services
    as it decodes them). Most services share a few policies: one of each is kept, the table
    in force's first; a service equal to its entry there is that entry (``following``)."""

    def __init__(self, path: str = "services") -> None:
        self.path = path
        self.following = _in_force.get()
        self.in_force: Mapping[str, ServiceEntry] = (
            self.following.services if self.following is not None else {}
        )
        self.policies = {entry.policy: entry.policy for entry in self.in_force.values()}
        self.parsed: dict[str, ServiceEntry] = {}
        self.digests: dict[str, bytes] = {}
        """of the services ``add`` was given the JSON text of, while ``following``"""

    def add(self, name: str, entry: Any, sent: str | None = None) -> None:
        """Service ``name`` from its decoded JSON (WireError names what is wrong); ``sent``:
        the JSON text it was decoded from, when a table message is read one service at a
        time."""
        if sent is not None and self.following is not None:
            digest = hashlib.blake2b(sent.encode(), digest_size=16).digest()
            self.digests[name] = digest
            kept = self.in_force.get(name)
            if kept is not None and self.following.sent.get(name) == digest:
                self.parsed[name] = kept
                return
        check_service_name(name, f"{self.path}.{name}")
        parsed = parse(ServiceEntry, {} if entry is None else entry, f"{self.path}.{name}")
        kept = self.in_force.get(name)
        if kept is not None and kept == parsed:
            parsed = kept
        else:
            shared = self.policies.setdefault(parsed.policy, parsed.policy)
            if shared is not parsed.policy:
                parsed = ServiceEntry(shared, parsed.endpoints, parsed.ring)
        self.parsed[name] = parsed


def _parse_trust_domain(value: Any, path: str) -> str:
    return "" if value == "" else check_trust_domain(value, path)


def _parse_trust_bundle(value: Any, path: str) -> tuple[str, ...]:
    """Each a PEM CA certificate, checked with ``ssl`` (``pem``): a sidecar holding a table
    does not load ``cryptography``."""
    return () if value == [] else parse_bundle(value, path)


@dataclass(frozen=True, slots=True)
class Table:
    """Everything a sidecar routes by: the static file's content, or a pushed snapshot."""

    services: dict[str, ServiceEntry] = spec(
        dataclasses.MISSING,
        "services by name",
        parse=_parse_services,
        schema={"type": "object"},
    )
    version: int = spec(0, "increases with every change the control plane pushes", lo=0)
    epoch: str = spec(
        "", "the control plane's table history it belongs to", schema={"type": "string"}
    )
    built: float = spec(
        0.0,
        "when the control plane built this version; 0: unknown (a file)",
        unit="wall-clock seconds since 1970",
        lo=0,
    )
    trust_domain: str = spec(
        "",
        "the SPIFFE trust domain of the mesh's identities (empty: none)",
        parse=_parse_trust_domain,
        schema={"type": "string"},
    )
    trust_bundle: tuple[str, ...] = spec(
        (),
        f"PEM root certificates the sidecars trust, at most {MAX_ROOTS} of at most "
        f"{MAX_ROOT_BYTES} bytes (empty: no mesh TLS)",
        parse=_parse_trust_bundle,
        schema={
            "type": "array",
            "maxItems": MAX_ROOTS,
            "items": {"type": "string", "maxLength": MAX_ROOT_BYTES},
        },
    )

    def __post_init__(self) -> None:
        check_bounds(self)


def parse_table(data: Any) -> Table:
    """A routing table from decoded JSON or YAML; raises :class:`WireError`."""
    return parse(Table, data)


def table_message(table: Table) -> str:
    """A table as the control plane pushes it, compact JSON. A service's or an endpoint's
    field that holds its default is left out, as a routing file leaves it out: the parser
    puts it back, and ``decode(table_message(t)) == t``. (Every field of 10,000 endpoints and
    a whole policy per service made a 1,000 x 10 table 1.9 MB of text, whose JSON objects
    took 6.8 MB of the sidecar's memory while it was parsed; left out, 0.6 MB and 2.6 MB.)"""
    body = {"type": "table", **to_json(table)}
    body["services"] = {name: _entry_json(entry) for name, entry in table.services.items()}
    return json.dumps(body, separators=(",", ":"))


def _entry_json(entry: ServiceEntry) -> dict[str, Any]:
    said = _said(entry, ("endpoints",))
    if entry.endpoints:
        said["endpoints"] = [_said(e) for e in entry.endpoints]
    return said


def _said(doc: Any, apart: tuple[str, ...] = ()) -> dict[str, Any]:
    """A document's fields (but those ``apart``) that differ from their defaults, as JSON
    values; a policy the same way, the documents it holds (its outlier settings ...) whole."""
    said: dict[str, Any] = {}
    for f in dataclasses.fields(doc):
        value = getattr(doc, f.name)
        if f.name in apart or value == f.default:
            continue
        if isinstance(value, Policy):
            said[f.name] = _said(value)
        elif dataclasses.is_dataclass(value):
            said[f.name] = to_json(value)
        else:
            said[f.name] = list(value) if isinstance(value, tuple) else value
    return said
