"""The demo's client: steady traffic to the frontend, and what came back.

Requests arrive at random at a steady mean rate whatever the answers do (a Poisson process,
open loop, as many independent users arrive), at most ``max_in_flight`` at once; each answer
is recorded with the catalog instance that served it and the try that did (``attempt`` 2: the
frontend's sidecar retried it elsewhere).
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import random
import time
from dataclasses import dataclass

import aiohttp

WINDOW = 10.0
"""seconds of recent replies kept for the live rates and percentiles"""


@dataclass(frozen=True, slots=True)
class Reply:
    started: float
    """monotonic seconds"""
    seconds: float
    status: int
    """HTTP status; 0 when no answer came (connection refused or reset, timeout)"""
    catalog: str
    """the catalog instance that answered, if one did"""
    attempt: int
    """the try that answered: 2 and up when the frontend's sidecar retried"""
    error: str
    """``x-meshlet-error`` or what went wrong, when it did"""

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass(frozen=True, slots=True)
class TrafficStatistics:
    sent: int
    answered: int
    errors: int
    skipped: int
    in_flight: int


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0-1) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


class Traffic:
    def __init__(self, url: str, rate: float, max_in_flight: int = 64) -> None:
        self.url = url
        self.rate = rate
        self.max_in_flight = max_in_flight
        self.started_at = time.monotonic()
        self.recent: collections.deque[Reply] = collections.deque()
        self.latencies = array.array("d")
        """seconds, of every successful reply"""
        self.by_catalog: collections.Counter[str] = collections.Counter()
        self.by_second: list[collections.Counter[str]] = []
        """per second since the start: answers by catalog instance"""
        self.retried: list[Reply] = []
        self.failed: list[Reply] = []
        self.sent = 0
        self.skipped = 0
        self.in_flight = 0
        self._stopping = asyncio.Event()

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<Traffic [{self.rate:g}/s: {s.sent} sent, {s.answered} answered, "
            f"{s.errors} errors, {s.in_flight} in flight]>"
        )

    def statistics(self) -> TrafficStatistics:
        answered = self.sent - self.in_flight
        return TrafficStatistics(
            self.sent, answered, len(self.failed), self.skipped, self.in_flight
        )

    def stop(self) -> None:
        """Send no more; ``run`` returns once the requests in flight have their answers."""
        self._stopping.set()

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=20)
        connector = aiohttp.TCPConnector(limit=self.max_in_flight)
        loop = asyncio.get_running_loop()
        async with (
            aiohttp.ClientSession(timeout=timeout, connector=connector) as http,
            asyncio.TaskGroup() as requests,
        ):
            self.started_at = time.monotonic()
            next_at = loop.time()
            while not self._stopping.is_set():
                if self.in_flight < self.max_in_flight:
                    self.in_flight += 1
                    self.sent += 1
                    requests.create_task(self._one(http))
                else:
                    self.skipped += 1
                next_at += random.expovariate(self.rate)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, next_at - loop.time())):
                        await self._stopping.wait()

    async def _one(self, http: aiohttp.ClientSession) -> None:
        started = time.monotonic()
        try:
            async with http.get(self.url) as r:
                body = await r.json(content_type=None) if r.status == 200 else {}
                error = r.headers.get("x-meshlet-error", "") or (
                    "" if r.status == 200 else (await r.text()).strip()[:120]
                )
                reply = Reply(
                    started,
                    time.monotonic() - started,
                    r.status,
                    str(body.get("catalog", "")),
                    int(body.get("attempt", 1)),
                    error,
                )
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            reply = Reply(started, time.monotonic() - started, 0, "", 0, repr(e))
        finally:
            self.in_flight -= 1
        self._record(reply)

    def _record(self, reply: Reply) -> None:
        self.recent.append(reply)
        while self.recent and self.recent[0].started < reply.started - WINDOW:
            self.recent.popleft()
        if not reply.ok:
            self.failed.append(reply)
            return
        self.latencies.append(reply.seconds)
        self.by_catalog[reply.catalog] += 1
        second = int(reply.started - self.started_at)
        while len(self.by_second) <= second:
            self.by_second.append(collections.Counter())
        self.by_second[second][reply.catalog] += 1
        if reply.attempt > 1:
            self.retried.append(reply)

    def window(self, seconds: float) -> list[Reply]:
        """Replies to the requests started within the last ``seconds`` that have come back."""
        since = time.monotonic() - seconds
        return [r for r in self.recent if r.started >= since]
