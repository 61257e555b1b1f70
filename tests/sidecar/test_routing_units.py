"""Service names from authorities, tables, pools: no sockets needed for most of it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from control_plane import ring
from control_plane.wire import Endpoint, following, parse_table, to_json
from sidecar.errors import Reason, TableError
from sidecar.proxy.pool import Pool
from sidecar.proxy.routing import Pools, Route, TableHolder, service_of


@pytest.mark.parametrize(
    ("authority", "service"),
    [
        (b"payments", "payments"),
        (b"Payments:80", "payments"),
        (b"payments.mesh", "payments"),
        (b"payments.mesh.", "payments"),
        (b"payments.mesh:8080", "payments"),
        (b"[::1]:80", "[::1]:80"),
        # Kubernetes: the namespace stays, for the table to decide (``test_kubernetes_names``)
        (b"payments.shop.svc.cluster.local", "payments.shop"),
        (b"payments.shop.svc.cluster.local.:8080", "payments.shop"),
        (b"payments.shop.svc", "payments.shop"),
        (b"payments.shop", "payments.shop"),
        (b"payments.svc.cluster.local", "payments"),
        (b"api.example.com", "api.example.com"),
    ],
)
def test_service_of(authority: bytes, service: str) -> None:
    assert service_of(authority) == service


def test_kubernetes_names_name_the_service() -> None:
    holder = TableHolder(Pools(), cluster_domain="k8s.internal")
    table = parse_table(
        {"services": {"catalog": {"endpoints": [{"address": "10.0.0.1", "port": 1}]}}}
    )
    holder.install(table, "file:x")
    catalog = holder.route(b"catalog")
    assert isinstance(catalog, Route)
    for name in (
        b"catalog.shop",
        b"catalog.shop.svc",
        b"catalog.shop.svc.k8s.internal",
        b"Catalog.Shop.svc.k8s.internal.:8080",
        b"catalog.mesh",
    ):
        assert holder.route(name) is catalog, name
    # what is not a Kubernetes name of it stays outside the mesh (egress decides)
    for name in (b"catalog.shop.svc.cluster.local", b"catalog.example.com", b"shop.catalog"):
        assert isinstance(holder.route(name), tuple), name


async def test_tables_swap_and_pools_outlive_them() -> None:
    pools = Pools()
    holder = TableHolder(pools)
    assert holder.route(b"a") == (Reason.NO_ROUTE, "no routing table loaded yet")
    table = parse_table({"services": {"a": {"endpoints": [{"address": "10.0.0.1", "port": 1}]}}})
    holder.install(table, "file:x")
    route = holder.route(b"a:80")
    assert isinstance(route, Route)
    pool = route.pool_for(table.services["a"].endpoints[0])
    assert holder.route(b"b")[1] == "no service 'b' in the routing table"  # type: ignore[index]
    holder.install(table, "file:x")
    route2 = holder.route(b"a")
    assert isinstance(route2, Route)
    assert route2.pool_for(table.services["a"].endpoints[0]) is pool  # same endpoint, same pool
    holder.install(parse_table({"services": {}}), "file:x")
    assert pool._closed  # an endpoint no table routes to: its pool closes


def test_an_endpoints_pool_is_made_at_its_first_connection_its_stats_with_the_table() -> None:
    pools = Pools()
    holder = TableHolder(pools)
    table = parse_table({"services": {"a": {"endpoints": [{"address": "10.0.0.1", "port": 1}]}}})
    holder.install(table, "file:x")
    endpoint = table.services["a"].endpoints[0]
    assert pools.find(endpoint) is None  # routed to, never connected to: no pool yet
    stats = pools.find_stats(endpoint)
    route = holder.route(b"a")
    assert isinstance(route, Route)
    assert stats is not None
    assert route.balancer.members[0].stats is stats
    assert route.pool_for(endpoint).stats is stats  # the pool, once made, shares them
    assert pools.find(endpoint) is not None
    holder.install(parse_table({"services": {}}), "file:x")
    assert (pools.find(endpoint), pools.find_stats(endpoint)) == (None, None)


def test_a_new_table_keeps_the_routes_of_the_services_it_did_not_change() -> None:
    """Balancer state and all, while the locality the balancers were made for holds."""
    holder = TableHolder(Pools(), service="own", zone="z1")
    services: dict[str, Any] = {
        "a": {"endpoints": [{"address": "10.0.0.1", "port": 1}]},
        "b": {"endpoints": [{"address": "10.0.0.2", "port": 1}]},
        "own": {"endpoints": [{"address": "10.0.0.9", "port": 1, "zone": "z1"}]},
    }

    def install() -> tuple[object, object]:
        with following(holder.in_force()):
            holder.install(parse_table({"services": services}), "control-plane")
        return holder.route(b"a"), holder.route(b"b")

    a, b = install()
    services["b"]["endpoints"].append({"address": "10.0.0.3", "port": 1})
    a2, b2 = install()
    assert a2 is a
    assert b2 is not b
    assert isinstance(b2, Route)
    assert len(b2.balancer.members) == 2
    services["own"]["endpoints"][0]["zone"] = "z2"  # the callers' share of zone z1 changed
    a3, _ = install()
    assert a3 is not a
    holder.install(parse_table({"services": services}), "file:x")  # not following: all anew
    assert holder.route(b"a") is not a3


def test_routes_of_equal_policies_share_their_try_policy() -> None:
    holder = TableHolder(Pools())
    endpoints = [{"address": "10.0.0.1", "port": 1}]
    services = {
        "a": {"endpoints": endpoints},
        "b": {"endpoints": endpoints},
        "c": {"endpoints": endpoints, "policy": {"retries": 2}},
    }
    holder.install(parse_table({"services": services}), "file:x")
    a, b, c = (holder.route(name) for name in (b"a", b"b", b"c"))
    assert isinstance(a, Route)
    assert isinstance(b, Route)
    assert isinstance(c, Route)
    assert a.tries is b.tries
    assert (c.tries.retries, a.tries.retries) == (2, 1)


def test_the_dump_shows_the_table_as_its_json() -> None:
    holder = TableHolder(Pools())
    maglev = ring.encode(ring.build_maglev(["x", "y"], [1, 1]))
    e = {"address": "10.0.0.1", "port": 1, "zone": "a", "namespace": "shop", "instance": "x"}
    f = {"address": "10.0.0.2", "port": 2, "weight": 7, "draining": True, "tls": True}
    table = parse_table(
        {
            "services": {
                "plain": {"endpoints": [e, f]},
                "same": {"endpoints": [f]},
                "hashed": {
                    "policy": {"lb": "maglev", "hash_on": "path"},
                    "endpoints": [e, {**f, "draining": False}],
                    "ring": maglev,
                },
                "none": {},
            },
            "version": 4,
        }
    )
    holder.install(table, "control-plane")
    assert holder.current is not None
    dump = holder.current.dump()
    assert dump["services"] == to_json(table)["services"]
    assert json.loads(json.dumps(dump["services"])) == to_json(table)["services"]


async def test_pool_idle_cap_and_idle_timeout() -> None:
    got: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(1)
        await reader.read()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = Pool(Endpoint("127.0.0.1", port), max_idle=2, idle_timeout=0.2)
    conns = [await pool.connect() for _ in range(3)]
    for conn in conns:
        pool.release(conn)
    assert pool.statistics().idle == 2  # the third was over the cap and closed
    assert pool.take_idle() is conns[1]  # the most recently released first
    pool.release(conns[1])
    await asyncio.sleep(0.5)
    stats = pool.statistics()
    assert (stats.idle, stats.connects, stats.reuses) == (0, 3, 1)
    assert "0 idle" in repr(pool)
    server.close()
    await server.wait_closed()


async def test_a_pooled_connection_the_upstream_closes_leaves_the_pool() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()  # the upstream hangs up on an idle connection

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    pool = Pool(Endpoint("127.0.0.1", server.sockets[0].getsockname()[1]))
    pool.release(await pool.connect())
    await asyncio.sleep(0.2)
    assert pool.take_idle() is None
    assert pool.statistics().idle == 0
    server.close()
    await server.wait_closed()


def hashed_table(ring_json: object = None) -> dict[str, object]:
    service: dict[str, object] = {
        "policy": {"lb": "ring_hash", "hash_on": "header:x-user"},
        "endpoints": [
            {"address": "10.0.0.1", "port": 1, "instance": "a"},
            {"address": "10.0.0.2", "port": 1, "instance": "b", "draining": True},
            {"address": "10.0.0.3", "port": 1},  # no id: its address:port names it
        ],
    }
    if ring_json is not None:
        service["ring"] = ring_json
    return {"services": {"u": service}}


def test_a_static_table_builds_the_ring_the_control_plane_would() -> None:
    holder = TableHolder(Pools())
    holder.install(parse_table(hashed_table()), "file:x")
    route = holder.route(b"u")
    assert isinstance(route, Route)
    built = ring.build("ring_hash", ["a", "10.0.0.3:1"], [100, 100])
    for user in range(200):
        key = f"user-{user}".encode()
        member = route.balancer.pick(key)
        assert member is not None
        assert member.endpoint.address == ("10.0.0.1", "10.0.0.3")[built.lookup(ring.key_hash(key))]


def test_a_ring_that_does_not_fit_is_refused_and_the_old_table_stays() -> None:
    holder = TableHolder(Pools())
    holder.install(parse_table({"services": {}}), "file:old")
    wrong = ring.encode(ring.build("ring_hash", ["a", "b", "c", "d"], [1, 1, 1, 1]))
    with pytest.raises(TableError, match=r"services\.u\.ring: ring names endpoint 3 of 3"):
        holder.install(parse_table(hashed_table(wrong)), "file:new")
    assert holder.current is not None
    assert holder.current.info.source == "file:old"


def test_a_namespace_the_instances_say_narrows_service_dot_namespace() -> None:
    holder = TableHolder(Pools())
    endpoints = [
        {"address": "10.0.0.1", "port": 1, "namespace": "shop"},
        {"address": "10.0.0.2", "port": 1, "namespace": "staging"},
    ]
    table = parse_table({"services": {"catalog": {"endpoints": endpoints}}})
    holder.install(table, "file:x")
    catalog = holder.route(b"catalog")
    assert isinstance(catalog, Route)
    for name in (b"catalog.shop", b"catalog.staging.svc.cluster.local"):
        assert holder.route(name) is catalog, name
    # a namespace none of them is in: not this service (egress decides)
    assert holder.route(b"catalog.example") == (
        Reason.NO_ROUTE,
        "no service 'catalog.example' in the routing table",
    )
