"""Time: the only module of the sidecar that reads the system's clocks (ruff's banned-API rule
keeps ``time.monotonic`` and ``time.time`` out of every other).

Injected where decisions depend on it: EWMA decay, slow start and Retry-After read a ``Clock``,
and the request core (``resilience.tries``) takes the time as an argument, so that tests move a
``FakeClock`` instead of sleeping. The listeners arm their timers on the event loop's own clock
(``loop.time()``: the same monotonic clock, in whole milliseconds under uvloop); durations shown
in metrics and logs use ``monotonic``, timestamps shown to people ``wall``."""

from __future__ import annotations

import time
from typing import Protocol

monotonic = time.monotonic
"""seconds on the system's monotonic clock, to the nanosecond (durations)"""
wall = time.time
"""seconds since the epoch (timestamps for people: a table's age, the access log)"""


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...


class SystemClock:
    monotonic = staticmethod(time.monotonic)

    def __repr__(self) -> str:
        return "<SystemClock>"


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "time does not go back"
        self.now += seconds

    def __repr__(self) -> str:
        return f"<FakeClock {self.now:.3f}>"
