"""Distributed locks with fencing tokens for apps in a meshlet mesh, through their sidecar.

    import meshlet.locks

    async with meshlet.locks.hold("orders", ttl=10.0, wait=5.0) as lock:
        await db.write(row, fence=lock.token)  # the resource refuses tokens below its highest
        if lock.lost.is_set():
            ...  # the lease ended: stop, whatever was not fenced may collide

``hold`` takes the lock from the sidecar's admin port (``MESHLET_ADMIN``, by default
``http://127.0.0.1:15000``), which asks the control plane as the app's service; it renews the
lease in the background every third of ``ttl`` and releases it on exit.

A lease can end while its holder still runs: a long GC pause, a stopped process, a slow
network. No client can rule that out, so a lock is only safe with the **fencing token**:
pass ``lock.token`` with every write to the resource the lock guards, and make the resource
refuse a token lower than the highest it has seen. ``lock.lost`` is set as soon as the client
knows the lease is gone (a renewal refused, or no renewal went through before the lease's end);
it is a hint to stop early, not the guarantee the token is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any, Final
from urllib.parse import quote

import aiohttp

__all__ = ["Lock", "LockError", "LockHeld", "hold"]

DEFAULT_ADMIN: Final = "http://127.0.0.1:15000"
SLACK: Final = 15.0
"""seconds an acquisition may take beyond its ``wait``"""
log = logging.getLogger("meshlet.locks")


class LockError(Exception):
    """The sidecar or the control plane refused a lock call, or could not be reached.

    LockError        any refusal: ``status`` (0: no answer), the ``error`` it gave and the
     │               ``field`` it named (a 400 names the bad argument: ttl_ms, wait_ms, name)
     └── LockHeld    still held by another after ``wait`` (409)
    """

    def __init__(self, status: int, error: str, field: str | None = None) -> None:
        where = f" ({field})" if field else ""
        super().__init__(f"{status}{where}: {error}" if status else error)
        self.status = status
        self.error = error
        self.field = field


class LockHeld(LockError):
    """Another holds the lock, and did not let go within ``wait``."""


class Lock:
    """A held lock: its fencing ``token``, and ``lost`` once the lease is known to be gone."""

    def __init__(self, name: str, token: int, expires_in_ms: int, shared: bool) -> None:
        self.name = name
        self.token = token
        """the fencing token: pass it to the resource with every write"""
        self.shared = shared
        """the name is shared with other services by an admin grant"""
        self.lost = asyncio.Event()
        """set when a renewal was refused or the lease ended before one went through"""
        self.renewals = 0
        self._deadline = 0.0
        """when the lease ends, on this process's event-loop clock"""
        self._extend(_now(), expires_in_ms)

    def __repr__(self) -> str:
        state = "lost" if self.lost.is_set() else f"held {self.expires_in:.1f}s more"
        return f"<Lock {self.name} token={self.token} [{state}, {self.renewals} renewals]>"

    def _extend(self, since: float, expires_in_ms: int) -> None:
        """The lease lasts ``expires_in_ms`` from ``since`` (when the call that said so was
        sent: the lease began after that)."""
        self._deadline = since + expires_in_ms / 1000

    @property
    def expires_in(self) -> float:
        """Seconds until the lease ends, as far as this client knows (0 once lost)."""
        return 0.0 if self.lost.is_set() else max(0.0, self._deadline - _now())


def _now() -> float:
    return asyncio.get_running_loop().time()


def admin_url(admin: str | None = None) -> str:
    """The sidecar's admin port: ``admin``, else ``MESHLET_ADMIN``, else the default."""
    return (admin or os.environ.get("MESHLET_ADMIN") or DEFAULT_ADMIN).rstrip("/")


async def _call(
    http: aiohttp.ClientSession, method: str, url: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of one call; LockError(0, ...) when there is no answer."""
    try:
        async with http.request(method, url, json=body, allow_redirects=False) as r:
            data = await r.json(content_type=None) if r.status != 204 else {}
            return r.status, data if isinstance(data, dict) else {}
    except (aiohttp.ClientError, ValueError) as e:
        raise LockError(0, f"{method} {url}: {type(e).__name__}: {e}") from e


@contextlib.asynccontextmanager
async def _answered_within(seconds: float, what: str) -> AsyncIterator[None]:
    """An ``asyncio.timeout`` scope whose expiry is a LockError(0, ...)."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise LockError(0, f"{what}: no answer within {seconds:g} s") from None


def _refused(status: int, data: dict[str, Any]) -> LockError:
    error = str(data.get("error") or "no reason given")
    field = data.get("field")
    kind = LockHeld if status == 409 else LockError
    return kind(status, error, field if isinstance(field, str) else None)


@contextlib.asynccontextmanager
async def hold(
    name: str,
    *,
    ttl: float = 10.0,
    wait: float = 0.0,
    admin: str | None = None,
    renew: bool = True,
    session: aiohttp.ClientSession | None = None,
) -> AsyncIterator[Lock]:
    """Hold lock ``name`` for the body of ``async with``.

    ``ttl``: seconds a lease lasts unrenewed (0.1 to 600); ``wait``: seconds to wait while
    another holds it (0 to 60; LockHeld after). ``renew``: renew every ``ttl / 3`` (False: the
    lease ends after ``ttl``, for work that must fit in it). ``admin``: the sidecar's admin
    URL. ``session``: an aiohttp session to use (else one of its own)."""
    url = f"{admin_url(admin)}/v1/locks/{quote(name, safe='')}"
    async with contextlib.AsyncExitStack() as stack:
        http = session
        if http is None:
            http = await stack.enter_async_context(aiohttp.ClientSession())
        body = {"ttl_ms": round(ttl * 1000), "wait_ms": round(wait * 1000)}
        async with _answered_within(wait + SLACK, f"POST {url}"):
            status, data = await _call(http, "POST", url, body)
        if status != 200:
            raise _refused(status, data)
        lock = Lock(name, int(data["token"]), int(data["expires_in_ms"]), bool(data["shared"]))
        renewer = asyncio.create_task(_renew(http, url, lock, ttl)) if renew else None
        try:
            yield lock
        finally:
            if renewer is not None:  # owned here: it never outlives the block
                renewer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewer
            await _release(http, url, lock)


async def _renew(http: aiohttp.ClientSession, url: str, lock: Lock, ttl: float) -> None:
    """Every ``ttl / 3``; a failed call is tried again until the lease would have ended."""
    every = ttl / 3
    body = {"token": lock.token, "ttl_ms": round(ttl * 1000)}
    pause = every
    while True:
        await asyncio.sleep(min(pause, lock.expires_in))
        if lock.expires_in <= 0:
            log.warning("lock %s (token %d): the lease ended unrenewed", lock.name, lock.token)
            lock.lost.set()
            return
        sent = _now()
        try:
            async with _answered_within(every, f"PUT {url}/renew"):
                status, data = await _call(http, "PUT", f"{url}/renew", body)
        except LockError as e:
            log.warning("lock %s: renewal failed, retrying: %s", lock.name, e)
            pause = every / 4
            continue
        if status == 200:
            lock._extend(sent, int(data["expires_in_ms"]))
            lock.renewals += 1
            pause = every
        elif status == 409:
            log.warning("lock %s (token %d) lost: %s", lock.name, lock.token, data.get("error"))
            lock.lost.set()
            return
        else:
            log.warning("lock %s: renewal answered %d, retrying", lock.name, status)
            pause = every / 4


async def _release(http: aiohttp.ClientSession, url: str, lock: Lock) -> None:
    """Let go; a lease that is already gone, or a sidecar that does not answer, is logged
    (the lease then ends by itself)."""
    try:
        async with _answered_within(SLACK, f"DELETE {url}"):
            status, data = await _call(http, "DELETE", url, {"token": lock.token})
    except LockError as e:
        log.warning("lock %s: release failed (the lease will end by itself): %s", lock.name, e)
        return
    if status == 409:
        lock.lost.set()
    elif status != 204:
        log.warning("lock %s: release answered %d: %s", lock.name, status, data.get("error"))
