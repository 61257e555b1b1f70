"""The contract the control plane and the sidecars both speak.

Standard library only: the sidecar imports this module (and ``ring``) and nothing else from
the control plane. It holds the names both sides validate (service names, instance ids) and the
per-service policy document that ``PUT /v1/services/{svc}/policy`` and the sidecar's static
routing file share.

Every document is a frozen dataclass that validates itself in ``__post_init__``. Each field
carries a :func:`spec` (description, unit, bounds) from which both the JSON parser
(:func:`parse`) and the JSON Schema (:func:`json_schema`, used by ``/openapi.json``) are
derived, so the spec a user reads is the check the code runs.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

SERVICE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
INSTANCE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")

LB_POLICIES = ("round_robin", "random", "least_request", "peak_ewma", "ring_hash", "maglev")
HASH_POLICIES = frozenset({"ring_hash", "maglev"})
HASH_ON = re.compile(r"(header|cookie|query):[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}|path|source_ip")
RETRY_ON_EVENTS = ("connect-failure", "reset")
_STATUS_TEXT = re.compile(r"[45][0-9][0-9]", re.ASCII)


class WireError(ValueError):
    """A document is not valid; ``field`` is the dotted path of the offending key."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def under(self, prefix: str) -> WireError:
        """The same error, its field path nested below ``prefix``."""
        return WireError(f"{prefix}.{self.field}" if prefix else self.field, self.message)


def check_service_name(name: str, field: str = "service") -> str:
    if not isinstance(name, str) or SERVICE_NAME.fullmatch(name) is None:
        raise WireError(
            field,
            "must be a DNS label: 1-63 of a-z, 0-9 and '-', not starting or ending with '-'",
        )
    return name


def check_instance_id(instance_id: str, field: str = "id") -> str:
    if not isinstance(instance_id, str) or INSTANCE_ID.fullmatch(instance_id) is None:
        raise WireError(field, "must be 1-128 of A-Z, a-z, 0-9, '.', '_' and '-'")
    return instance_id


PORT_RANGE = (1, 65535)
WEIGHT_RANGE = (1, 10_000)
DEFAULT_WEIGHT = 100
ZONE = re.compile(r"[A-Za-z0-9._-]{0,63}")
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def check_address(address: Any, field: str = "address") -> str:
    """An IP address (v4 or v6) or a DNS hostname."""
    if isinstance(address, str):
        try:
            ipaddress.ip_address(address)
            return address
        except ValueError:
            host = address.removesuffix(".")
            labels = host.split(".")
            if (
                0 < len(host) <= 253
                and all(_HOST_LABEL.fullmatch(x) for x in labels)
                and not labels[-1].isdigit()  # 999.1.1.1 is a bad IP, not a hostname
            ):
                return address
    raise WireError(field, f"must be an IP address or a hostname, got {_json_type(address)}")


def check_zone(zone: Any, field: str = "zone") -> str:
    if not isinstance(zone, str) or ZONE.fullmatch(zone) is None:
        raise WireError(field, "must be at most 63 of A-Z, a-z, 0-9, '.', '_' and '-'")
    return zone


def check_int(value: Any, field: str, bounds: tuple[int, int]) -> int:
    lo, hi = bounds
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise WireError(field, f"must be an integer from {lo} to {hi}, got {_json_type(value)}")
    return value


# -- field specs -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Spec:
    """What a document field means and which values it admits."""

    doc: str
    unit: str = ""
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    pattern: str = ""
    #: replaces the generic JSON-to-Python conversion (value, path) -> value
    parse: Callable[[Any, str], Any] | None = None
    #: replaces the generated JSON Schema
    schema: Mapping[str, Any] | None = None


def spec(default: Any, doc: str, **kwargs: Any) -> Any:
    """A dataclass field with a default and a :class:`Spec`."""
    return field(default=default, metadata={"spec": Spec(doc, **kwargs)})


def _spec_of(f: dataclasses.Field[Any]) -> Spec:
    found = f.metadata.get("spec")
    assert isinstance(found, Spec), f"field {f.name} has no spec"
    return found


def check_bounds(doc: Any) -> None:
    """Check every field of a document against its spec (call from ``__post_init__``)."""
    for f in dataclasses.fields(doc):
        s = _spec_of(f)
        value = getattr(doc, f.name)
        if value is None or isinstance(value, bool):
            continue
        if s.choices and value not in s.choices:
            raise WireError(f.name, f"must be one of {', '.join(s.choices)}; got {value!r}")
        if s.pattern and (not isinstance(value, str) or not re.fullmatch(s.pattern, value)):
            raise WireError(f.name, f"{value!r} is not of the form {s.pattern}")
        if isinstance(value, int | float) and not (
            (s.lo is None or value >= s.lo) and (s.hi is None or value <= s.hi)
        ):
            unit = f" {s.unit}" if s.unit else ""
            raise WireError(
                f.name, f"must be from {_num(s.lo)} to {_num(s.hi)}{unit}; got {str(value)[:40]}"
            )


def _num(x: float | None) -> str:
    if x is None:
        return "any"
    return str(int(x)) if float(x).is_integer() else str(x)


# -- JSON to documents -------------------------------------------------------------------

D = TypeVar("D")


def parse(cls: type[D], data: Any, path: str = "") -> D:
    """Build document ``cls`` from decoded JSON, rejecting unknown keys and wrong types.

    Absent keys take their defaults. Errors name the dotted path below ``path``.
    """
    if not isinstance(data, dict):
        raise WireError(path or "(document)", f"must be an object, got {_json_type(data)}")
    assert dataclasses.is_dataclass(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise WireError(
            _join(path, str(unknown[0])), f"unknown key; allowed keys: {', '.join(known)}"
        )
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise WireError(_join(path, missing[0]), "is required")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        f = known[name]
        s = _spec_of(f)
        where = _join(path, name)
        if value is None and f.default is None:
            kwargs[name] = None  # null is "not given" wherever the default is None
        else:
            kwargs[name] = s.parse(value, where) if s.parse else _convert(hints[name], value, where)
    try:
        return cls(**kwargs)
    except WireError as e:
        raise e.under(path) from None


def _convert(hint: Any, value: Any, path: str) -> Any:
    hint = _not_none(hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return parse(hint, value, path)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            raise WireError(path, "is too large") from None
        if math.isfinite(number):
            return number
    if hint is str and isinstance(value, str):
        return value
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    raise WireError(path, f"must be {expected.get(hint, hint)}, got {_json_type(value)}")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}"[:80]
    if isinstance(value, dict):
        return "an object"
    return "an array" if isinstance(value, list) else type(value).__name__


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# -- documents to JSON ---------------------------------------------------------------------


def to_json(doc: Any) -> dict[str, Any]:
    """A document as plain JSON-ready values (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    result: dict[str, Any] = plain(dataclasses.asdict(doc))
    return result


def json_schema(cls: type[Any]) -> dict[str, Any]:
    """JSON Schema (2020-12, as OpenAPI 3.1 uses it) for document ``cls``."""
    hints = typing.get_type_hints(cls)
    properties: dict[str, Any] = {}
    required = []
    for f in dataclasses.fields(cls):
        s = _spec_of(f)
        prop = dict(s.schema) if s.schema is not None else _schema_for(_not_none(hints[f.name]), s)
        if f.default is None:
            prop = {"anyOf": [{"type": "null"}, prop]}
        if f.default is dataclasses.MISSING:
            required.append(f.name)
        description = s.doc + (f" ({s.unit})" if s.unit else "")
        prop["description"] = description
        if f.default is not dataclasses.MISSING:
            default = f.default
            prop["default"] = (
                to_json(default) if dataclasses.is_dataclass(default) else _plain(default)
            )
        properties[f.name] = prop
    schema: dict[str, Any] = {"type": "object", "additionalProperties": False}
    if required:
        schema["required"] = required
    schema["properties"] = properties
    return schema


def _not_none(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = (a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _schema_for(hint: Any, s: Spec) -> dict[str, Any]:
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return json_schema(hint)
    out: dict[str, Any] = {
        bool: {"type": "boolean"},
        int: {"type": "integer"},
        float: {"type": "number"},
        str: {"type": "string"},
    }[hint]
    if s.lo is not None:
        out["minimum"] = s.lo
    if s.hi is not None:
        out["maximum"] = s.hi
    if s.choices:
        out["enum"] = list(s.choices)
    if s.pattern:
        out["pattern"] = f"^(?:{s.pattern})$"
    return out


# -- the policy document -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """Retries allowed per service over a 10 s window: ``ratio`` x requests + ``min_per_s``."""

    ratio: float = spec(0.2, "retries as a fraction of requests", lo=0, hi=1)
    min_per_s: int = spec(10, "retries always allowed", unit="per second", lo=0, hi=100_000)

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass(frozen=True, slots=True)
class Outlier:
    """Passive outlier ejection of endpoints that keep failing."""

    consecutive_failures: int = spec(
        5, "failures in a row that eject an endpoint; 0 turns it off", lo=0, hi=1000
    )
    base_ejection_ms: int = spec(
        30_000,
        "first ejection time, multiplied by the times ejected",
        unit="milliseconds",
        lo=1,
        hi=3_600_000,
    )
    max_ejection_percent: int = spec(
        50,
        "most endpoints of a service ejected at once (one always can be)",
        unit="%",
        lo=0,
        hi=100,
    )

    def __post_init__(self) -> None:
        check_bounds(self)


@dataclass(frozen=True, slots=True)
class Hedge:
    """A second try to another endpoint when the first has not answered in ``after_ms``."""

    after_ms: int = spec(
        dataclasses.MISSING, "delay before the hedged try", unit="milliseconds", lo=1, hi=3_600_000
    )

    def __post_init__(self) -> None:
        check_bounds(self)


def _parse_retry_on(value: Any, path: str) -> tuple[str | int, ...]:
    if not isinstance(value, list):
        raise WireError(path, f"must be an array, got {_json_type(value)}")
    out: list[str | int] = []
    for i, item in enumerate(value):
        where = f"{path}[{i}]"
        if isinstance(item, str) and _STATUS_TEXT.fullmatch(item):
            item = int(item)
        if isinstance(item, bool) or not (
            item in RETRY_ON_EVENTS or (isinstance(item, int) and 400 <= item <= 599)
        ):
            raise WireError(
                where, f"must be {' or '.join(RETRY_ON_EVENTS)} or a status 400-599, got {item!r}"
            )
        if item in out:
            raise WireError(where, f"{item!r} is listed twice")
        out.append(item)
    return tuple(out)


def _parse_hedge(value: Any, path: str) -> Hedge | None:
    if value is None or value is False or value == "off":
        return None
    if not isinstance(value, dict):
        raise WireError(path, 'must be "off" or {"after_ms": N}')
    return parse(Hedge, value, path)


_RETRY_ON_SCHEMA = {
    "type": "array",
    "uniqueItems": True,
    "items": {
        "oneOf": [
            {"enum": list(RETRY_ON_EVENTS)},
            {"type": "integer", "minimum": 400, "maximum": 599},
            {"type": "string", "pattern": "^[45][0-9][0-9]$"},
        ]
    },
}
_HEDGE_SCHEMA = {
    "oneOf": [
        {"const": "off"},
        {"const": False},
        {
            "type": "object",
            "additionalProperties": False,
            "required": ["after_ms"],
            "properties": {"after_ms": {"type": "integer", "minimum": 1, "maximum": 3_600_000}},
        },
    ]
}


@dataclass(frozen=True, slots=True)
class Policy:
    """How callers balance, retry, time out and protect themselves for one service.

    Every key is optional; absent keys take the defaults below.
    """

    lb: str = spec("peak_ewma", "load-balancing policy", choices=LB_POLICIES)
    hash_on: str | None = spec(
        None,
        "request key of the hash policies: header:NAME, cookie:NAME, query:NAME, path, source_ip",
        pattern=HASH_ON.pattern,
    )
    hash_balance_factor: float = spec(
        1.25, "bounded loads: no endpoint above this x the mean in-flight", lo=1, hi=100
    )
    timeout_ms: int = spec(
        15_000, "route timeout, all tries", unit="milliseconds", lo=1, hi=3_600_000
    )
    connect_timeout_ms: int = spec(
        1_000, "TCP connect timeout", unit="milliseconds", lo=1, hi=60_000
    )
    retries: int = spec(1, "retries after the first try (idempotent requests only)", lo=0, hi=10)
    retry_on: tuple[str | int, ...] = spec(
        ("connect-failure", "reset", 502, 503, 504),
        "what a retry is for: connect-failure, reset, or response statuses",
        parse=_parse_retry_on,
        schema=_RETRY_ON_SCHEMA,
    )
    retry_budget: RetryBudget = spec(RetryBudget(), "retries allowed over a 10 s window")
    max_requests: int = spec(1024, "in-flight requests to the service", lo=1, hi=1_000_000)
    outlier: Outlier = spec(Outlier(), "passive outlier ejection")
    panic_threshold: int = spec(
        50, "below this share of healthy endpoints, balance over all", unit="%", lo=0, hi=100
    )
    slow_start_ms: int = spec(
        30_000,
        "weight ramp for new or recovered endpoints; 0 is off",
        unit="milliseconds",
        lo=0,
        hi=3_600_000,
    )
    zone_aware: bool = spec(True, "prefer endpoints in the caller's zone while it has capacity")
    hedge: Hedge | None = spec(
        None,
        'hedged requests: "off" (null) or {"after_ms": N}',
        parse=_parse_hedge,
        schema=_HEDGE_SCHEMA,
    )

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.lb in HASH_POLICIES and self.hash_on is None:
            raise WireError("hash_on", f"is required when lb is {self.lb}")
        if self.lb not in HASH_POLICIES and self.hash_on is not None:
            raise WireError("hash_on", "applies only when lb is ring_hash or maglev")
        if self.connect_timeout_ms > self.timeout_ms:
            raise WireError("connect_timeout_ms", "must not exceed timeout_ms")
        if self.hedge is not None and self.hedge.after_ms >= self.timeout_ms:
            raise WireError("hedge.after_ms", "must be less than timeout_ms")


DEFAULT_POLICY = Policy()


def parse_policy(data: Any, path: str = "") -> Policy:
    """A policy document from decoded JSON or YAML; raises :class:`WireError`."""
    return parse(Policy, data, path)


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

    def __post_init__(self) -> None:
        check_bounds(self)
        check_address(self.address)
        check_zone(self.zone)


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

    def __post_init__(self) -> None:
        check_bounds(self)


def _parse_services(value: Any, path: str) -> dict[str, ServiceEntry]:
    if not isinstance(value, dict):
        raise WireError(path, f"must be an object of services, got {_json_type(value)}")
    services = {}
    for name, entry in value.items():
        check_service_name(name, f"{path}.{name}")
        services[name] = parse(ServiceEntry, {} if entry is None else entry, f"{path}.{name}")
    return services


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

    def __post_init__(self) -> None:
        check_bounds(self)


def parse_table(data: Any) -> Table:
    """A routing table from decoded JSON or YAML; raises :class:`WireError`."""
    return parse(Table, data)
