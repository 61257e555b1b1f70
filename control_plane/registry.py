"""The service registry: services, their policies and instances, and instance liveness.

The registry keeps the whole registry in memory and writes every change through to its
``Store`` before acknowledging it; writes are serialised by one lock. Heartbeats are soft
state: they touch memory only. After a restart every known instance gets one full TTL of
grace before it can lapse. Its counters are plain integers, read when Prometheus scrapes.

What may be registered is bounded here: addresses no caller should be sent to are refused
(``schema.routable``), and so is an instance beyond ``max_instances`` or ``max_per_service``.
Who may register what is decided before (``api`` and ``publisher``, by token).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from control_plane.clock import Clock
from control_plane.errors import Conflict, NotFound
from control_plane.model import (
    Health,
    InstanceRecord,
    InstanceView,
    Origin,
    ServiceSummary,
    ServiceView,
    Status,
)
from control_plane.reaper import plan_expiry, protecting
from control_plane.schema import InstancePatch, Registration, routable
from control_plane.store import Snapshot, Store
from control_plane.wire import DEFAULT_POLICY, DEFAULT_WEIGHT, Policy

log = logging.getLogger("meshlet.registry")

T = TypeVar("T")
Key = tuple[str, str]
FencedWrite = Callable[[list[Key], dict[Key, Health]], Awaitable[bool]]
"""the reaper's write on a shared store: removals and health, refused (False) unless this
replica still holds the reaper's lease"""


class LeaseLost(Exception):
    """A fenced write was refused: another replica holds the reaper's lease now."""


RELEASE_SHARE = 0.1
"""once protection has held for ``protect_max``: the share of all instances let go per TTL"""


@dataclass(slots=True)
class _Liveness:
    seen: float
    """monotonic time of the last sign of life (or of this process's start)"""
    heartbeat_wall: float | None
    """wall-clock time of the last heartbeat this process saw"""
    lapsed: bool = False
    """no heartbeat for the TTL, or its sidecar's stream closed"""
    app_healthy: bool = True
    """what the instance's sidecar last said of its app"""
    proven: bool = True
    """heartbeated since it registered (junk that never does cannot hold protection on)"""


@dataclass(frozen=True, slots=True)
class RegistryStatistics:
    services: int
    instances: int
    lapsed: int
    protection: bool
    heartbeats: int
    """REST heartbeats accepted (stream heartbeats are the publisher's to count)"""
    expired: int
    """instances the reaper removed after ``remove_after`` without a heartbeat"""
    outlasted: bool = False
    """protection has held for ``protect_max``: expiry resumes at a bounded rate"""
    released: int = 0
    """instances protection held but let go after ``protect_max``"""


class Registry:
    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        heartbeat_ttl: float,
        remove_after: float,
        protect_percent: float,
        protect_max: float = 900.0,
        loopback: bool = True,
        max_instances: int = 100_000,
        max_per_service: int = 10_000,
    ) -> None:
        self._store = store
        self._clock = clock
        self.heartbeat_ttl = heartbeat_ttl
        self.remove_after = remove_after
        self.protect_percent = protect_percent
        self.protect_max = protect_max
        """seconds protection may hold before expiry resumes at ``RELEASE_SHARE`` per TTL"""
        self.loopback = loopback
        """whether loopback addresses may be registered"""
        self.max_instances = max_instances
        self.max_per_service = max_per_service
        self._policies: dict[str, Policy] = {}
        self._instances: dict[str, dict[str, InstanceRecord]] = {}
        self._live: dict[tuple[str, str], _Liveness] = {}
        self._lock = asyncio.Lock()
        self.protection = False
        self._protected_since = 0.0
        self.outlasted = False
        self._releases: collections.deque[float] = collections.deque()
        """monotonic times of the releases within the last TTL"""
        self.released = 0
        self.heartbeats = 0
        self.expired = 0
        self._held_logged = -float("inf")
        self._listener: Callable[[], None] | None = None
        self._shared = False
        self._seen_out: dict[Key, float] = {}
        """replicas: heartbeats heard here, not yet written to the shared store (wall clock)"""
        self._health_out: dict[Key, Health] = {}
        """replicas: health changes seen here, not yet written to the shared store"""

    def on_change(self, listener: Callable[[], None]) -> None:
        """``listener()`` runs (synchronously) after anything that can change the routing table:
        a policy, an instance, its weight, drain or health."""
        self._listener = listener

    def _changed(self) -> None:
        if self._listener is not None:
            self._listener()

    async def start(self) -> Snapshot:
        """Load the store; every loaded instance starts with a full TTL of grace."""
        snapshot = await self._store.load()
        now = self._clock.monotonic()
        self._policies = dict(snapshot.policies)
        for record in snapshot.instances:
            self._instances.setdefault(record.service, {})[record.id] = record
            # Unhealthy at the last publish: stays out until it shows a sign of life; the rest
            # get one TTL of grace for their sidecars to reconnect.
            lapsed = record.key in snapshot.lapsed
            self._live[record.key] = _Liveness(seen=now, heartbeat_wall=None, lapsed=lapsed)
        log.info(
            "registry loaded: %d services, %d instances",
            len(self._service_names()),
            len(snapshot.instances),
        )
        return snapshot

    # -- reads ---------------------------------------------------------------------------

    def services(self) -> list[ServiceSummary]:
        result = []
        for name in sorted(self._service_names()):
            counts = dict.fromkeys(Status, 0)
            for record in self._instances.get(name, {}).values():
                counts[self._status(record)] += 1
            result.append(ServiceSummary(name, self.policy(name).lb, counts))
        return result

    def service(self, name: str) -> ServiceView:
        return ServiceView(name, self.policy(name), name in self._policies, self.instances(name))

    def views(self) -> list[ServiceView]:
        """Every service with its policy and instances (what the routing table is built from)."""
        return [self.service(name) for name in sorted(self._service_names())]

    def policy(self, name: str) -> Policy:
        return self._policies.get(name, DEFAULT_POLICY)

    def instances(self, name: str) -> list[InstanceView]:
        self._require_service(name)
        return [self._view(r) for _, r in sorted(self._instances.get(name, {}).items())]

    def instance(self, service: str, instance_id: str) -> InstanceView:
        return self._view(self._record(service, instance_id))

    def protected(self) -> frozenset[str]:
        """Services with instances that protection is holding right now (past the TTL, not
        draining); none while it is off. Protection itself is one registry-wide decision."""
        if not self.protection:
            return frozenset()
        now = self._clock.monotonic()
        return frozenset(
            r.service
            for instances in self._instances.values()
            for r in instances.values()
            if not r.draining and now - self._live[r.key].seen > self.heartbeat_ttl
        )

    def statistics(self) -> RegistryStatistics:
        return RegistryStatistics(
            services=len(self._service_names()),
            instances=len(self._live),
            lapsed=sum(1 for live in self._live.values() if live.lapsed),
            protection=self.protection,
            heartbeats=self.heartbeats,
            expired=self.expired,
            outlasted=self.outlasted,
            released=self.released,
        )

    def __repr__(self) -> str:
        s = self.statistics()
        return (
            f"<Registry [{s.services} services, {s.instances} instances, {s.lapsed} lapsed"
            f"{', protection' if s.protection else ''}] store={self._store!r}>"
        )

    # -- writes --------------------------------------------------------------------------

    async def set_policy(self, service: str, policy: Policy) -> None:
        async with self._lock:
            await self._commit(
                self._store.put_policy(service, policy), self._policies.__setitem__, service, policy
            )
        self._changed()
        log.info("policy of %s set (lb %s)", service, policy.lb)

    async def clear_policy(self, service: str) -> None:
        """Back to the default policy; a service with no instances then disappears."""
        async with self._lock:
            self._require_service(service)
            if service not in self._policies:
                return
            await self._commit(
                self._store.delete_policy(service), self._policies.__delitem__, service
            )
        self._changed()
        log.info("policy of %s reset to defaults", service)

    async def register(
        self,
        service: str,
        reg: Registration,
        origin: Origin = Origin.REST,
        *,
        tls: bool | None = None,
    ) -> tuple[InstanceView, bool]:
        """Register or update an instance; True when it is new. BadRequest for an address no
        caller should be sent to, Conflict when the registry is full. ``tls``: whether its
        sidecar accepts mesh TLS (its hello says); None (REST) keeps what was said of the
        same address, else no."""
        instance_id = reg.instance_id()
        routable(reg.address, loopback=self.loopback)
        async with self._lock:
            old = self._instances.get(service, {}).get(instance_id)
            if old is None:
                self._check_room(service)
            record = InstanceRecord(
                service,
                instance_id,
                reg.address,
                reg.port,
                zone=_given(reg.zone, old.zone if old else ""),
                weight=_given(reg.weight, old.weight if old else DEFAULT_WEIGHT),
                metadata=_given(reg.metadata, old.metadata if old else {}),
                draining=old.draining if old else False,
                origin=origin,
                namespace=_given(reg.namespace, old.namespace if old else ""),
                tls=_given(tls, old is not None and old.tls and _same_place(old, reg)),
            )

            if record != old:
                # the record and its liveness appear together: readers between two awaits
                # (the publisher's rebuild) must never see one without the other
                await self._commit(self._store.put_instance(record), self._put, record, True)
                came_back = False
            else:
                came_back = self._touch(record.key)
        if record != old or came_back:
            self._changed()
        if old is None:
            log.info("registered %s/%s at %s:%d", service, instance_id, reg.address, reg.port)
        return self._view(record), old is None

    def _check_room(self, service: str) -> None:
        if len(self._live) >= self.max_instances:
            raise Conflict(
                f"the registry holds {len(self._live)} instances, its limit (--max-instances)",
                None,
            )
        if len(self._instances.get(service, {})) >= self.max_per_service:
            raise Conflict(
                f"service {service} has {self.max_per_service} instances, the limit per service "
                "(--max-instances-per-service)",
                "service",
            )

    def find(self, service: str, instance_id: str) -> InstanceRecord | None:
        return self._instances.get(service, {}).get(instance_id)

    def heartbeat(self, service: str, instance_id: str) -> Status:
        """Memory only, no store write: the hot path of every instance without a sidecar."""
        record = self._record(service, instance_id)
        self.heartbeats += 1
        self._live[record.key].proven = True
        if self._touch(record.key):
            log.info("%s/%s is heartbeating again", service, instance_id)
            self._changed()
        return self._status(record)

    def report(self, service: str, instance_id: str, *, app_healthy: bool) -> None:
        """A heartbeat over a sidecar's stream, with its app's health."""
        record = self._record(service, instance_id)
        live = self._live[record.key]
        was = self._status(record)
        self._touch(record.key)
        live.proven = True
        self._set_app_health(record, live, app_healthy, was)

    def set_app_health(self, service: str, instance_id: str, *, app_healthy: bool) -> None:
        """What a sidecar says of its app when it connects: no heartbeat (a stream that only
        says hello proves nothing)."""
        record = self._record(service, instance_id)
        self._set_app_health(record, self._live[record.key], app_healthy, self._status(record))

    def _set_app_health(
        self, record: InstanceRecord, live: _Liveness, app_healthy: bool, was: Status
    ) -> None:
        service, instance_id = record.key
        if live.app_healthy != app_healthy:
            live.app_healthy = app_healthy
            self._share_health(record.key, live)
            log.info(
                "%s/%s app %s", service, instance_id, "healthy" if app_healthy else "unhealthy"
            )
        if self._status(record) is not was:
            self._changed()

    def disconnected(self, service: str, instance_id: str) -> None:
        """Its sidecar's stream closed: unhealthy at once; removed after ``remove_after`` (from
        its last heartbeat) unless it comes back.

        Protection applies here too: when this would make more than ``protect_percent`` of
        all instances (and at least 3) unhealthy at once, the streams more likely broke on this
        side (a reset-style partition) than the sidecars all died: the instance stays as it
        is, and its heartbeats' TTL decides (under the reaper's protection)."""
        record = self._instances.get(service, {}).get(instance_id)
        if record is None:
            return
        live = self._live[record.key]
        if live.lapsed:
            return
        counted = [
            r
            for s in self._instances.values()
            for r in s.values()
            if not r.draining and self._live[r.key].proven
        ]
        lapsed = 1 + sum(1 for r in counted if self._live[r.key].lapsed)
        if (
            not record.draining
            and live.proven
            and protecting(lapsed, len(counted), self.protect_percent)
        ):
            now = self._clock.monotonic()
            if now - self._held_logged > self.heartbeat_ttl:
                self._held_logged = now
                log.warning(
                    "%d of %d instances lost their streams at once: kept as they are until "
                    "their heartbeats' TTL decides (protection)",
                    lapsed,
                    len(counted),
                )
            return
        live.lapsed = True
        self._share_health(record.key, live)
        log.info("%s/%s unhealthy: its sidecar's stream closed", service, instance_id)
        self._changed()

    async def update(self, service: str, instance_id: str, patch: InstancePatch) -> InstanceView:
        async with self._lock:
            old = self._record(service, instance_id)
            # (the rest as it was: its origin too, or a drained sidecar could not come back)
            record = dataclasses.replace(
                old,
                weight=_given(patch.weight, old.weight),
                draining=old.draining if patch.status is None else patch.status == "draining",
            )
            if record != old:
                await self._commit(self._store.put_instance(record), self._put, record)
                self._changed()
        if record.draining != old.draining:
            log.info(
                "%s/%s %s", service, instance_id, "draining" if record.draining else "undrained"
            )
        return self._view(record)

    async def deregister(self, service: str, instance_id: str) -> None:
        async with self._lock:
            record = self._record(service, instance_id)
            await self._commit(
                self._store.delete_instances([record.key]), self._forget, [record.key]
            )
        self._changed()
        log.info("deregistered %s/%s", service, instance_id)

    async def expire(self, fenced: FencedWrite | None = None) -> None:
        """One reaper sweep: lapse, remove, or hold everything under protection. On a shared
        store (replicas) its writes go through ``fenced``, all or nothing: LeaseLost when
        another replica holds the reaper's lease."""
        now = self._clock.monotonic()
        if self.protection and not self.outlasted:
            self._check_outlasted(now)
        plan = plan_expiry(
            {key: now - live.seen for key, live in self._live.items()},
            ttl=self.heartbeat_ttl,
            remove_after=self.remove_after,
            protect_percent=self.protect_percent,
            draining={r.key for s in self._instances.values() for r in s.values() if r.draining},
            unproven={key for key, live in self._live.items() if not live.proven},
            release=self._release_budget(now),
        )
        self._releases.extend(now for _ in plan.released)
        self.released += len(plan.released)
        if plan.protection != self.protection:
            self.protection = plan.protection
            self._protected_since = now
            self.outlasted = False
            if plan.protection:
                log.warning(
                    "protection on: %d of %d instances missed heartbeats at once; expiring "
                    "none of them until heartbeats recover (this control plane may be cut off; "
                    "DELETE instances that are really gone)",
                    plan.late,
                    plan.counted,
                )
            else:
                log.info("protection off: heartbeats recovered")
        if fenced is None:  # lapses stay in this process
            for key in plan.lapsed:
                self._lapse(key, now)
        await self._remove(plan.removed, plan.lapsed if fenced else (), fenced)

    def _lapse(self, key: Key, now: float) -> None:
        live = self._live[key]
        if not live.lapsed:
            live.lapsed = True
            log.info("%s/%s unhealthy: no heartbeat for %.1fs", *key, now - live.seen)
            self._changed()

    async def _remove(
        self, removable: tuple[Key, ...], lapsed: tuple[Key, ...], fenced: FencedWrite | None
    ) -> None:
        """Remove the instances still past ``remove_after`` and, on a shared store, lapse
        ``lapsed``: one write, the store's own or the reaper's fenced one."""
        if not removable and not lapsed:
            return
        async with self._lock:
            now = self._clock.monotonic()
            gone = [
                k
                for k in removable
                if k in self._live and now - self._live[k].seen > self.remove_after
            ]
            health = {
                k: Health(True, not self._live[k].app_healthy, self._live[k].heartbeat_wall or 0)
                for k in lapsed
                if k in self._live and not self._live[k].lapsed
            }
            if not gone and not health:
                return

            async def write_fenced(fenced: FencedWrite) -> None:
                if not await fenced(gone, health):
                    raise LeaseLost("another replica holds the reaper's lease")

            def apply() -> None:
                for key in health:
                    self._lapse(key, now)
                if gone:
                    self._forget(gone)
                    self.expired += len(gone)
                    self._changed()

            write = self._store.delete_instances(gone) if fenced is None else write_fenced(fenced)
            await self._commit(write, apply)
        for service, instance_id in gone:
            log.info(
                "removed %s/%s: no heartbeat for over %.0fs",
                service,
                instance_id,
                self.remove_after,
            )

    def _check_outlasted(self, now: float) -> None:
        if now - self._protected_since < self.protect_max:
            return
        self.outlasted = True
        log.warning(
            "protection has held for %.0fs (--protect-max): expiring again, at most %d "
            "instances per %.0fs",
            now - self._protected_since,
            self._release_limit(),
            self.heartbeat_ttl,
        )

    def _release_limit(self) -> int:
        return max(1, int(len(self._live) * RELEASE_SHARE))

    def _release_budget(self, now: float) -> int:
        """How many held instances this sweep may let go: none until protection has held
        for ``protect_max``, then ``RELEASE_SHARE`` of all instances per TTL."""
        if not self.outlasted:
            return 0
        while self._releases and now - self._releases[0] >= self.heartbeat_ttl:
            self._releases.popleft()
        return max(0, self._release_limit() - len(self._releases))

    # -- replicas (a shared store: control_plane.replica) -----------------------------------

    def share_liveness(self) -> None:
        """Heartbeats and health changes seen here queue for ``take_liveness``: the replica
        writes them to the shared store in batches, for the other replicas and the reaper."""
        self._shared = True

    def take_liveness(self) -> tuple[dict[Key, float], dict[Key, Health]]:
        seen, self._seen_out = self._seen_out, {}
        health, self._health_out = self._health_out, {}
        return seen, health

    def return_liveness(self, seen: dict[Key, float], health: dict[Key, Health]) -> None:
        """A batch the store refused: kept for the next one (what came since wins)."""
        self._seen_out = seen | self._seen_out
        self._health_out = health | self._health_out

    def _share_health(self, key: Key, live: _Liveness) -> None:
        if self._shared:
            as_of = (live.heartbeat_wall or 0.0) if live.lapsed else self._clock.time()
            self._health_out[key] = Health(live.lapsed, not live.app_healthy, as_of)

    def apply_health(self, health: Mapping[Key, Health]) -> None:
        """Health as the shared store has it (what other replicas and the reaper saw). A lapse
        judged on an older sign of life than this replica heard itself (a replica whose
        stream to the instance closed after it had moved to this one) is stale: this replica
        says so in its next batch instead."""
        changed = False
        for key, value in health.items():
            record, live = self.find(*key), self._live.get(key)
            if record is None or live is None:
                continue
            heard = live.heartbeat_wall
            if value.lapsed and self._shared and heard is not None and heard > value.as_of:
                self._health_out[key] = Health(False, not live.app_healthy, heard)
                continue
            was = self._status(record)
            live.lapsed, live.app_healthy = value.lapsed, not value.sick
            changed = changed or self._status(record) is not was
        if changed:
            self._changed()

    def apply_seen(self, seen: Mapping[Key, float]) -> None:
        """Heartbeats that other replicas heard (wall-clock times): the reaper judges ages by
        them every sweep, the others show them as each instance's last heartbeat."""
        now, wall = self._clock.monotonic(), self._clock.time()
        for key, when in seen.items():
            live = self._live.get(key)
            if live is not None and (live.heartbeat_wall is None or when > live.heartbeat_wall):
                live.seen = max(live.seen, now - max(0.0, wall - when))
                live.heartbeat_wall = when
                live.proven = True

    def grace(self) -> None:
        """A full TTL for every instance from now: this replica just took over the reaping,
        and heartbeats that others heard reach it only from now on."""
        now = self._clock.monotonic()
        for live in self._live.values():
            live.seen = max(live.seen, now)

    async def apply_changes(
        self,
        policies: Mapping[str, Policy | None],
        instances: Mapping[Key, InstanceRecord | None],
    ) -> None:
        """Policies and instances as the shared store has them now (another replica wrote
        them; None: gone). Under the write lock, so no write of this replica interleaves."""
        async with self._lock:
            for service, policy in policies.items():
                if policy is None:
                    self._policies.pop(service, None)
                else:
                    self._policies[service] = policy
            for key, record in instances.items():
                if record is None:
                    self._forget([key])
                else:
                    self._put(record)
                    if key not in self._live:
                        now = self._clock.monotonic()
                        self._live[key] = _Liveness(now, None, proven=False)
        if policies or instances:
            self._changed()

    async def reload(self, snapshot: Snapshot, health: Mapping[Key, Health]) -> None:
        """Everything as the shared store has it (a replica that fell too far behind)."""
        async with self._lock:
            instances: dict[Key, InstanceRecord | None] = dict.fromkeys(self._live)
            instances.update({r.key: r for r in snapshot.instances})
            policies: dict[str, Policy | None] = dict.fromkeys(self._policies)
            policies.update(snapshot.policies)
        await self.apply_changes(policies, instances)
        self.apply_health(health)

    # -- internals -----------------------------------------------------------------------

    async def _commit(
        self, write: Coroutine[Any, Any, None], apply: Callable[..., None], *args: Any
    ) -> None:
        """Write to the store, then ``apply(*args)`` to memory; the caller holds the lock.

        A cancelled caller waits for the commit to finish before the cancellation goes on, so
        the lock is never released with a write still in flight: memory and the store never
        disagree, and the next writer always starts from the committed state.
        """

        async def both() -> None:
            await write
            apply(*args)

        commit = asyncio.ensure_future(both())
        try:
            await asyncio.shield(commit)
        except asyncio.CancelledError:
            await commit
            raise

    def _service_names(self) -> set[str]:
        return self._policies.keys() | self._instances.keys()

    def _require_service(self, name: str) -> None:
        if name not in self._policies and name not in self._instances:
            raise NotFound(f"no service {name!r}", "service")

    def _put(self, record: InstanceRecord, touch: bool = False) -> None:
        self._instances.setdefault(record.service, {})[record.id] = record
        if touch:
            self._touch(record.key)

    def _record(self, service: str, instance_id: str) -> InstanceRecord:
        record = self._instances.get(service, {}).get(instance_id)
        if record is None:
            raise NotFound(f"no instance {instance_id!r} in service {service!r}", "id")
        return record

    def _touch(self, key: tuple[str, str]) -> bool:
        """Record a heartbeat; True when the instance had lapsed."""
        live = self._live.get(key)
        if live is None:
            self._live[key] = _Liveness(self._clock.monotonic(), self._clock.time(), proven=False)
            return False
        was_lapsed = live.lapsed
        live.seen = self._clock.monotonic()
        live.heartbeat_wall = self._clock.time()
        live.lapsed = False
        if self._shared:
            self._seen_out[key] = live.heartbeat_wall
            if was_lapsed:
                self._health_out[key] = Health(False, not live.app_healthy, live.heartbeat_wall)
        return was_lapsed

    def _forget(self, keys: list[tuple[str, str]]) -> None:
        for service, instance_id in keys:
            instances = self._instances.get(service, {})
            instances.pop(instance_id, None)
            if not instances:
                self._instances.pop(service, None)
            self._live.pop((service, instance_id), None)

    def _status(self, record: InstanceRecord) -> Status:
        if record.draining:
            return Status.DRAINING
        live = self._live[record.key]
        return Status.UNHEALTHY if live.lapsed or not live.app_healthy else Status.HEALTHY

    def _view(self, record: InstanceRecord) -> InstanceView:
        return InstanceView(record, self._status(record), self._live[record.key].heartbeat_wall)


def _same_place(record: InstanceRecord, reg: Registration) -> bool:
    return (record.address, record.port) == (reg.address, reg.port)


def _given(value: T | None, current: T) -> T:
    return current if value is None else value
