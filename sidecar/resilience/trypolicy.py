"""What a route allows each of its requests' tries (``TryPolicy``): built once per route from
its service's policy, shared by the routes whose policies are equal, and read by ``Tries``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from control_plane.wire import Policy


@dataclass(frozen=True, slots=True)
class TryPolicy:
    """What a route allows each of its requests' tries (built once per route)."""

    timeout: float = math.inf
    """seconds: the route timeout, from the end of the request to the response head"""
    per_try: float = math.inf
    """seconds: each try's timeout (inf when the route does not retry)"""
    hedge: float = math.inf
    """seconds before the first try is hedged (inf: no hedging)"""
    retries: int = 0
    """retries after the first try (0: the route does not retry)"""
    retry_on: frozenset[str | int] = frozenset()
    """what a try may end with to be retried (a set: asked of every response, most of which
    it does not hold: a tuple compared a 200 with each of its strings and numbers)"""
    max_retries: int = 0
    """requests of the service retrying at once"""
    budget_ratio: float = 0.0
    budget_min_per_s: int = 0

    @staticmethod
    def of(policy: Policy, *, relay: bool = False) -> TryPolicy:
        """A service's policy; ``relay``: the inbound route, which neither retries nor
        hedges (the caller's hop does)."""
        retries = 0 if relay else policy.retries
        per_try = policy.per_try_timeout_ms or policy.timeout_ms / (retries + 1)
        hedge = policy.hedge
        return TryPolicy(
            timeout=policy.timeout_ms / 1000,
            per_try=per_try / 1000 if retries else math.inf,
            hedge=hedge.after_ms / 1000 if hedge is not None and not relay else math.inf,
            retries=retries,
            retry_on=frozenset(policy.retry_on),
            max_retries=policy.max_retries,
            budget_ratio=policy.retry_budget.ratio,
            budget_min_per_s=policy.retry_budget.min_per_s,
        )


#: before a request is routed: no tries allowed
UNROUTED = TryPolicy()
