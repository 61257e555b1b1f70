"""Time, injected: the registry and the reaper read a ``Clock`` so tests can move it."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back; for ages and deadlines."""
        ...

    def time(self) -> float:
        """Wall-clock seconds since the epoch; for timestamps shown to people."""
        ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def __repr__(self) -> str:
        return "<SystemClock>"


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 1_000.0, wall: float = 1_800_000_000.0) -> None:
        self._mono = start
        self._offset = wall - start

    def monotonic(self) -> float:
        return self._mono

    def time(self) -> float:
        return self._mono + self._offset

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "time does not go back"
        self._mono += seconds

    def __repr__(self) -> str:
        return f"<FakeClock monotonic={self._mono:.3f}>"
