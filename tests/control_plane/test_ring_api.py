"""``GET /v1/services/{svc}/ring?key=K``, and a sidecar agreeing with it on every key."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from control_plane.wire import Table, decode
from sidecar.proxy.routing import Pools, Route, TableHolder
from tests.conftest import Api
from tests.control_plane.test_api import CATALOG, call, register


async def table_when(api: Api, ready: Callable[[Table], bool]) -> Table:
    """The pushed table once ``ready`` holds for it (the publisher debounces)."""
    for _ in range(250):
        async with api.get("/v1/table") as r:
            message = decode(await r.text())
        assert isinstance(message, Table)
        if ready(message):
            return message
        await asyncio.sleep(0.02)
    raise AssertionError("the table never got there")


async def hashed_catalog(api: Api, lb: str, instances: int = 5) -> None:
    for i in range(instances):
        await register(api, id=f"c{i}", port=8000 + i, weight=100 + 50 * (i % 2))
    status, _ = await call(api, "PUT", f"{CATALOG}/policy", {"lb": lb, "hash_on": "header:x-user"})
    assert status == 200


@pytest.mark.parametrize("lb", ["ring_hash", "maglev"])
async def test_the_control_plane_and_a_sidecar_agree_on_every_key(api: Api, lb: str) -> None:
    await hashed_catalog(api, lb)
    await call(api, "PATCH", f"{CATALOG}/instances/c3", {"status": "draining"})
    pushed = await table_when(
        api, lambda t: "catalog" in t.services and t.services["catalog"].endpoints[3].draining
    )
    holder = TableHolder(Pools())
    holder.install(pushed, "test")
    route = holder.route(b"catalog")
    assert isinstance(route, Route)
    for user in range(300):
        key = f"user-{user}"
        status, body = await call(api, "GET", f"{CATALOG}/ring?key={key}")
        assert status == 200
        assert body["algorithm"] == lb
        assert body["key"] == key
        assert body["version"] >= pushed.version
        assert body["instance"] != "c3"  # draining owns nothing
        member = route.balancer.pick(key.encode())
        assert member is not None
        assert member.endpoint.instance == body["instance"], key


async def test_keys_are_taken_as_given(api: Api) -> None:
    await hashed_catalog(api, "maglev")
    await table_when(
        api, lambda t: "catalog" in t.services and t.services["catalog"].ring is not None
    )
    status, body = await call(api, "GET", f"{CATALOG}/ring?key=a%20b%26c")
    assert status == 200
    assert body["key"] == "a b&c"
    status, empty = await call(api, "GET", f"{CATALOG}/ring?key=")
    assert status == 200
    assert empty["key"] == ""


async def test_ring_refusals(api: Api) -> None:
    async def refused(path: str) -> tuple[int, Any]:
        status, body = await call(api, "GET", path)
        return status, body["field"]

    assert await refused("/v1/services/nope/ring?key=k") == (404, "service")
    await register(api, id="c0")
    assert await refused(f"{CATALOG}/ring?key=k") == (409, "service")  # not pushed yet
    await table_when(api, lambda t: "catalog" in t.services)
    assert await refused(f"{CATALOG}/ring?key=k") == (400, "service")  # peak_ewma: no ring
    await call(api, "PUT", f"{CATALOG}/policy", {"lb": "ring_hash", "hash_on": "path"})
    assert await refused(f"{CATALOG}/ring") == (400, "key")
    await call(api, "PATCH", f"{CATALOG}/instances/c0", {"status": "draining"})
    await table_when(api, lambda t: t.services["catalog"].endpoints[0].draining)
    assert await refused(f"{CATALOG}/ring?key=k") == (409, "service")
