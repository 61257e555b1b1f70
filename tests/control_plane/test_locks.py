"""The lock API (issue 14), in-process: leases with fencing tokens, who may call, bad bodies,
the 409s, waiting, shared names granted by the admin, and the metrics."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from control_plane.api import LOCKS
from control_plane.clock import FakeClock
from control_plane.store_memory import MemoryStore
from tests.conftest import ADMIN, Api, MakeApi
from tests.control_plane.test_access import bearer, call, mint
from tests.control_plane.test_metrics import scrape

ORDERS = "/v1/services/orders/locks/orders-job"


@pytest.fixture
async def cp(make_api: MakeApi, clock: FakeClock) -> Api:
    """Leases on the fake clock (a memory store reading it); the client sends no token."""
    return await make_api(store=MemoryStore(clock), token="")


async def test_acquire_renew_release_with_the_services_own_token(cp: Api) -> None:
    _, orders = await mint(cp, "orders")
    status, lock = await call(cp, "POST", ORDERS, orders, {"ttl_ms": 5000})
    assert (status, lock) == (
        200,
        {"name": "orders-job", "token": lock["token"], "expires_in_ms": 5000, "shared": False},
    )
    status, held = await call(cp, "POST", ORDERS, orders, {"ttl_ms": 5000})
    assert status == 409
    assert held == {"error": "lock orders-job is held (waited 0 ms)", "field": "name"}
    renewal = {"token": lock["token"], "ttl_ms": 9000}
    status, renewed = await call(cp, "PUT", ORDERS + "/renew", orders, renewal)
    assert (status, renewed) == (200, {"token": lock["token"], "expires_in_ms": 9000})
    assert (await call(cp, "DELETE", ORDERS, orders, {"token": lock["token"]}))[0] == 204
    status, again = await call(cp, "POST", ORDERS, orders, {"ttl_ms": 5000})
    assert status == 200
    assert again["token"] > lock["token"]


async def test_a_stale_token_renews_and_releases_nothing(cp: Api, clock: FakeClock) -> None:
    status, first = await call(cp, "POST", ORDERS, ADMIN, {"ttl_ms": 1000})
    assert status == 200
    clock.advance(1.0)  # its lease ends unrenewed
    status, second = await call(cp, "POST", ORDERS, ADMIN, {"ttl_ms": 1000})
    assert status == 200
    assert second["token"] > first["token"]
    stale = first["token"]
    status, body = await call(cp, "PUT", ORDERS + "/renew", ADMIN, {"token": stale, "ttl_ms": 500})
    assert (status, body["field"]) == (409, "token")
    assert "not held by token" in body["error"]
    status, body = await call(cp, "DELETE", ORDERS, ADMIN, {"token": stale})
    assert (status, body["field"]) == (409, "token")
    status, _ = await call(
        cp, "PUT", ORDERS + "/renew", ADMIN, {"token": second["token"], "ttl_ms": 500}
    )
    assert status == 200  # the holder is untouched


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("POST", ORDERS, {"ttl_ms": 99}, "ttl_ms"),
        ("POST", ORDERS, {"ttl_ms": 600_001}, "ttl_ms"),
        ("POST", ORDERS, {"ttl_ms": "1000"}, "ttl_ms"),
        ("POST", ORDERS, {"ttl_ms": 1000, "wait_ms": 60_001}, "wait_ms"),
        ("POST", ORDERS, {"ttl_ms": 1000, "wait_ms": -1}, "wait_ms"),
        ("POST", ORDERS, {"wait_ms": 10}, "ttl_ms"),
        ("POST", ORDERS, {"ttl_ms": 1000, "owner": "me"}, "owner"),
        ("POST", ORDERS, [], "(document)"),
        ("POST", "/v1/services/orders/locks/-x", {"ttl_ms": 1000}, "name"),
        ("POST", "/v1/services/orders/locks/" + "x" * 129, {"ttl_ms": 1000}, "name"),
        ("POST", "/v1/services/Orders/locks/x", {"ttl_ms": 1000}, "service"),
        ("PUT", ORDERS + "/renew", {"ttl_ms": 1000}, "token"),
        ("PUT", ORDERS + "/renew", {"token": 0, "ttl_ms": 1000}, "token"),
        ("PUT", ORDERS + "/renew", {"token": 2**63, "ttl_ms": 1000}, "token"),
        ("PUT", ORDERS + "/renew", {"token": True, "ttl_ms": 1000}, "token"),
        ("PUT", ORDERS + "/renew", {"token": 1}, "ttl_ms"),
        ("DELETE", ORDERS, {}, "token"),
        ("DELETE", ORDERS, {"token": 1.5}, "token"),
        ("PUT", "/v1/lock-grants/x", {"services": "orders"}, "services"),
        ("PUT", "/v1/lock-grants/x", {"services": []}, "services"),
        ("PUT", "/v1/lock-grants/x", {"services": ["orders", "Bad"]}, "services[1]"),
        ("PUT", "/v1/lock-grants/x", {"services": ["s"] * 101}, "services"),
        ("PUT", "/v1/lock-grants/x%20y", {"services": ["orders"]}, "name"),
    ],
)
async def test_bad_input_is_a_400_naming_the_field(
    cp: Api, method: str, path: str, body: Any, field: str
) -> None:
    status, data = await call(cp, method, path, ADMIN, body)
    assert (status, data["field"]) == (400, field), data


async def test_a_body_must_be_json(cp: Api) -> None:
    headers = {**bearer(ADMIN), "Content-Type": "text/plain"}
    async with cp.post(ORDERS, data=b'{"ttl_ms": 1000}', headers=headers) as r:
        assert r.status == 415
    async with cp.post(ORDERS, headers=bearer(ADMIN)) as r:
        assert (r.status, (await r.json())["field"]) == (400, "(body)")


async def test_another_services_token_may_not_touch_the_lock(cp: Api) -> None:
    _, orders = await mint(cp, "orders")
    _, payments = await mint(cp, "payments")
    status, lock = await call(cp, "POST", ORDERS, orders, {"ttl_ms": 5000})
    assert status == 200
    for method, path, body in (
        ("POST", ORDERS, {"ttl_ms": 5000}),
        ("PUT", ORDERS + "/renew", {"token": lock["token"], "ttl_ms": 5000}),
        ("DELETE", ORDERS, {"token": lock["token"]}),
    ):
        status, data = await call(cp, method, path, payments, body)
        assert status == 403, (method, data)
        assert "acts only for payments" in data["error"]
    assert (await call(cp, "POST", ORDERS, "", {"ttl_ms": 5000}))[0] == 401
    # payments' own lock of the same name is another lock
    status, theirs = await call(
        cp, "POST", "/v1/services/payments/locks/orders-job", payments, {"ttl_ms": 5000}
    )
    assert status == 200
    assert theirs["token"] > lock["token"]


async def test_a_waiter_gets_the_lock_as_soon_as_it_is_released(cp: Api) -> None:
    assert cp.app is not None
    cp.app[LOCKS].backoff = (10.0, 10.0)  # its first retry comes after 5 to 10 s
    status, lock = await call(cp, "POST", ORDERS, ADMIN, {"ttl_ms": 60_000})
    assert status == 200
    waiter = asyncio.create_task(
        call(cp, "POST", ORDERS, ADMIN, {"ttl_ms": 1000, "wait_ms": 30_000})
    )
    await asyncio.sleep(0.2)
    assert not waiter.done()
    released = time.monotonic()
    assert (await call(cp, "DELETE", ORDERS, ADMIN, {"token": lock["token"]}))[0] == 204
    status, taken = await waiter
    assert status == 200
    assert taken["token"] > lock["token"]
    assert time.monotonic() - released < 1.0  # woken by the release, not by its next try


async def test_a_waiter_is_refused_after_wait_ms(cp: Api) -> None:
    assert (await call(cp, "POST", ORDERS, ADMIN, {"ttl_ms": 60_000}))[0] == 200
    started = time.monotonic()
    status, body = await call(cp, "POST", ORDERS, ADMIN, {"ttl_ms": 1000, "wait_ms": 300})
    waited = time.monotonic() - started
    assert (status, body["error"]) == (409, "lock orders-job is held (waited 300 ms)")
    assert 0.3 <= waited < 3.0


async def test_waiters_are_bounded(cp: Api) -> None:
    assert cp.app is not None
    cp.app[LOCKS]._max_waiters = 2
    assert (await call(cp, "POST", ORDERS, ADMIN, {"ttl_ms": 60_000}))[0] == 200
    body = {"ttl_ms": 1000, "wait_ms": 2000}
    waiting = [asyncio.create_task(call(cp, "POST", ORDERS, ADMIN, body)) for _ in range(2)]
    await asyncio.sleep(0.1)
    status, data = await call(cp, "POST", ORDERS, ADMIN, body)
    assert status == 429
    assert "are waiting already" in data["error"]
    assert [s for s, _ in await asyncio.gather(*waiting)] == [409, 409]


async def test_grants_are_the_admins_and_share_one_lock(cp: Api) -> None:
    _, orders = await mint(cp, "orders")
    _, billing = await mint(cp, "billing")
    grant = {"services": ["orders", "billing"]}
    assert (await call(cp, "PUT", "/v1/lock-grants/ledger", orders, grant))[0] == 403
    assert (await call(cp, "GET", "/v1/lock-grants", orders))[0] == 403
    assert (await call(cp, "DELETE", "/v1/lock-grants/ledger", orders))[0] == 403
    status, body = await call(cp, "PUT", "/v1/lock-grants/ledger", ADMIN, grant)
    assert (status, body) == (200, {"name": "ledger", "services": ["billing", "orders"]})
    status, lock = await call(
        cp, "POST", "/v1/services/orders/locks/ledger", orders, {"ttl_ms": 5000}
    )
    assert (status, lock["shared"]) == (200, True)
    billing_path = "/v1/services/billing/locks/ledger"
    assert (await call(cp, "POST", billing_path, billing, {"ttl_ms": 5000}))[0] == 409
    # the holder's token works through either member's path: it is one lock
    renewal = {"token": lock["token"], "ttl_ms": 5000}
    assert (await call(cp, "PUT", billing_path + "/renew", billing, renewal))[0] == 200
    # a service the grant does not list keeps its own lock of the name
    _, audit = await mint(cp, "audit")
    status, own = await call(cp, "POST", "/v1/services/audit/locks/ledger", audit, {"ttl_ms": 5000})
    assert (status, own["shared"]) == (200, False)
    status, listed = await call(cp, "GET", "/v1/lock-grants", ADMIN)
    assert listed == {"grants": [{"name": "ledger", "services": ["billing", "orders"]}]}
    assert (await call(cp, "DELETE", "/v1/lock-grants/ledger", ADMIN))[0] == 204
    status, mine = await call(cp, "POST", billing_path, billing, {"ttl_ms": 5000})
    assert (status, mine["shared"]) == (200, False)
    assert (await call(cp, "DELETE", "/v1/lock-grants/ledger", ADMIN))[0] == 404


async def test_grants_outlive_a_restart(make_api: MakeApi) -> None:
    api = await make_api(token="")
    grant = {"services": ["orders", "billing"]}
    assert (await call(api, "PUT", "/v1/lock-grants/ledger", ADMIN, grant))[0] == 200
    status, first = await call(
        api, "POST", "/v1/services/orders/locks/ledger", ADMIN, {"ttl_ms": 100}
    )
    assert status == 200
    await api.close()
    again = await make_api(token="")  # the same SQLite file
    status, listed = await call(again, "GET", "/v1/lock-grants", ADMIN)
    assert listed["grants"] == [{"name": "ledger", "services": ["billing", "orders"]}]
    await asyncio.sleep(0.15)
    status, second = await call(
        again, "POST", "/v1/services/billing/locks/ledger", ADMIN, {"ttl_ms": 100}
    )
    assert (status, second["shared"]) == (200, True)
    assert second["token"] > first["token"]


async def test_metrics_count_what_locks_do(cp: Api) -> None:
    _, lock = await call(cp, "POST", ORDERS, ADMIN, {"ttl_ms": 5000})
    await call(cp, "POST", ORDERS, ADMIN, {"ttl_ms": 5000})
    await call(cp, "PUT", ORDERS + "/renew", ADMIN, {"token": lock["token"], "ttl_ms": 5000})
    await call(cp, "DELETE", ORDERS, ADMIN, {"token": lock["token"]})
    samples = await scrape(cp)
    assert samples["meshlet_lock_acquisitions_total"] == 1
    assert samples["meshlet_lock_refusals_total"] == 1
    assert samples["meshlet_lock_renewals_total"] == 1
    assert samples["meshlet_lock_releases_total"] == 1
    assert samples["meshlet_lock_waiting"] == 0
