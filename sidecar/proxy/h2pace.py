"""The pace of one HTTP/2 stream (``StreamPace``), as an HTTP/1 connection's ``Watch`` keeps
it for its request: nothing may be silent both ways for longer than the route's
``stream_idle_timeout_ms``, and a request body must keep the listener's minimum data rate
while the client, not the sidecar, is the one holding it up.

Decisions on the time given, no timer: the stream arms one at ``next_at`` and asks ``due``
when it rings (lazily: bytes that move touch no timer; a ring that is early re-arms).
"""

from __future__ import annotations

import enum
import math
from typing import Final

from sidecar.proxy.limits import MinRate


class Due(enum.Enum):
    """What a stream's pace timer found."""

    NOTHING = 0  # early: look again at ``next_at``
    SLOW_BODY = 1  # the request body fell below the minimum rate
    SILENT = 2  # nothing moved either way for the idle timeout


DUE_NOTHING: Final = Due.NOTHING
DUE_SLOW_BODY: Final = Due.SLOW_BODY
DUE_SILENT: Final = Due.SILENT


class StreamPace:
    """One stream's silence and its request body's rate."""

    __slots__ = ("_body_moved", "_body_since", "_moved_at", "_rate", "idle")

    def __init__(self, rate: MinRate, idle: float, now: float) -> None:
        self._rate = rate
        #: seconds the stream may be silent both ways (0: no limit)
        self.idle = idle
        self._moved_at = now  # a byte of a body last moved either way
        self._body_since = now  # the request body's rate counts from then
        self._body_moved = 0  # request body bytes since then

    def __repr__(self) -> str:
        return f"<StreamPace idle {self.idle:g} s, {self._body_moved} body bytes>"

    def moved(self, now: float) -> None:
        """A byte of the response body moved."""
        self._moved_at = now

    def body(self, now: float, n: int) -> None:
        """``n`` bytes of the request body came."""
        self._moved_at = now
        self._body_moved += n

    def resumed(self, now: float) -> None:
        """The sidecar no longer holds the request body up: its rate counts from now."""
        self._body_since, self._body_moved = now, 0

    def next_at(self, counting: bool) -> float:
        """When to look next (inf: never). ``counting``: the request body is still coming and
        the sidecar does not hold it up, so its rate counts."""
        at = self._rate.deadline(self._body_since, self._body_moved) if counting else math.inf
        if self.idle and self._moved_at + self.idle < at:
            at = self._moved_at + self.idle
        return at

    def due(self, now: float, counting: bool) -> Due:
        if counting and now >= self._rate.deadline(self._body_since, self._body_moved):
            return DUE_SLOW_BODY
        if self.idle and now >= self._moved_at + self.idle:
            return DUE_SILENT
        return DUE_NOTHING
