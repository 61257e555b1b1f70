"""The registry on a fake clock: registration, heartbeats, expiry, protection, restarts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from control_plane.clock import FakeClock
from control_plane.errors import NotFound
from control_plane.model import InstanceRecord, Status
from control_plane.registry import Registry
from control_plane.schema import InstancePatch, Registration
from control_plane.store import Store
from control_plane.store_memory import MemoryStore
from control_plane.wire import Policy
from tests.conftest import new_store


def reg(n: int, **kw: object) -> Registration:
    return Registration(address="10.0.0.1", port=8000 + n, id=f"i{n}", **kw)  # type: ignore[arg-type]


async def make(store: Store, clock: FakeClock) -> Registry:
    registry = Registry(store, clock, heartbeat_ttl=15, remove_after=30, protect_percent=15)
    await registry.start()
    return registry


@pytest.fixture
async def store(store_kind: str, tmp_path: Path, redis_url: str) -> AsyncIterator[Store]:
    store = new_store(store_kind, tmp_path, redis_url)
    yield store
    await store.close()


class SlowStore(MemoryStore):
    """Writes take a while, as a remote store's do."""

    async def put_instance(self, record: InstanceRecord) -> None:
        await asyncio.sleep(0.05)
        await super().put_instance(record)


async def test_a_cancelled_write_neither_is_lost_nor_overtakes_the_next(clock: FakeClock) -> None:
    store = SlowStore()
    r = await make(store, clock)
    await r.register("svc", reg(1))
    drain = asyncio.create_task(r.update("svc", "i1", InstancePatch(status="draining")))
    await asyncio.sleep(0.01)  # the drain is writing now
    drain.cancel()
    weight = await r.update("svc", "i1", InstancePatch(weight=7))
    with pytest.raises(asyncio.CancelledError):
        await drain
    # the drain committed before the weight change started from it
    assert (weight.record.weight, weight.status) == (7, Status.DRAINING)
    (stored,) = (await store.load()).instances
    assert (stored.weight, stored.draining) == (7, True)


async def test_readers_never_see_a_record_without_its_liveness(clock: FakeClock) -> None:
    """The publisher rebuilds between any two awaits; a half-registered instance crashed it."""
    r = await make(SlowStore(), clock)
    registering = asyncio.create_task(r.register("svc", reg(1)))
    while not registering.done():
        r.services()  # raised KeyError between the commit and the liveness update
        for view in r.instances("svc") if "svc" in {s.name for s in r.services()} else []:
            assert view.status is Status.HEALTHY
        await asyncio.sleep(0)
    await registering


async def test_draining_instances_neither_count_for_nor_are_held_by_protection(
    store: Store, clock: FakeClock
) -> None:
    r = await make(store, clock)
    for n in range(10):
        await r.register("svc", reg(n))
    for n in range(3):  # three instances drain and go quiet, as they do when shutting down
        await r.update("svc", f"i{n}", InstancePatch(status="draining"))
    clock.advance(20)
    for n in range(3, 10):
        r.heartbeat("svc", f"i{n}")
    clock.advance(11)
    await r.expire()
    assert r.protection is False
    assert [v.record.id for v in r.instances("svc")] == [f"i{n}" for n in range(3, 10)]


async def test_register_update_and_keep_unsent_fields(store: Store, clock: FakeClock) -> None:
    r = await make(store, clock)
    view, created = await r.register("svc", reg(1, zone="a", weight=7, metadata={"v": "1"}))
    assert created
    assert view.status is Status.HEALTHY
    view, created = await r.register("svc", Registration(address="10.0.0.9", port=9, id="i1"))
    assert not created
    assert (view.record.address, view.record.port) == ("10.0.0.9", 9)
    assert (view.record.zone, view.record.weight, view.record.metadata) == ("a", 7, {"v": "1"})


async def test_reregistering_does_not_undo_a_drain(store: Store, clock: FakeClock) -> None:
    r = await make(store, clock)
    await r.register("svc", reg(1))
    await r.update("svc", "i1", InstancePatch(status="draining"))
    view, _ = await r.register("svc", reg(1))
    assert view.status is Status.DRAINING
    view = await r.update("svc", "i1", InstancePatch(status="healthy"))
    assert view.status is Status.HEALTHY


async def test_unknown_instances_are_not_found(store: Store, clock: FakeClock) -> None:
    r = await make(store, clock)
    with pytest.raises(NotFound):
        r.heartbeat("svc", "nope")
    with pytest.raises(NotFound):
        await r.deregister("svc", "nope")
    with pytest.raises(NotFound):
        r.service("svc")


async def test_lapse_recover_and_expire(store: Store, clock: FakeClock) -> None:
    r = await make(store, clock)
    for n in range(10):
        await r.register("svc", reg(n))
    clock.advance(10)
    for n in range(1, 10):
        r.heartbeat("svc", f"i{n}")
    clock.advance(6)  # i0 is 16 s old
    await r.expire()
    assert r.instance("svc", "i0").status is Status.UNHEALTHY
    assert r.heartbeat("svc", "i0") is Status.HEALTHY  # a heartbeat brings it back
    for _ in range(2):
        clock.advance(14)
        for n in range(1, 10):
            r.heartbeat("svc", f"i{n}")
    clock.advance(3)  # i0 is 31 s old, the others 3 s
    await r.expire()
    assert [v.record.id for v in r.instances("svc")] == [f"i{n}" for n in range(1, 10)]
    assert r.protection is False
    assert [i.id for i in (await store.load()).instances] == [f"i{n}" for n in range(1, 10)]


async def test_protection_holds_everything_until_heartbeats_recover(
    store: Store, clock: FakeClock
) -> None:
    r = await make(store, clock)
    for n in range(10):
        await r.register("svc", reg(n))
        r.heartbeat("svc", f"i{n}")
    clock.advance(10)
    for n in range(5):  # i5..i9 go silent: 50% of the registry
        r.heartbeat("svc", f"i{n}")
    clock.advance(25)  # 35 s for the silent ones: past remove-after
    for n in range(5):
        r.heartbeat("svc", f"i{n}")
    await r.expire()
    assert r.protection is True
    assert len(r.instances("svc")) == 10
    assert all(v.status is Status.HEALTHY for v in r.instances("svc"))
    # heartbeats come back for all but one: protection ends, the one dead instance expires
    for n in range(9):
        r.heartbeat("svc", f"i{n}")
    await r.expire()
    assert r.protection is False
    assert [v.record.id for v in r.instances("svc")] == [f"i{n}" for n in range(9)]


async def test_instances_that_never_heartbeat_cannot_hold_protection_on(
    store: Store, clock: FakeClock
) -> None:
    """Four junk registrations that never heartbeat once went silent together with the one
    real instance: protection held all five forever, the dead real one healthy in every table."""
    r = await make(store, clock)
    for n in range(4):
        await r.register("junk", reg(n))
    await r.register("svc", reg(9))
    r.heartbeat("svc", "i9")  # real, then it dies
    for _ in range(3):
        clock.advance(6)
        await r.expire()
    assert r.protection is False
    assert r.instance("svc", "i9").status is Status.UNHEALTHY
    clock.advance(15)
    await r.expire()
    assert [s.name for s in r.services()] == []  # all gone on time


async def test_protection_ends_after_protect_max_at_a_bounded_rate(
    store: Store, clock: FakeClock
) -> None:
    r = Registry(
        store, clock, heartbeat_ttl=15, remove_after=30, protect_percent=15, protect_max=300
    )
    await r.start()
    for n in range(20):
        await r.register("svc", reg(n))
        r.heartbeat("svc", f"i{n}")
    live = [f"i{n}" for n in range(10)]  # i10..i19 go silent: 50 %, protection
    released_at: list[float] = []
    for second in range(5, 600, 5):
        clock.advance(5)
        for instance_id in live:
            r.heartbeat("svc", instance_id)
        before = r.statistics().released
        await r.expire()
        released_at += [second] * (r.statistics().released - before)
        if 20 <= second < 320:  # on once they are 15 s silent, and for 300 s after
            assert (r.protection, r.outlasted) == (True, False), second
    # from then on at most 10 % of all instances per 15 s TTL (2 of 20, then 1 of 18 or
    # fewer), the oldest first, until so few are silent that protection is off
    assert released_at[:2] == [320, 320]
    for i in range(2, len(released_at)):
        assert released_at[i] - released_at[i - 1] >= 15, released_at
    assert r.protection is False
    assert sorted(v.record.id for v in r.instances("svc")) == sorted(live)  # none held


async def test_restart_gives_a_full_ttl_of_grace(store: Store, clock: FakeClock) -> None:
    r = await make(store, clock)
    await r.register("svc", reg(1))
    await r.update("svc", "i1", InstancePatch(weight=5))
    await r.set_policy("svc", Policy(lb="round_robin"))
    clock.advance(29)  # almost removable when the control plane "restarts"
    r2 = await make(store, clock)
    view = r2.instance("svc", "i1")
    assert view.record.weight == 5
    assert view.last_heartbeat is None  # not seen since this process started
    assert r2.policy("svc").lb == "round_robin"
    clock.advance(15)
    await r2.expire()
    assert r2.instance("svc", "i1").status is Status.HEALTHY
    clock.advance(1)
    await r2.expire()
    assert r2.instance("svc", "i1").status is Status.UNHEALTHY


async def test_service_lifecycle_with_policy_only(store: Store, clock: FakeClock) -> None:
    r = await make(store, clock)
    await r.set_policy("empty", Policy(retries=0))
    assert r.service("empty").instances == []
    assert r.service("empty").policy_set is True
    await r.register("empty", reg(1))
    await r.clear_policy("empty")
    assert r.service("empty").policy_set is False
    await r.deregister("empty", "i1")
    with pytest.raises(NotFound):
        r.service("empty")
    assert [s.name for s in r.services()] == []


async def test_statistics_and_repr(store: Store, clock: FakeClock) -> None:
    r = await make(store, clock)
    await r.register("a", reg(1))
    await r.register("b", reg(2))
    clock.advance(16)
    r.heartbeat("b", "i2")
    await r.expire()
    stats = r.statistics()
    assert (stats.services, stats.instances, stats.lapsed, stats.protection) == (2, 2, 1, False)
    assert "2 services, 2 instances, 1 lapsed" in repr(r)
