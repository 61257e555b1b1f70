"""Control-plane replicas on one real Redis: changes reach every replica, one reaper under a
lease, and a reaper that lost its lease writes nothing (the fencing check)."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from control_plane.app import REPLICA
from control_plane.clock import FakeClock
from control_plane.model import InstanceRecord
from control_plane.registry import LeaseLost, Registry
from control_plane.store import open_store
from control_plane.store_redis import RedisStore
from tests.conftest import Api, MakeApi
from tests.control_plane.test_api import call, register
from tests.control_plane.test_publisher import connect, hello
from tests.redis_server import RedisServer

CATALOG = "/v1/services/catalog"


async def eventually(check: Callable[[], Any], within: float = 5.0) -> None:
    """Until ``await check()`` is true (a coroutine function) or ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s")
        await asyncio.sleep(0.05)


async def replicas(make_api: MakeApi, url: str, n: int = 2, **config: Any) -> list[Api]:
    return [await make_api(store=open_store(url), **config) for _ in range(n)]


def redis_store(url: str) -> RedisStore:
    store = open_store(url)
    assert isinstance(store, RedisStore)
    return store


async def test_a_change_made_on_one_replica_reaches_the_others(
    make_api: MakeApi, redis_url: str
) -> None:
    a, b = await replicas(make_api, redis_url)
    status, _ = await call(a, "PUT", f"{CATALOG}/policy", {"lb": "round_robin", "retries": 3})
    assert status == 200
    await register(a, id="i1", address="10.0.0.1", port=8080)

    async def b_has_them() -> bool:
        status, data = await call(b, "GET", CATALOG)
        return status == 200 and data["policy"]["retries"] == 3 and len(data["instances"]) == 1

    await eventually(b_has_them)
    assert (await call(b, "DELETE", f"{CATALOG}/instances/i1"))[0] == 204
    status, _ = await call(b, "PATCH", f"{CATALOG}/instances/i1", {"weight": 5})
    assert status == 404

    async def gone_from_a() -> bool:
        _, data = await call(a, "GET", CATALOG)
        return not data["instances"]

    await eventually(gone_from_a)


async def test_replicas_push_the_same_table_under_the_same_version(
    make_api: MakeApi, redis_url: str
) -> None:
    a, b, c = await replicas(make_api, redis_url, 3, debounce_quiet=0.02, debounce_max=0.1)
    for n in range(3):
        await register((a, b, c)[n], id=f"i{n}", address=f"10.0.0.{n + 1}", port=8080)

    async def same_table() -> bool:
        tables = [(await call(api, "GET", "/v1/table"))[1] for api in (a, b, c)]
        return (
            all(t == tables[0] for t in tables)
            and len(tables[0]["services"].get("catalog", {}).get("endpoints", [])) == 3
        )

    await eventually(same_table)
    _, table = await call(a, "GET", "/v1/table")
    assert table["version"] >= 1


async def test_a_token_revoked_on_one_replica_is_refused_by_the_others(
    make_api: MakeApi, redis_url: str
) -> None:
    a, b = await replicas(make_api, redis_url)
    status, minted = await call(a, "POST", "/v1/tokens", {"service": "catalog"})
    assert status == 201
    bearer = {"Authorization": f"Bearer {minted['secret']}"}

    async def b_takes_it() -> bool:
        status, _ = await call(b, "GET", "/v1/services", headers=bearer)
        return status == 403  # known (a service token may not list), not 401

    await eventually(b_takes_it)
    assert (await call(b, "DELETE", f"/v1/tokens/{minted['id']}"))[0] == 204

    async def a_refuses_it() -> bool:
        status, _ = await call(a, "GET", "/v1/services", headers=bearer)
        return status == 401

    await eventually(a_refuses_it)


async def test_one_replica_reaps_and_every_replica_sees_the_removal(
    make_api: MakeApi, redis_url: str, clock: FakeClock
) -> None:
    a, b = await replicas(make_api, redis_url, heartbeat_ttl=2.0, remove_after=4.0, lease_ttl=1.0)
    await register(a, id="quiet", address="10.0.0.1", port=8080)
    for n in range(3):  # heartbeating ones, so that one silent instance is no partition
        await register(a, "other", id=f"o{n}", address=f"10.0.1.{n + 1}", port=8080)

    def leaders() -> list[bool]:
        return [api.app[REPLICA].leading for api in (a, b)]

    async def one_leader() -> bool:
        return leaders().count(True) == 1

    await eventually(one_leader)
    for _ in range(6):  # past remove_after, the others heartbeating through b
        clock.advance(1.0)
        for n in range(3):
            status, _ = await call(b, "PUT", f"/v1/services/other/instances/o{n}/heartbeat")
            assert status == 200
        await asyncio.sleep(0.4)

    async def removed_everywhere() -> bool:
        found = [(await call(api, "GET", CATALOG))[0] for api in (a, b)]
        return found == [404, 404]

    await eventually(removed_everywhere)
    for api in (a, b):
        _, other = await call(api, "GET", "/v1/services/other")
        assert [i["status"] for i in other["instances"]] == ["healthy"] * 3
    assert leaders().count(True) == 1


async def test_a_reaper_past_its_lease_by_its_own_clock_says_it_no_longer_leads(
    make_api: MakeApi, redis_url: str, clock: FakeClock
) -> None:
    """A reaper resumed after a pause (here: its clock moved past the lease between two ticks)
    does not report itself the reaper before a tick has renewed the lease."""
    a, b = await replicas(make_api, redis_url, lease_ttl=1.0)

    def leaders() -> list[bool]:
        return [api.app[REPLICA].leading for api in (a, b)]

    async def one_leader() -> bool:
        return leaders().count(True) == 1

    await eventually(one_leader)
    leader = a.app[REPLICA] if leaders()[0] else b.app[REPLICA]
    clock.advance(0.9)
    assert leader.leading  # within its lease
    clock.advance(0.2)
    assert leaders() == [False, False]  # no tick has run since the clock moved
    await eventually(one_leader)  # the next tick renews it: Redis never let it go
    assert leader.leading


async def test_a_reaper_that_lost_its_lease_writes_nothing(redis_url: str) -> None:
    """A reaper paused past its lease (here: it simply did not renew) while another took it:
    its expiry is refused by the fencing check in Redis, and the registry keeps everything."""
    first, second = redis_store(redis_url), redis_store(redis_url)
    record = InstanceRecord("catalog", "i1", "10.0.0.1", 8080)
    await first.put_instance(record)

    fence = await first.acquire_lease("first", 200)
    assert fence is not None
    assert await second.acquire_lease("second", 200) is None  # held
    assert not await second.renew_lease(fence.__class__("second", fence.token), 200)
    await asyncio.sleep(0.3)  # the first "pauses" past its lease
    taken = await second.acquire_lease("second", 5000)
    assert taken is not None
    assert taken.token > fence.token

    assert not await first.expire_fenced(fence, [record.key], {})
    assert not await first.renew_lease(fence, 200)
    assert [r.key for r in (await second.load()).instances] == [record.key]

    registry = Registry(first, FakeClock(), heartbeat_ttl=1, remove_after=2, protect_percent=100)
    await registry.start()
    registry.grace()
    registry._clock.advance(10)  # type: ignore[attr-defined]
    with pytest.raises(LeaseLost):
        await registry.expire(functools.partial(first.expire_fenced, fence))
    assert registry.find("catalog", "i1") == record  # memory unchanged too
    assert [r.key for r in (await second.load()).instances] == [record.key]

    assert await second.expire_fenced(taken, [record.key], {})
    assert (await second.load()).instances == []
    await second.release_lease(taken)
    again = await first.acquire_lease("first", 200)
    assert again is not None
    assert again.token > taken.token  # tokens only grow
    for store in (first, second):
        await store.close()


async def test_a_replica_behind_the_change_stream_reloads(
    make_api: MakeApi, redis_url: str
) -> None:
    a, b = await replicas(make_api, redis_url)
    replica_b = b.app[REPLICA]
    await register(a, id="i1", address="10.0.0.1", port=8080)
    # an instance written and its change trimmed at once: as if b had been away for longer
    # than the stream keeps
    store = redis_store(redis_url)
    document = '{"address":"10.0.0.2","port":8080,"zone":"","weight":100,"metadata":{},'
    document += '"draining":false,"origin":"rest","namespace":""}'
    await store._transaction(
        ("HSET", store._instances, "catalog/i2", document),
        store._changed("i", "catalog/i2"),
        ("XTRIM", store._changes, "MAXLEN", 0),
    )
    await store.close()

    async def b_caught_up() -> bool:
        _, data = await call(b, "GET", CATALOG)
        return data is not None and len(data.get("instances", [])) == 2

    await eventually(b_caught_up)
    assert replica_b.resyncs >= 1


async def test_redis_down_reads_answer_writes_refused_then_recovery(
    make_api: MakeApi, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "redis", persist=True)
    try:
        url = f"{server.url}?prefix=down"
        a, b = await replicas(make_api, url)
        await register(a, id="i1", address="10.0.0.1", port=8080)

        async def b_has_it() -> bool:  # (b follows the change stream: it may be a beat late)
            return (await call(b, "GET", CATALOG))[0] == 200

        await eventually(b_has_it)
        server.stop()
        status, data = await call(b, "GET", CATALOG)
        assert status == 200  # reads from memory
        status, data = await call(a, "PUT", f"{CATALOG}/policy", {"lb": "random"})
        assert status == 503
        assert "redis" in data["error"]

        async def not_ready() -> bool:
            async with a.get("/readyz") as r:
                return r.status == 503

        await eventually(not_ready)
        assert not any(api.app[REPLICA].leading for api in (a, b))
        server.start()  # what it had is back from its append-only file

        async def ready_again() -> bool:
            async with a.get("/readyz") as r:
                return r.status == 200

        await eventually(ready_again, within=10)
        assert (await call(a, "PUT", f"{CATALOG}/policy", {"lb": "random"}))[0] == 200

        async def b_sees_it() -> bool:
            _, data = await call(b, "GET", CATALOG)
            return bool(data["policy"]["lb"] == "random" and len(data["instances"]) == 1)

        await eventually(b_sees_it)
    finally:
        server.stop()


async def test_locks_and_grants_are_one_across_replicas(make_api: MakeApi, redis_url: str) -> None:
    a, b = await replicas(make_api, redis_url)
    take = {"ttl_ms": 5000, "wait_ms": 0}
    status, held = await call(a, "POST", f"{CATALOG}/locks/jobs", take)
    assert status == 200
    assert (await call(b, "POST", f"{CATALOG}/locks/jobs", take))[0] == 409
    release = {"token": held["token"]}
    assert (await call(b, "DELETE", f"{CATALOG}/locks/jobs", release))[0] == 204
    status, again = await call(b, "POST", f"{CATALOG}/locks/jobs", take)
    assert status == 200
    assert again["token"] > held["token"]

    assert (await call(a, "PUT", "/v1/lock-grants/jobs", {"services": ["catalog", "orders"]}))[
        0
    ] == 200

    async def b_shares_it() -> bool:
        status, data = await call(b, "POST", "/v1/services/orders/locks/jobs", take)
        return status == 200 and bool(data["shared"])

    await eventually(b_shares_it)


async def test_a_sidecar_moving_to_a_replica_at_its_version_is_not_sent_it_again(
    make_api: MakeApi, redis_url: str
) -> None:
    a, b = await replicas(make_api, redis_url, debounce_quiet=0.02, debounce_max=0.1)
    first = await connect(a, hello(1, "a"))
    table = await first.next_table()
    while "a" not in table.services:
        table = await first.next_table()
    await first.ws.close()  # its instance turns unhealthy: a new version, on both replicas
    versions: list[int] = []

    async def both_past_it() -> bool:
        versions[:] = [(await call(api, "GET", "/v1/table"))[1]["version"] for api in (a, b)]
        return versions[0] == versions[1] > table.version

    await eventually(both_past_it)
    current, epoch = versions[0], first.welcome.epoch
    moved = await connect(b, hello(1, "a", version=current, epoch=epoch))
    assert (moved.welcome.version, moved.welcome.epoch) == (current, epoch)
    # its instance comes back (a newer table); the one it has is never sent again
    assert (await moved.next_table()).version > current
    # a sidecar ahead of this replica (from a replica that has seen more) is sent only what
    # is newer than what it has, never this replica's older table
    ahead = await connect(b, hello(2, "b", version=current + 50, epoch=epoch))
    await ahead.no_table(within=0.5)


async def test_every_replica_knows_an_instances_last_heartbeat(
    make_api: MakeApi, redis_url: str, clock: FakeClock
) -> None:
    a, b = await replicas(make_api, redis_url)
    await register(a, id="i1", address="10.0.0.1", port=8080)
    clock.advance(1.0)
    assert (await call(a, "PUT", f"{CATALOG}/instances/i1/heartbeat"))[0] == 200
    _, on_a = await call(a, "GET", f"{CATALOG}/instances/i1")
    assert on_a["last_heartbeat"] is not None

    async def b_knows_it() -> bool:
        # (404 until b has followed the registration from Redis: on a loaded machine it may
        # not have yet)
        status, on_b = await call(b, "GET", f"{CATALOG}/instances/i1")
        return status == 200 and bool(on_b["last_heartbeat"] == on_a["last_heartbeat"])

    await eventually(b_knows_it)


async def test_a_replica_that_never_saw_a_version_catches_up_to_the_newest(
    make_api: MakeApi, redis_url: str
) -> None:
    """``slow`` debounces past a change and its undoing (A -> B -> A): it never sees B, so
    its content ends where it began, yet the others numbered B and then A anew. It must push
    A under the newest version too, not stay on the old one."""
    quick = await make_api(store=open_store(redis_url), debounce_quiet=0.02, debounce_max=0.1)
    slow = await make_api(store=open_store(redis_url), debounce_quiet=1.0, debounce_max=2.0)
    await register(quick, id="i1", address="10.0.0.1", port=8080)

    async def same() -> bool:
        tables = [(await call(api, "GET", "/v1/table"))[1] for api in (quick, slow)]
        return bool(tables[0] == tables[1] and tables[0]["services"].get("catalog"))

    await eventually(same)
    assert (await call(quick, "PUT", f"{CATALOG}/policy", {"retries": 3}))[0] == 200
    await asyncio.sleep(0.3)  # quick publishes it; slow is still waiting for quiet
    assert (await call(quick, "DELETE", f"{CATALOG}/policy"))[0] == 204
    await eventually(same, within=8)
