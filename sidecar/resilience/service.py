"""What a sidecar keeps per service across routing tables: its limits' counters (Envoy's
circuit breakers), its retry budget, and what happened to it (for ``/clusters``).

Over a limit a request is answered 503 ``overloaded`` at once and counted (a retry over
``max_retries`` is not made, and counted apart); nothing queues without bound.

    max_requests     requests of the service in flight
    max_pending      requests of the service waiting for a new connection
    max_connections  connections to one endpoint (counted by its pool)
    max_retries      requests of the service retrying at once: from a retry's decision (its
                     backoff) to the end of the request, as Envoy counts its retries. Every
                     retry belongs to a request in flight, so the default (1024, as
                     max_requests) binds only when max_requests is raised above it; the
                     retry budget bounds retries over time. A try none of which was sent is
                     resent outside this limit (``retry``)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sidecar.resilience.budget import Budget
from sidecar.telemetry.stats import RequestStats

log = logging.getLogger("meshlet.breaker")

PANIC_LOG_INTERVAL = 10.0
"""seconds between two log lines about one service's panic"""


@dataclass(slots=True)
class ServiceState:
    name: str
    in_flight: int = 0
    pending: int = 0
    retrying: int = 0
    """requests with a retry under way (``max_retries``)"""
    budget: Budget = field(default_factory=Budget)
    requests: RequestStats | None = field(default_factory=RequestStats)
    """for /metrics (None: metrics are off)"""
    overloaded: int = 0
    """requests refused by a limit"""
    retries: int = 0
    """tries after a request's first, resends included"""
    retry_reasons: dict[str, int] = field(default_factory=dict)
    """retries by what failed: ``connect-failure``, ``reset``, ``timeout`` or the status"""
    retries_unsent: int = 0
    """retries of tries none of which was sent, resent elsewhere at once (in ``retries``)"""
    retries_over_limit: int = 0
    """retries not made because ``max_retries`` were in progress"""
    hedges: int = 0
    """hedged tries sent (``hedge.after_ms`` without a response)"""
    hedges_won: int = 0
    """hedged tries whose response was the answer"""
    ejections: int = 0
    panics: int = 0
    """picks made among all endpoints because too few were available"""
    _panic_logged: float = -PANIC_LOG_INTERVAL

    def panic(self, now: float, available: int, total: int) -> None:
        self.panics += 1
        if now - self._panic_logged >= PANIC_LOG_INTERVAL:
            self._panic_logged = now
            log.warning(
                "%s: panic: %d of %d endpoints available, balancing over all of them",
                self.name,
                available,
                total,
            )

    def counters(self) -> dict[str, int]:
        return {
            "in_flight": self.in_flight,
            "pending": self.pending,
            "retrying": self.retrying,
            "overloaded": self.overloaded,
            "retries": self.retries,
            "retries_unsent": self.retries_unsent,
            "retries_suppressed": self.budget.suppressed,
            "retries_over_limit": self.retries_over_limit,
            "hedges": self.hedges,
            "hedges_won": self.hedges_won,
            "ejections": self.ejections,
            "panics": self.panics,
        }


class Services:
    """Every service's state, by name; tables come and go, this stays."""

    def __init__(self, *, metrics: bool = True) -> None:
        self._states: dict[str, ServiceState] = {}
        self._metrics = metrics

    def get(self, name: str) -> ServiceState:
        state = self._states.get(name)
        if state is None:
            state = self._states[name] = ServiceState(
                name, requests=RequestStats() if self._metrics else None
            )
        return state

    def states(self) -> list[ServiceState]:
        return list(self._states.values())

    def find(self, name: str) -> ServiceState | None:
        return self._states.get(name)
