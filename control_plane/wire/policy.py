"""The per-service policy document: ``PUT /v1/services/{svc}/policy``, a static table's
``policy:``, and each service of a pushed table."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from control_plane.wire.checks import SERVICE_NAME, WireError, _json_type, check_service_name
from control_plane.wire.documents import check_bounds, parse, spec

LB_POLICIES = ("round_robin", "random", "least_request", "peak_ewma", "ring_hash", "maglev")
HASH_POLICIES = frozenset({"ring_hash", "maglev"})
HASH_ON = re.compile(r"(header|cookie|query):[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}|path|source_ip")
RETRY_ON_EVENTS = ("connect-failure", "reset")
#: gRPC codes a retry may be for (Envoy's ``retry_on`` for gRPC), as they are kept; Envoy's
#: hyphenated spelling (``resource-exhausted``) is accepted too
RETRY_ON_GRPC = ("cancelled", "deadline_exceeded", "internal", "resource_exhausted", "unavailable")
_STATUS_TEXT = re.compile(r"[45][0-9][0-9]", re.ASCII)
MTLS_MODES = ("permissive", "strict")
PROTOCOLS = ("http1", "http2", "auto")
MAX_ALLOW_FROM = 256


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
    failure_rate_percent: int = spec(
        50, "failure rate over a 10 s window that ejects an endpoint; 0 turns it off", lo=0, hi=100
    )
    failure_rate_min_requests: int = spec(
        20, "requests in the window before the failure rate counts", lo=1, hi=1_000_000
    )
    max_ejection_ms: int = spec(
        300_000, "longest ejection", unit="milliseconds", lo=1, hi=86_400_000
    )

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.base_ejection_ms > self.max_ejection_ms:
            raise WireError("base_ejection_ms", "must not exceed max_ejection_ms")


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
        if isinstance(item, str):
            if _STATUS_TEXT.fullmatch(item):
                item = int(item)
            elif item.replace("-", "_") in RETRY_ON_GRPC:
                item = item.replace("-", "_")
        if isinstance(item, bool) or not (
            item in RETRY_ON_EVENTS
            or item in RETRY_ON_GRPC
            or (isinstance(item, int) and 400 <= item <= 599)
        ):
            raise WireError(
                where,
                f"must be {' or '.join(RETRY_ON_EVENTS)}, a status 400-599 or a gRPC code "
                f"({', '.join(RETRY_ON_GRPC)}), got {item!r}",
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


def _parse_allow_from(value: Any, path: str) -> tuple[str, ...]:
    """Service names or "*", each once, at most ``MAX_ALLOW_FROM``."""
    if not isinstance(value, list):
        raise WireError(path, f"must be an array of service names or '*', got {_json_type(value)}")
    if len(value) > MAX_ALLOW_FROM:
        raise WireError(path, f"lists {len(value)} callers; at most {MAX_ALLOW_FROM}")
    seen: set[str] = set()
    for i, name in enumerate(value):
        if name != "*":
            check_service_name(name, f"{path}[{i}]")
        if name in seen:
            raise WireError(f"{path}[{i}]", f"{name!r} is listed twice")
        seen.add(name)
    return tuple(value)


_ALLOW_FROM_SCHEMA = {
    "type": "array",
    "uniqueItems": True,
    "maxItems": MAX_ALLOW_FROM,
    "items": {
        "oneOf": [
            {"const": "*"},
            {"type": "string", "pattern": f"^{SERVICE_NAME.pattern}$"},
        ]
    },
}
_RETRY_ON_SCHEMA = {
    "type": "array",
    "uniqueItems": True,
    "items": {
        "oneOf": [
            {"enum": list(RETRY_ON_EVENTS)},
            {"enum": [*RETRY_ON_GRPC, *(c.replace("_", "-") for c in RETRY_ON_GRPC if "_" in c)]},
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
        15_000,
        "route timeout: until the response head, all tries",
        unit="milliseconds",
        lo=1,
        hi=3_600_000,
    )
    connect_timeout_ms: int = spec(
        1_000, "TCP connect timeout", unit="milliseconds", lo=1, hi=60_000
    )
    per_try_timeout_ms: int | None = spec(
        None,
        "timeout of each try; none: timeout_ms / (retries + 1)",
        unit="milliseconds",
        lo=1,
        hi=3_600_000,
    )
    stream_idle_timeout_ms: int = spec(
        300_000,
        "longest silence either way once a request is under way, its body included; 0 is off",
        unit="milliseconds",
        lo=0,
        hi=86_400_000,
    )
    tunnel_idle_timeout_ms: int = spec(
        3_600_000,
        "longest silence either way of an upgraded connection (WebSocket); 0 is off",
        unit="milliseconds",
        lo=0,
        hi=86_400_000,
    )
    retries: int = spec(1, "retries after the first try (idempotent requests only)", lo=0, hi=10)
    retry_on: tuple[str | int, ...] = spec(
        ("connect-failure", "reset", 502, 503, 504),
        "what a retry is for: connect-failure, reset, response statuses, or gRPC codes "
        "(cancelled, deadline_exceeded, internal, resource_exhausted, unavailable)",
        parse=_parse_retry_on,
        schema=_RETRY_ON_SCHEMA,
    )
    retry_budget: RetryBudget = spec(RetryBudget(), "retries allowed over a 10 s window")
    max_requests: int = spec(1024, "in-flight requests to the service", lo=1, hi=1_000_000)
    max_pending: int = spec(
        1024, "requests of the service waiting for a connection", lo=1, hi=1_000_000
    )
    max_connections: int = spec(1024, "connections to each endpoint", lo=1, hi=1_000_000)
    max_retries: int = spec(1024, "requests of the service retrying at once", lo=0, hi=1_000_000)
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
    protocol: str = spec(
        "http1",
        "how the sidecar speaks to the service's endpoints: http1, http2 (h2c, prior "
        "knowledge, or h2 inside mesh TLS to an endpoint with a mesh identity; each request "
        "balanced on its own), or auto (the caller's protocol)",
        choices=PROTOCOLS,
    )
    mtls: str = spec(
        "permissive",
        "mesh TLS of the service's inbound: permissive takes plaintext from other hosts too "
        "(migration); strict refuses it",
        choices=MTLS_MODES,
    )
    allow_from: tuple[str, ...] = spec(
        ("*",),
        'services whose verified identity may call this one, or "*" for any caller '
        f"(at most {MAX_ALLOW_FROM})",
        parse=_parse_allow_from,
        schema=_ALLOW_FROM_SCHEMA,
    )

    @property
    def hashes(self) -> bool:
        """Whether a request's key places it (ring_hash, maglev): the one place that says."""
        return self.lb in HASH_POLICIES

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.hashes and self.hash_on is None:
            raise WireError("hash_on", f"is required when lb is {self.lb}")
        if not self.hashes and self.hash_on is not None:
            raise WireError("hash_on", "applies only when lb is ring_hash or maglev")
        if self.connect_timeout_ms > self.timeout_ms:
            raise WireError("connect_timeout_ms", "must not exceed timeout_ms")
        if self.per_try_timeout_ms is not None and self.per_try_timeout_ms > self.timeout_ms:
            raise WireError("per_try_timeout_ms", "must not exceed timeout_ms")
        if self.hedge is not None and self.hedge.after_ms >= self.timeout_ms:
            raise WireError("hedge.after_ms", "must be less than timeout_ms")


DEFAULT_POLICY = Policy()


def parse_policy(data: Any, path: str = "") -> Policy:
    """A policy document from decoded JSON or YAML; raises :class:`WireError`."""
    return parse(Policy, data, path)
