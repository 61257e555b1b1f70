"""Push convergence: how long a registry change takes to reach every connected sidecar.

The clock starts at the first registry change since the last table was built (later changes
in the same debounce window ride along in the same table). It stops at the last ACK, from
the sidecars that were connected when the table version carrying the change was published
and did not have it yet, of that version or a newer one (tables are full snapshots, so a
newer one carries the change too). A sidecar that NACKs the version or disconnects is no
longer waited for; when it was the last one, the clock stops at the last ACK that did come.

Not measured: a change that left the table as it was, a version no connected sidecar needed,
and a version every sidecar refused or left. At most ``limit`` versions are awaited at once, so
a sidecar that never answers cannot grow memory; the oldest is then given up.

Plain synchronous code, no event loop: the publisher calls it as things happen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

Observer = Callable[[float], None]


@dataclass(slots=True)
class _Wait:
    since: float
    """monotonic time of the change the version carries"""
    sidecars: set[int]
    """sessions yet to ACK it"""
    last_ack: float | None = None


class Convergence:
    def __init__(self, clock: Callable[[], float] = time.monotonic, limit: int = 64) -> None:
        self._clock = clock
        self._limit = limit
        self._since: float | None = None
        self._waits: dict[int, _Wait] = {}  # by version, oldest first
        self._observer: Observer | None = None

    def __repr__(self) -> str:
        return f"<Convergence [{len(self._waits)} versions awaiting ACKs]>"

    def on_converged(self, observer: Observer) -> None:
        """``observer(seconds)`` runs (synchronously) each time a version converges."""
        self._observer = observer

    def changed(self) -> None:
        """The registry changed: the routing table may change with it."""
        if self._since is None:
            self._since = self._clock()

    def take(self) -> float | None:
        """A table is being built from the registry as it is now: it carries every change so
        far. The time of the first of them, if any; ``restore`` it if the build fails."""
        since, self._since = self._since, None
        return since

    def restore(self, since: float | None) -> None:
        # any change since ``take`` came later than ``since``: the earlier one counts
        if since is not None:
            self._since = since

    def published(self, version: int, since: float | None, sidecars: Iterable[int]) -> None:
        """Table ``version``, carrying the change at ``since``, goes out to ``sidecars``."""
        waiting = set(sidecars)
        if since is None or not waiting:
            return
        self._waits[version] = _Wait(since, waiting)
        if len(self._waits) > self._limit:
            del self._waits[next(iter(self._waits))]

    def acked(self, sidecar: int, version: int) -> None:
        now = self._clock()
        for v, wait in list(self._waits.items()):
            if v > version:
                break
            if sidecar in wait.sidecars:
                wait.sidecars.discard(sidecar)
                wait.last_ack = now
                self._settle(v, wait)

    def refused(self, sidecar: int, version: int) -> None:
        """A NACK: the sidecar keeps its older table; versions up to this one are not
        awaited from it (a newer table may still converge on it)."""
        self._drop(sidecar, version)

    def gone(self, sidecar: int) -> None:
        self._drop(sidecar, None)

    def _drop(self, sidecar: int, up_to: int | None) -> None:
        for v, wait in list(self._waits.items()):
            if up_to is not None and v > up_to:
                break
            if sidecar in wait.sidecars:
                wait.sidecars.discard(sidecar)
                self._settle(v, wait)

    def _settle(self, version: int, wait: _Wait) -> None:
        if wait.sidecars:
            return
        del self._waits[version]
        if wait.last_ack is not None and self._observer is not None:
            self._observer(wait.last_ack - wait.since)
