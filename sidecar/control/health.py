"""The local app's health, as the sidecar reports it to the control plane.

``GET <app><path>`` at once and then every ``interval`` seconds with a ``timeout``: ``fall``
failures in a row make it unhealthy (callers stop routing to this instance), ``rise``
successes healthy again. It starts unhealthy, as a Kubernetes readiness probe does: an app
gets traffic only once it has answered. A response counts as a success when its status is
below 400; the body is not read. One connection per check (``Connection: close``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from sidecar.control.httpclient import get_status
from sidecar.errors import PeerError

log = logging.getLogger("meshlet.health")


class AppHealth:
    def __init__(
        self,
        url: str,
        on_change: Callable[[bool], None],
        *,
        interval: float = 5.0,
        timeout: float = 0.5,
        fall: int = 3,
        rise: int = 1,
    ) -> None:
        self.url = url
        self.on_change = on_change
        self.interval = interval
        self.timeout = timeout
        self.fall = fall
        self.rise = rise
        self.healthy = False
        self._failures = 0
        self._successes = 0
        self.last_error = ""

    def __repr__(self) -> str:
        state = "healthy" if self.healthy else f"unhealthy ({self.last_error})"
        return f"<AppHealth {self.url} {state}>"

    def record(self, ok: bool, error: str = "") -> None:
        """One probe's outcome (plain code: tests call it without a network)."""
        if ok:
            self._failures = 0
            self._successes += 1
            if not self.healthy and self._successes >= self.rise:
                self.healthy = True
                log.info("app healthy again (%s)", self.url)
                self.on_change(True)
        else:
            self._successes = 0
            self._failures += 1
            self.last_error = error
            if self.healthy and self._failures >= self.fall:
                self.healthy = False
                log.warning("app unhealthy after %d failed checks: %s", self._failures, error)
                self.on_change(False)

    async def run(self) -> None:
        first = True
        while True:
            if not first:
                await asyncio.sleep(self.interval)
            first = False
            try:
                async with asyncio.timeout(self.timeout):
                    status = await get_status(self.url)
                ok, error = status < 400, f"status {status}"
            except TimeoutError:
                ok, error = False, f"no answer within {self.timeout * 1000:.0f} ms"
            except (PeerError, OSError) as e:
                ok, error = False, str(e) or type(e).__name__
            self.record(ok, "" if ok else error)
