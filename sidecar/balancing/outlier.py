"""Passive outlier ejection: endpoints that keep failing leave the pick for a while.

An endpoint is ejected after ``consecutive_failures`` failures in a row (5xx, connect
failures, resets, timeouts), or when at least ``failure_rate_percent`` of at least
``failure_rate_min_requests`` requests in a 10 s window failed (counted from its first
failure). It stays out for ``base_ejection_ms`` x the times it was ejected (at most
``max_ejection_ms``; the count starts over after that long healthy). Then one real request
probes it (half-open: it takes no other until that one ends): success restores it, failure
ejects it again, longer. At most ``max_ejection_percent`` of a service's endpoints are out at
once, but one always can be (envoy#3263, #26877).

Per-endpoint state (``Ejection``) is made at the endpoint's first failure, so endpoints that
never fail cost nothing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from control_plane.wire.policy import Outlier
from sidecar.balancing.ewma import Ejection, EndpointStats, Phase

if TYPE_CHECKING:
    from control_plane.wire import Endpoint
    from sidecar.balancing.balancer import Member

log = logging.getLogger("meshlet.outlier")

WINDOW = 10.0
"""seconds of the failure-rate window"""


def record(
    stats: EndpointStats,
    failed: bool,
    now: float,
    config: Outlier,
    members: Sequence[Member],
    service: str,
    endpoint: Endpoint | None = None,
) -> bool:
    """A try's outcome; True when it ejected the endpoint (``endpoint`` names it in logs)."""
    e = stats.ejection
    if e is None:
        if not failed:
            return False
        e = stats.ejection = Ejection(now)
    if e.phase is Phase.PROBING:
        stats.exclusions.probing -= 1
        if failed:
            return _eject(stats, e, now, config, _named(service, endpoint), "its probe failed")
        _restore(stats, e, now, _named(service, endpoint))
        return False
    if e.phase is Phase.EJECTED:
        return False  # a try that was in flight when it was ejected
    if now - e.window >= WINDOW:
        e.window, e.requests, e.failures = now, 0, 0
    e.requests += 1
    if not failed:
        e.consecutive = 0
        return False
    e.failures += 1
    e.consecutive += 1
    if config.consecutive_failures and e.consecutive >= config.consecutive_failures:
        why = f"{e.consecutive} failures in a row"
    elif (
        config.failure_rate_percent
        and e.requests >= config.failure_rate_min_requests
        and e.failures * 100 >= config.failure_rate_percent * e.requests
    ):
        why = f"{e.failures} of {e.requests} requests failed in {WINDOW:.0f} s"
    else:
        return False
    if not may_eject(members, config):
        return False
    return _eject(stats, e, now, config, _named(service, endpoint), why)


def may_eject(members: Sequence[Member], config: Outlier) -> bool:
    """Whether one more of ``members`` may be out: under the percentage, or none is."""
    out = sum(
        1 for m in members if m.stats.ejection and m.stats.ejection.phase is not Phase.HEALTHY
    )
    return out < max(1, math.floor(len(members) * config.max_ejection_percent / 100))


def probe(stats: EndpointStats) -> None:
    """An ejected endpoint was picked: this request is its probe; none other goes there
    until it ends."""
    e = stats.ejection
    if e is not None and e.phase is Phase.EJECTED:
        e.phase = Phase.PROBING
        stats.excluded_until = math.inf
        stats.exclusions.probing += 1


def abandon(stats: EndpointStats, now: float) -> None:
    """A probe that ended without an answer (its client left): the next request probes."""
    e = stats.ejection
    if e is not None and e.phase is Phase.PROBING:
        e.phase = Phase.EJECTED
        stats.exclusions.probing -= 1
        stats.excluded_until = now


def _named(service: str, endpoint: Endpoint | None) -> str:
    """For a log line (only then: records of healthy tries build no strings)."""
    return f"{service}: endpoint {endpoint.address}:{endpoint.port}" if endpoint else service


def _eject(
    stats: EndpointStats, e: Ejection, now: float, config: Outlier, named: str, why: str
) -> bool:
    if now - e.restored_at > config.max_ejection_ms / 1000:
        e.times = 0  # healthy for long enough: start over
    e.times += 1
    seconds = min(config.base_ejection_ms * e.times, config.max_ejection_ms) / 1000
    e.phase = Phase.EJECTED
    e.consecutive = 0
    e.window, e.requests, e.failures = now, 0, 0
    stats.excluded_until = now + seconds  # (over any Retry-After: ejection is longer)
    stats.exclusions.until = max(stats.exclusions.until, stats.excluded_until)
    log.warning("%s ejected for %.0f s: %s", named, seconds, why)
    return True


def _restore(stats: EndpointStats, e: Ejection, now: float, named: str) -> None:
    e.phase = Phase.HEALTHY
    e.consecutive = 0
    e.window, e.requests, e.failures = now, 0, 0
    e.restored_at = now
    if stats.excluded_until == math.inf:  # (a Retry-After the probe was sent stays)
        stats.excluded_until = 0.0
    log.info("%s restored: its probe succeeded", named)
