"""A control-plane replica: one of several processes that share one Redis store.

Every replica holds the whole registry in memory, serves REST and sidecar streams, and writes
through to Redis as a single control plane writes through to SQLite. What makes them one
control plane, the tasks a replica owns (``run``):

follow
    Every write also appends its kind and key to a Redis Stream (``store_redis``). Each
    replica reads the stream from where it last was and applies the *current* value of each
    key named (read after the entry, under the registry's write lock, so that a write of its
    own never interleaves): policies, instances, health, lock grants, tokens (a token
    revoked on one replica closes its streams on all), the trust bundle's roots and the CA
    (one replica restarted with ``--ca-cert`` makes the others sign with it too). After a
    reconnect it resumes from its last entry; a replica that fell further behind than the
    stream keeps (``CHANGES_KEPT``) reloads everything. Streams rather than pub/sub: pub/sub
    forgets what was said while a replica was disconnected, and the stream's ids order
    changes with the writes.
share
    Heartbeats stay soft state, in batches: every ``SHARE_EVERY`` seconds one script writes the
    last heartbeat of every instance heard since (a hash of wall-clock times), the health
    changes seen here (a stream that closed, an app that turned sick, an instance that came
    back), and this replica's sidecars (for ``/v1/sidecars``). 10k heartbeats/s cost a
    replica four writes a second. Every ``SIDECARS_EVERY`` seconds it reads the heartbeats all
    replicas heard, so any replica shows an instance's last heartbeat.
reap
    One replica at a time expires instances, elected by a lease: ``SET NX PX`` to acquire, with
    a fencing token from ``INCR`` on every acquisition; renewal and release only by the holder
    (Lua). Every sweep first reads the heartbeats all replicas shared, and its writes (lapses
    and removals) run in one Lua script that checks the lease is still this replica's *and*
    the fence is still its token, so a replica that was paused or cut off past its lease
    writes nothing. A refused write or a failed renewal steps down at once; a new holder gives
    every instance a full TTL of grace first.

Table versions come from one counter (``claim_table_version``): a replica that builds a table
with the same content as the last version claimed gets that version, so every replica pushes
the same table under the same version and a sidecar moving between replicas is sent nothing
it has.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import socket
from typing import TYPE_CHECKING

from control_plane.access import Tokens
from control_plane.clock import Clock
from control_plane.errors import StoreError
from control_plane.locks import Locks
from control_plane.model import TokenRecord
from control_plane.publisher import Publisher
from control_plane.registry import LeaseLost, Registry
from control_plane.store import Changes, Fence, Snapshot
from control_plane.trust import Trust

if TYPE_CHECKING:
    from control_plane.store_redis import RedisStore

log = logging.getLogger("meshlet.replica")

SHARE_EVERY = 0.25
"""seconds between a replica's batches of heartbeats and health changes"""
FOLLOW_BLOCK_MS = 1000
"""how long one read of the change stream waits for news (under the store's timeout)"""
RETRY_AFTER = 0.5
"""seconds before the next try when Redis failed"""
SIDECARS_EVERY = 2.0
"""seconds between refreshes of this replica's list of sidecars in Redis, and reads of the
heartbeats other replicas heard"""


class Replica:
    def __init__(
        self,
        store: RedisStore,
        registry: Registry,
        tokens: Tokens,
        locks: Locks,
        publisher: Publisher,
        clock: Clock,
        *,
        lease_ttl: float,
        trust: Trust,
    ) -> None:
        self.store = store
        self.trust = trust
        self.registry = registry
        self.tokens = tokens
        self.locks = locks
        self.publisher = publisher
        self.clock = clock
        self.lease_ttl = lease_ttl
        self.id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        """this replica's name in Redis (the lease's holder, the sidecar lists)"""
        self.fence: Fence | None = None
        """the reaper's lease while this replica holds it"""
        self._lease_until = 0.0
        """when the lease runs out by this replica's clock: counted from before it asked Redis
        to take or renew it, so never later than Redis lets it go"""
        self.interval = min(1.0, lease_ttl / 5, registry.heartbeat_ttl / 4)
        """seconds between reaper ticks: a sweep and a renewal, or a try to acquire"""
        self.acquired = 0
        """times this replica took the lease"""
        self.lost = 0
        """times it lost the lease while holding it (a fenced write refused, a renewal failed)"""
        self.resyncs = 0
        """times it fell behind the change stream and reloaded everything"""
        self._last = "0-0"
        """the change stream's last entry this replica applied"""
        self._consumed = 0
        """entries ever added to the stream up to ``_last``"""
        publisher.claim = store.claim_table_version
        publisher.sidecars_of_all = self._sidecars

    def __repr__(self) -> str:
        role = f"reaper, token {self.fence.token}" if self.fence else "follower"
        return f"<Replica {self.id} [{role}] at {self._last}>"

    @property
    def leading(self) -> bool:
        """Holding the lease, as far as this replica can tell: a replica paused past its lease
        stops saying so as it resumes, before its next tick finds out from the fence."""
        return self.fence is not None and self.clock.monotonic() < self._lease_until

    async def start(self) -> Snapshot:
        """Load the registry (before the first table is built): the change stream's position
        first, so that no write after the load is missed, then the shared health; from then
        on, share."""
        self._last, self._consumed = await self.store.position()
        snapshot = await self.registry.start()
        self.registry.apply_health(await self.store.load_health())
        self.registry.share_liveness()
        return snapshot

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._follow(), name="follow")
            tasks.create_task(self._share(), name="share")
            tasks.create_task(self._reap(), name="reap")

    async def close(self) -> None:
        """On shutdown: the last batch, and the lease handed back (another replica takes over
        at its next tick instead of after the TTL)."""
        with contextlib.suppress(StoreError):
            await self._share_once()
            if self.fence is not None:
                await self.store.release_lease(self.fence)
                self.fence = None

    # -- follow -----------------------------------------------------------------------------

    async def _follow(self) -> None:
        while True:
            try:
                changes = await self.store.changes(self._last, self._consumed, FOLLOW_BLOCK_MS)
                if changes.gap:
                    await self._reload()
                else:
                    await self._apply(changes)
                    self._last, self._consumed = changes.last, self._consumed + changes.read
            except StoreError as e:
                log.warning("cannot follow the registry's changes: %s; retrying", e)
                await asyncio.sleep(RETRY_AFTER)

    async def _apply(self, changes: Changes) -> None:
        if not changes.keys:
            return
        policies, instances, tokens, health, grants, roots = await self.store.fetch(changes.keys)
        await self.registry.apply_changes(policies, instances)
        self.registry.apply_health(health)
        self.locks.apply(grants)
        self.trust.apply_roots(roots)
        if "c" in changes.keys:
            self.trust.apply_ca(await self.store.load_ca())
        await self._apply_tokens(tokens)

    async def _apply_tokens(self, tokens: dict[str, TokenRecord | None]) -> None:
        for token_id in self.tokens.apply(tokens):
            closed = await self.publisher.close_streams_of(token_id)
            log.info("token %s revoked on another replica: %d streams closed", token_id, closed)

    async def _reload(self) -> None:
        self.resyncs += 1
        log.warning("fell behind the registry's changes: reloading everything")
        position = await self.store.position()  # first: nothing after it is missed
        snapshot = await self.store.load()
        await self.registry.reload(snapshot, await self.store.load_health())
        self.locks.load(snapshot.lock_grants)
        self.trust.reload(snapshot)
        tokens: dict[str, TokenRecord | None] = {r.id: None for r in self.tokens.records()}
        tokens.update({r.id: r for r in snapshot.tokens})
        await self._apply_tokens(tokens)
        self._last, self._consumed = position

    # -- share ------------------------------------------------------------------------------

    async def _share(self) -> None:
        until_sidecars = 0.0
        while True:
            await asyncio.sleep(SHARE_EVERY)
            try:
                await self._share_once()
                now = self.clock.monotonic()
                if now >= until_sidecars:
                    until_sidecars = now + SIDECARS_EVERY
                    until = self.clock.time() + 3 * SIDECARS_EVERY
                    await self.store.put_sidecars(self.id, self.publisher.sidecars(), until)
                    if not self.leading:  # (the reaper reads them every sweep)
                        self.registry.apply_seen(await self.store.load_seen())
            except StoreError as e:
                log.debug("liveness not shared: %s", e)

    async def _share_once(self) -> None:
        seen, health = self.registry.take_liveness()
        try:
            await self.store.put_liveness(seen, health)
        except BaseException:
            self.registry.return_liveness(seen, health)
            raise

    async def _sidecars(self) -> list[dict[str, object]]:
        lists = await self.store.load_sidecars(self.clock.time())
        lists[self.id] = self.publisher.sidecars()  # this replica's, as they are now
        return [
            {**sidecar, "replica": replica}
            for replica, sidecars in sorted(lists.items())
            for sidecar in sidecars
        ]

    # -- reap -------------------------------------------------------------------------------

    async def _reap(self) -> None:
        ttl_ms = int(self.lease_ttl * 1000)
        while True:
            await asyncio.sleep(self.interval)
            if self.fence is None:
                await self._acquire(ttl_ms)
                continue
            try:
                # sweep first, renew after: a replica that was paused past its lease finds out
                # from the fence, which no clock of its own can fool
                self.registry.apply_seen(await self.store.load_seen())
                await self.registry.expire(functools.partial(self.store.expire_fenced, self.fence))
                asked = self.clock.monotonic()
                if not await self.store.renew_lease(self.fence, ttl_ms):
                    raise LeaseLost("the lease expired before it was renewed")
                self._lease_until = asked + self.lease_ttl
            except (LeaseLost, StoreError) as e:
                self.fence = None
                self.lost += 1
                log.warning("stepped down as the reaper: %s", e)
            except Exception:
                log.exception("bug: expiry sweep failed; retrying")

    async def _acquire(self, ttl_ms: int) -> None:
        try:
            asked = self.clock.monotonic()
            fence = await self.store.acquire_lease(self.id, ttl_ms)
            if fence is None:
                return
            self.registry.apply_seen(await self.store.load_seen())
        except StoreError:
            return
        self.registry.grace()
        self.fence = fence
        self._lease_until = asked + self.lease_ttl
        self.acquired += 1
        log.info("took the reaper's lease (fencing token %d)", fence.token)
