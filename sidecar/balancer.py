"""Choosing an endpoint for a request, behind one Protocol.

``pick`` is plain synchronous code, called once per try on the hot path; it never blocks and
never awaits. Only round robin lives here for now; the balancing issue adds the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from control_plane.wire import Endpoint


class Balancer(Protocol):
    def pick(self) -> Endpoint | None:
        """An endpoint for the next try, or None when there is none."""
        ...


class RoundRobin:
    """Smooth weighted round robin (nginx): over any run of sum(weights) picks, each endpoint
    is picked exactly ``weight`` times, interleaved rather than in bursts."""

    __slots__ = ("_current", "_endpoints", "_total", "_weights")

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self._endpoints = list(endpoints)
        self._weights = [e.weight for e in self._endpoints]
        self._current = [0] * len(self._endpoints)
        self._total = sum(self._weights)

    def pick(self) -> Endpoint | None:
        endpoints = self._endpoints
        if len(endpoints) < 2:
            return endpoints[0] if endpoints else None
        current, weights = self._current, self._weights
        best = 0
        for i, weight in enumerate(weights):
            current[i] += weight
            if current[i] > current[best]:
                best = i
        current[best] -= self._total
        return endpoints[best]

    def __repr__(self) -> str:
        return f"<RoundRobin [{len(self._endpoints)} endpoints, total weight {self._total}]>"
