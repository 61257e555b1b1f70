"""Locks for apps, with fencing tokens: names, limits, grants, and the waiting loop.

An app asks its sidecar, which asks the control plane as its own service (the service's
token); the store decides. A lock's **key** is ``SERVICE/NAME``: names are the caller's own
unless the admin grants a shared name to a list of services (``PUT /v1/lock-grants/NAME``),
whose members then share the key ``*/NAME``.

Every acquisition gets a **fencing token** from the store, strictly greater than every token
handed out before for the key (across releases, expiries and restarts of a durable store).
A lease can end while its holder still thinks it holds it (a GC pause, a stopped process, a
slow network): the token is what makes that safe, because the resource the lock guards
refuses a token lower than the highest it has seen (Kleppmann, "How to do distributed
locking", 2016). The store is the one authority: no quorum of clocks (Redlock) is involved.

``Locks`` holds the grants in memory (loaded from the store at start-up, written through) and
runs the waiting loop of ``wait_ms``: retry with a short capped, jittered backoff, woken at
once when a holder on this control plane releases the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from control_plane.errors import BadRequest, Conflict, NotFound, TooManyRequests

if TYPE_CHECKING:  # (the store's Protocol names LockGrant)
    from control_plane.store import Store

LOCK_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TTL_MS: Final = (100, 600_000)
"""a lease's length, milliseconds (inclusive bounds)"""
WAIT_MS: Final = (0, 60_000)
"""how long an acquisition may wait for a held lock, milliseconds"""
MAX_GRANTS: Final = 1_000
"""shared lock names the admin may grant"""
MAX_GRANT_SERVICES: Final = 100
"""services one grant may list"""
MAX_WAITERS: Final = 1_000
"""acquisitions waiting at once on one control plane (429 above)"""
BACKOFF_FIRST: Final = 0.005
"""seconds before the first retry of a held lock"""
BACKOFF_CAP: Final = 0.1
"""seconds between retries at most (a release on another replica is seen this late)"""
SHARED: Final = "*"
"""the service part of a granted name's key"""


@dataclass(frozen=True, slots=True)
class LockGrant:
    """What the store answers an acquisition that took the lock."""

    token: int
    """the fencing token: greater than every earlier token of the key"""
    expires_in_ms: int
    """the lease's length from now, milliseconds"""


@dataclass(frozen=True, slots=True)
class Held:
    """An acquisition as the API answers it."""

    name: str
    token: int
    expires_in_ms: int
    shared: bool
    """the name is granted to several services (key ``*/NAME``)"""


@dataclass(frozen=True, slots=True)
class LockStatistics:
    acquisitions: int
    refusals: int
    """acquisitions answered 409: still held after ``wait_ms``"""
    renewals: int
    releases: int
    waiting: int
    """acquisitions waiting now"""
    grants: int


def check_name(name: str, field: str = "name") -> str:
    """``name`` if it is a lock name; else BadRequest naming ``field``."""
    if not LOCK_NAME.fullmatch(name):
        raise BadRequest(
            f"lock name {name[:80]!r} is not of the form {LOCK_NAME.pattern}: 1 to 128 letters, "
            "digits, '.', '_' or '-', starting with a letter or digit",
            field,
        )
    return name


class Locks:
    """The lock service of one control plane: ``acquire``, ``renew``, ``release`` for a
    calling service, and the admin's grants."""

    def __init__(
        self,
        store: Store,
        *,
        max_waiters: int = MAX_WAITERS,
        backoff: tuple[float, float] = (BACKOFF_FIRST, BACKOFF_CAP),
    ) -> None:
        self._store = store
        self._max_waiters = max_waiters
        self.backoff = backoff
        """seconds before the first retry of a held lock, and between retries at most"""
        self.grants: dict[str, frozenset[str]] = {}
        """shared name -> the services that share it"""
        self._released: dict[str, asyncio.Event] = {}
        """key -> set when a holder on this control plane releases it (waiters wake)"""
        self._waiting = 0
        self.acquisitions = self.refusals = self.renewals = self.releases = 0

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<Locks [{s.acquisitions} acquired, {s.refusals} refused, {s.waiting} waiting, "
            f"{s.grants} grants]>"
        )

    def statistics(self) -> LockStatistics:
        return LockStatistics(
            self.acquisitions,
            self.refusals,
            self.renewals,
            self.releases,
            self._waiting,
            len(self.grants),
        )

    def load(self, grants: dict[str, frozenset[str]]) -> None:
        self.grants = dict(grants)

    def apply(self, grants: dict[str, frozenset[str] | None]) -> None:
        """Grants as the shared store has them now (another replica changed them)."""
        for name, services in grants.items():
            if services is None:
                self.grants.pop(name, None)
            else:
                self.grants[name] = services

    def key(self, service: str, name: str) -> tuple[str, bool]:
        """The store key of ``service``'s lock ``name``, and whether it is shared."""
        if service in self.grants.get(name, ()):
            return f"{SHARED}/{name}", True
        return f"{service}/{name}", False

    async def acquire(
        self,
        service: str,
        name: str,
        ttl_ms: int,
        wait_ms: int,
        gone: Callable[[], bool] = lambda: False,
    ) -> Held:
        """Take the lock, waiting up to ``wait_ms`` for its holder to let go; Conflict when
        it is still held then (or ``gone()`` says the caller left)."""
        key, shared = self.key(service, name)
        grant = await self._store.acquire_lock(key, ttl_ms)
        if grant is None and wait_ms > 0:
            grant = await self._wait(key, ttl_ms, wait_ms, gone)
        if grant is None:
            self.refusals += 1
            raise Conflict(f"lock {name} is held (waited {wait_ms} ms)", "name")
        self.acquisitions += 1
        return Held(name, grant.token, grant.expires_in_ms, shared)

    async def _wait(
        self, key: str, ttl_ms: int, wait_ms: int, gone: Callable[[], bool]
    ) -> LockGrant | None:
        if self._waiting >= self._max_waiters:
            raise TooManyRequests(
                f"{self._waiting} lock acquisitions are waiting already; retry later", None
            )
        self._waiting += 1
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + wait_ms / 1000
            delay, cap = self.backoff
            while not gone():
                left = deadline - loop.time()
                if left <= 0:
                    return None
                await self._pause(key, min(left, random.uniform(delay / 2, delay)))
                # never under a timeout: a cancelled store call could take the lock unseen
                grant = await self._store.acquire_lock(key, ttl_ms)
                if grant is not None:
                    return grant
                delay = min(delay * 2, cap)
            return None
        finally:
            self._waiting -= 1
            if not self._waiting:
                self._released.clear()  # (events nobody waits on: nothing grows)

    async def _pause(self, key: str, seconds: float) -> None:
        """Sleep ``seconds``, or less when this control plane sees ``key`` released."""
        released = self._released.setdefault(key, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await released.wait()

    async def renew(self, service: str, name: str, token: int, ttl_ms: int) -> LockGrant:
        key, _ = self.key(service, name)
        expires_in_ms = await self._store.renew_lock(key, token, ttl_ms)
        if expires_in_ms is None:
            raise Conflict(
                f"lock {name} is not held by token {token} (it expired or was released)", "token"
            )
        self.renewals += 1
        return LockGrant(token, expires_in_ms)

    async def release(self, service: str, name: str, token: int) -> None:
        key, _ = self.key(service, name)
        if not await self._store.release_lock(key, token):
            raise Conflict(
                f"lock {name} is not held by token {token} (it expired or was released)", "token"
            )
        self.releases += 1
        released = self._released.pop(key, None)
        if released is not None:
            released.set()

    async def grant(self, name: str, services: Iterable[str]) -> frozenset[str]:
        """Share ``name`` among ``services`` (replacing an earlier grant of it)."""
        members = frozenset(services)
        if name not in self.grants and len(self.grants) >= MAX_GRANTS:
            raise Conflict(f"{MAX_GRANTS} lock grants exist; delete some first", "name")
        await self._store.put_lock_grant(name, members)
        self.grants[name] = members
        return members

    async def revoke(self, name: str) -> None:
        if name not in self.grants:
            raise NotFound(f"no lock grant {name!r}", "name")
        await self._store.delete_lock_grant(name)
        del self.grants[name]
