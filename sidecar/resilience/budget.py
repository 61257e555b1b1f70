"""Retries: the budget that caps them, their backoff, and deadlines across hops.

A retry is for a failure the policy's ``retry_on`` lists (``connect-failure``, ``reset``
before any response byte, or a status; a try that runs out of its per-try timeout counts as
504), of an idempotent request or one sent with ``x-meshlet-retry: on``, whose body (at most
64 KiB) was kept. It goes to another endpoint when there is one, after a full-jitter
exponential backoff (25 ms base, 250 ms cap) or the ``Retry-After`` the failed try was sent,
and only when the service's budget allows, the time left fits it and fewer than
``max_retries`` requests of the service are retrying.

A try none of which was sent (its connect refused or timed out, or its connection closed
before the request head was written to it) is different: no app saw the request, so it is
resent to an endpoint this request has not failed on, at once and whatever the method, as
Envoy does for resets before a request is sent and Linkerd for connection failures. Only the
budget and the time left bound it (and ``MAX_RESENDS``); not ``retries``, ``retry_on``, the
backoff or ``max_retries``.

Deadlines: every request a sidecar sends carries ``x-meshlet-deadline-ms`` (the milliseconds
left) and ``x-meshlet-attempt`` (which try it is). Apps forward them with the calls they make
(as they forward trace headers), so the next sidecars start from what is left, answer 504 at
once when nothing is, and do not retry again: a request that arrives with
``x-meshlet-attempt`` belongs to a hop that retries it, so retries happen once, at the
outermost hop, and do not multiply down a chain.
"""

from __future__ import annotations

import random

WINDOW = 10
"""seconds over which the budget counts requests and retries"""
BACKOFF_BASE = 0.025
BACKOFF_CAP = 0.250
MIN_TRY = 0.010
"""seconds: a retry is not started with less time left than this"""
MAX_RESENDS = 3
"""tries of one request resent elsewhere because none of them was sent (HAProxy's
``retries 3`` with ``option redispatch`` for connection failures)"""


class Budget:
    """Retries allowed for one service: at most ``ratio`` x the requests of the last 10 s,
    plus ``min_per_s`` x 10. Counted in one-second buckets, so ``request`` is O(1)."""

    __slots__ = ("_requests", "_retries", "_seconds", "suppressed")

    def __init__(self) -> None:
        self._seconds = [-1] * WINDOW
        self._requests = [0] * WINDOW
        self._retries = [0] * WINDOW
        self.suppressed = 0
        """retries the budget refused"""

    def __repr__(self) -> str:
        return f"<Budget [{self.suppressed} suppressed]>"

    def _bucket(self, now: float) -> int:
        second = int(now)
        i = second % WINDOW
        if self._seconds[i] != second:
            self._seconds[i] = second
            self._requests[i] = 0
            self._retries[i] = 0
        return i

    def request(self, now: float) -> None:
        """A request's first try. (``_bucket``, inline: once a request)"""
        second = int(now)
        i = second % WINDOW
        if self._seconds[i] != second:
            self._seconds[i] = second
            self._requests[i] = 1
            self._retries[i] = 0
        else:
            self._requests[i] += 1

    def spend(self, now: float, ratio: float, min_per_s: int) -> bool:
        """Take one retry if the budget has one; a refusal is counted as suppressed."""
        i = self._bucket(now)
        oldest = int(now) - WINDOW
        requests = retries = 0
        for j in range(WINDOW):
            if self._seconds[j] > oldest:
                requests += self._requests[j]
                retries += self._retries[j]
        if retries + 1 > ratio * requests + min_per_s * WINDOW:
            self.suppressed += 1
            return False
        self._retries[i] += 1
        return True


def backoff(retry: int) -> float:
    """Seconds before retry number ``retry`` (1, 2, ...): full jitter, exponential, capped."""
    return random.uniform(0.0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (retry - 1)))
