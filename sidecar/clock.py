"""Time, injected: EWMA decay, slow start and Retry-After read a ``Clock`` so that tests can
move it instead of sleeping."""

from __future__ import annotations

import time
from typing import Protocol


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
