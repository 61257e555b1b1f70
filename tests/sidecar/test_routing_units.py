"""Service names from authorities, tables, pools: no sockets needed for most of it."""

from __future__ import annotations

import asyncio

import pytest

from control_plane.wire import Endpoint, parse_table
from sidecar.errors import Reason
from sidecar.routing import Pools, Route, TableHolder, service_of
from sidecar.upstream import Pool


@pytest.mark.parametrize(
    ("authority", "service"),
    [
        (b"payments", "payments"),
        (b"Payments:80", "payments"),
        (b"payments.mesh", "payments"),
        (b"payments.mesh.", "payments"),
        (b"payments.mesh:8080", "payments"),
        (b"[::1]:80", "[::1]:80"),
    ],
)
def test_service_of(authority: bytes, service: str) -> None:
    assert service_of(authority) == service


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
