"""A new upstream connection for a try: the only thing an exchange awaits.

A ``Connect`` opens one connection in its own task, bounded by the policy's
``connect_timeout_ms`` and counted in the service's ``pending`` (``max_pending``) while it
opens, and calls back once with the connection or with why there is none. A connect given up
(its try failed, was hedged away, or the client left) calls nobody: a connection that opens
anyway goes idle into its pool, not to waste.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from control_plane.wire import Endpoint
from sidecar.errors import Reason
from sidecar.proxy.pool import Pool
from sidecar.proxy.upstream import Carrier
from sidecar.resilience.service import ServiceState

#: what a connect calls back: the connection, or None and why there is none
Connected = Callable[[Carrier | None, Reason, str], None]


class Connect:
    """One connection opening, for one try."""

    __slots__ = ("_done", "_service", "_task", "_timeout_ms", "endpoint")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pool: Pool,
        service: ServiceState,
        timeout_ms: int,
        done: Connected,
        h2: bool = False,
    ) -> None:
        self.endpoint: Endpoint = pool.endpoint
        self._service = service
        self._timeout_ms = timeout_ms
        self._done: Connected | None = done
        service.pending += 1
        timeout = timeout_ms / 1000

        async def connect() -> Carrier:
            async with asyncio.timeout(timeout):
                return await pool.connect(h2)

        self._task = task = loop.create_task(connect())
        task.add_done_callback(self._finished)

    def __repr__(self) -> str:
        state = "given up" if self._done is None else "opening"
        return f"<Connect {self.endpoint.address}:{self.endpoint.port} {state}>"

    def cancel(self) -> None:
        """The try no longer wants it (its callback will not be called)."""
        if self._done is not None:
            self._done = None
            self._service.pending -= 1
            self._task.cancel()  # (``_finished`` still runs: a connection just made is kept)

    def _finished(self, task: asyncio.Task[Carrier]) -> None:
        done, self._done = self._done, None
        if done is None:  # given up: a connection that opened anyway goes to its pool
            if not task.cancelled() and task.exception() is None:
                conn = task.result()
                conn.pool.release(conn)
            return
        self._service.pending -= 1
        if task.cancelled():
            return
        exc = task.exception()
        e = self.endpoint
        if exc is not None:
            what = (
                f"timed out after {self._timeout_ms} ms"
                if isinstance(exc, TimeoutError)
                else str(exc) or type(exc).__name__
            )
            done(None, Reason.UPSTREAM_CONNECT_FAILURE, f"connect to {e.address}:{e.port} {what}")
            return
        conn = task.result()
        if not conn.alive():  # the upstream accepted and hung up before a byte was sent
            conn.pool.discard(conn)
            done(
                None, Reason.UPSTREAM_RESET, "the upstream closed the connection before the request"
            )
            return
        done(conn, Reason.UPSTREAM_CONNECT_FAILURE, "")
