"""What a sidecar knows of each endpoint: requests in flight, latency, failures, slow start.

Latency is a peak-sensitive EWMA (Finagle and Linkerd's "peak EWMA"): a sample above the
estimate replaces it at once, one below pulls it down with weight ``exp(-dt / DECAY)``; left
alone the estimate decays toward zero (as tower's does), so an endpoint that has not been
picked for a while is tried again and measured afresh. (Drifting back to a constant instead
starved endpoints: with nothing in flight P2C compares bare estimates, and a fast endpoint
whose estimate rose to the constant, above its peers' measured ones, was never picked
again.) A newcomer starts at ``DEFAULT_RTT``. That is where Linkerd stops, and why an endpoint
that fails fast looks attractive (linkerd2#11669). Here each failure (a 5xx, a reset,
a timeout, a refused connect) also adds ``FAILURE_PENALTY`` to the cost, decaying with the same
half-life, and a 429 or 503 with ``Retry-After`` takes the endpoint out of the pick for that
long (at most ``RETRY_AFTER_CAP``).

All plain code over an injected clock: ``cost`` and ``record`` are what balancers and the
exchange call.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

DECAY = 10.0
"""seconds: the EWMA's time constant"""
DEFAULT_RTT = 0.030
"""seconds: what an endpoint not yet measured is assumed to take"""
FAILURE_PENALTY = 1.0
"""seconds added to an endpoint's latency cost per failure, decaying like the EWMA"""
RETRY_AFTER_CAP = 30.0
"""seconds at most an endpoint's Retry-After keeps it out of the pick"""
SLOW_START_FLOOR = 0.1
"""the share of its weight an endpoint gets at the start of its slow start"""


class Exclusions:
    """Whether any endpoint may be out of the pick: while not, balancers skip the check. One
    per sidecar (its ``Pools``), shared by the stats of all its endpoints."""

    __slots__ = ("probing", "until")

    def __init__(self) -> None:
        self.until = 0.0
        """the latest finite ``excluded_until`` of any endpoint"""
        self.probing = 0
        """endpoints out until their probe ends"""


class Phase(enum.Enum):
    HEALTHY = 0
    EJECTED = 1
    PROBING = 2


class Ejection:
    """An endpoint's outlier state (``outlier``), made at its first failure."""

    __slots__ = ("consecutive", "failures", "phase", "requests", "restored_at", "times", "window")

    def __init__(self, now: float) -> None:
        self.phase = Phase.HEALTHY
        self.consecutive = 0
        self.window = now
        self.requests = 0
        self.failures = 0
        self.times = 0
        self.restored_at = now

    def __repr__(self) -> str:
        return f"<Ejection {self.phase.name} [{self.consecutive} in a row, ejected {self.times}x]>"


@dataclass(frozen=True, slots=True)
class EndpointStatistics:
    in_flight: int
    rtt_ms: float
    penalty_ms: float
    excluded_for_s: float
    since_s: float
    tries: int = 0
    """tries answered or failed"""
    failures: int = 0
    """of them, failed (a 5xx, a reset, a gRPC status that means a 5xx, ...)"""


class EndpointStats:
    __slots__ = (
        "_penalty",
        "_penalty_at",
        "_rtt",
        "_rtt_at",
        "ejection",
        "excluded_until",
        "exclusions",
        "failures",
        "in_flight",
        "since",
        "tries",
    )

    def __init__(self, now: float, exclusions: Exclusions) -> None:
        self.exclusions = exclusions
        self.in_flight = 0
        self._rtt = DEFAULT_RTT
        self._rtt_at = now
        self._penalty = 0.0
        self._penalty_at = now
        self.excluded_until = 0.0
        self.tries = 0
        """tries that ended with a response or a failure (none yet: its latency is a guess)"""
        self.failures = 0
        self.since = now
        """when this sidecar first saw the endpoint routable (slow start counts from here)"""
        self.ejection: Ejection | None = None
        """outlier state, from the endpoint's first failure (``outlier``)"""

    def __repr__(self) -> str:
        return (
            f"<EndpointStats [{self.in_flight} in flight, rtt {self._rtt * 1000:.1f} ms, "
            f"penalty {self._penalty * 1000:.0f} ms]>"
        )

    def latency(self, now: float) -> float:
        """Seconds: the decayed latency estimate plus the decayed failure penalty."""
        rtt = self._rtt * math.exp((self._rtt_at - now) / DECAY)
        if self._penalty:
            return rtt + self._penalty * math.exp((self._penalty_at - now) / DECAY)
        return rtt

    def record(self, now: float, rtt: float, failed: bool, retry_after: float | None) -> None:
        """A finished try: its time to first byte (or to failure) and how it went."""
        self.tries += 1
        w = math.exp((self._rtt_at - now) / DECAY)
        current = self._rtt * w
        # peak: a slower sample counts in full at once; a faster one by how long it has been
        self._rtt = rtt if rtt >= current else current + rtt * (1 - w)  # old x w + new x (1 - w)
        self._rtt_at = now
        if failed:
            self.failures += 1
            self._penalty = (
                self._penalty * math.exp((self._penalty_at - now) / DECAY) + FAILURE_PENALTY
            )
            self._penalty_at = now
        if retry_after is not None and retry_after > 0:
            self.excluded_until = now + min(retry_after, RETRY_AFTER_CAP)
            if self.excluded_until > self.exclusions.until:
                self.exclusions.until = self.excluded_until

    def available(self, now: float) -> bool:
        return now >= self.excluded_until

    def slow_start(self, now: float, window: float) -> float:
        """The share of its weight the endpoint gets now: 10 % rising to 100 % over
        ``window`` seconds from ``since``."""
        if window <= 0:
            return 1.0
        ramp = (now - self.since) / window
        return 1.0 if ramp >= 1.0 else SLOW_START_FLOOR + (1 - SLOW_START_FLOOR) * max(0.0, ramp)

    def statistics(self, now: float) -> EndpointStatistics:
        return EndpointStatistics(
            in_flight=self.in_flight,
            rtt_ms=round(self.latency(now) * 1000, 3),
            penalty_ms=round(self._penalty * math.exp((self._penalty_at - now) / DECAY) * 1000, 3),
            excluded_for_s=max(0.0, round(self.excluded_until - now, 3)),
            since_s=round(now - self.since, 3),
            tries=self.tries,
            failures=self.failures,
        )
