"""Requests of one service through one listener, as the data path records them: plain lists
(a bisect and two increments per request; a gRPC call one more, by its status code), read by
the Prometheus collector at scrape time."""

from __future__ import annotations

from bisect import bisect_left
from typing import Final

BUCKETS: Final[tuple[float, ...]] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
"""seconds: the request duration histogram's upper bounds (and +Inf)"""
BOUNDS: Final = list(BUCKETS)
"""``BUCKETS`` for bisect: a list, which compiled code passes as it is (a ``Final`` tuple of
floats it would box anew at each call); bisect, not a loop over the bounds: a slow request
(or one timed under valgrind) took a dozen bytecodes a bound"""
CODES = ("none", "1xx", "2xx", "3xx", "4xx", "5xx")
"""status classes by ``status // 100``; ``none``: the client left before any response"""
GRPC_CODES: Final = 17
"""gRPC status codes counted each on its own; a higher one counts as ``other`` (the last)"""


class RequestStats:
    """Requests of one service through one listener, by status class: the histogram of their
    durations (its buckets' counts, not yet cumulative; made at a class's first request, as
    a table may name thousands of services this sidecar never calls) and the sum."""

    __slots__ = ("buckets", "grpc", "sums")

    def __init__(self) -> None:
        self.buckets: list[list[int] | None] = [None] * len(CODES)
        self.sums = [0.0] * len(CODES)
        #: gRPC calls by their grpc-status (the last: ``other``), from the first call
        self.grpc: list[int] | None = None

    def __repr__(self) -> str:
        return f"<RequestStats [{sum(map(self.count, range(len(CODES))))} requests]>"

    def record(self, status: int, seconds: float) -> None:
        code = status // 100 if 100 <= status < 600 else 0
        counts = self.buckets[code]
        if counts is None:
            counts = self.buckets[code] = [0] * (len(BUCKETS) + 1)
        counts[bisect_left(BOUNDS, seconds)] += 1
        self.sums[code] += seconds

    def record_grpc(self, code: int) -> None:
        counts = self.grpc
        if counts is None:
            counts = self.grpc = [0] * (GRPC_CODES + 1)
        counts[code if 0 <= code < GRPC_CODES else GRPC_CODES] += 1

    def count(self, code: int) -> int:
        counts = self.buckets[code]
        return sum(counts) if counts else 0
