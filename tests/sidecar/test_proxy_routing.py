"""Routing by name, balancing, pooling, the inbound listener, and the admin port."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable

import aiohttp

from tests.sidecar.conftest import (
    LOCAL,
    Mesh,
    RawUpstream,
    Upstream,
    get,
    read_head,
    request,
    service,
)

MakeMesh = Callable[..., Awaitable[Mesh]]
Upstreams = Callable[[str], Awaitable[Upstream]]


async def test_both_ways_of_naming_a_service(upstreams: Upstreams, make_mesh: MakeMesh) -> None:
    up = await upstreams("payments-1")
    mesh = await make_mesh({"payments": service(up.port)})
    raws = [
        b"GET /echo/a?x=1 HTTP/1.1\r\nHost: payments\r\n\r\n",
        b"GET /echo/a?x=1 HTTP/1.1\r\nHost: payments:80\r\n\r\n",
        b"GET /echo/a?x=1 HTTP/1.1\r\nHost: Payments.mesh\r\n\r\n",
        b"GET http://payments/echo/a?x=1 HTTP/1.1\r\nHost: ignored\r\n\r\n",
        b"GET http://payments.mesh:8080/echo/a?x=1 HTTP/1.1\r\n\r\n",
    ]
    for raw in raws:
        (resp,) = await request(mesh.outbound, raw)
        assert resp.status == 200, (raw, resp)
        seen = json.loads(resp.body)
        assert seen["server"] == "payments-1"
        assert seen["path"] == "/echo/a?x=1"
    # absolute-form: the upstream sees origin-form and the URL's authority as Host
    (resp,) = await request(mesh.outbound, raws[3])
    assert dict(json.loads(resp.body)["headers"])["Host"] == "payments"


async def test_unknown_service_and_no_endpoints(make_mesh: MakeMesh) -> None:
    mesh = await make_mesh({"empty": {"endpoints": []}})
    (resp,) = await request(mesh.outbound, get("/", "nope"))
    assert (resp.status, resp.header("x-meshlet-error")) == (404, "no-route")
    assert b"nope" in resp.body
    (resp,) = await request(mesh.outbound, get("/", "empty"))
    assert (resp.status, resp.header("x-meshlet-error")) == (503, "no-healthy-upstream")


async def test_errors_keep_the_connection_alive_when_they_can(make_mesh: MakeMesh) -> None:
    mesh = await make_mesh({})
    responses = await request(mesh.outbound, get("/", "a") + get("/", "b"), count=2)
    assert [r.status for r in responses] == [404, 404]
    assert responses[0].header("connection") == "keep-alive"


async def test_round_robin_honours_weights(upstreams: Upstreams, make_mesh: MakeMesh) -> None:
    a, b = await upstreams("a"), await upstreams("b")
    table = {
        "svc": {
            "policy": {"lb": "round_robin"},
            "endpoints": [
                {"address": LOCAL, "port": a.port, "weight": 300},
                {"address": LOCAL, "port": b.port, "weight": 100},
            ],
        }
    }
    mesh = await make_mesh(table)
    raw = get("/echo") * 40
    responses = await request(mesh.outbound, raw, count=40)
    counts = Counter(json.loads(r.body)["server"] for r in responses)
    assert counts == {"a": 30, "b": 10}


async def test_retry_after_keeps_an_endpoint_out(upstreams: Upstreams, make_mesh: MakeMesh) -> None:
    busy, ok = await upstreams("busy"), await upstreams("ok")
    for lb in ("round_robin", "peak_ewma"):
        mesh = await make_mesh({"svc": service(busy.port, ok.port, lb=lb)})
        responses = await request(mesh.outbound, get("/busy") * 20, count=20)
        statuses = Counter(r.status for r in responses)
        assert statuses[503] <= 1, (lb, statuses)  # once told, the sidecar stays away 30 s
        assert statuses[200] >= 19


async def test_hash_policies_keep_a_key_on_one_endpoint(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    ups = [await upstreams(f"u{i}") for i in range(4)]
    mesh = await make_mesh(
        {"svc": service(*(u.port for u in ups), lb="maglev", hash_on="cookie:session")}
    )
    seen: dict[str, set[str]] = {}
    for user in range(12):
        extra = f"Cookie: theme=x; session=s{user}\r\n"
        for r in await request(mesh.outbound, get("/echo", extra=extra) * 3, count=3):
            seen.setdefault(f"s{user}", set()).add(json.loads(r.body)["server"])
    assert all(len(servers) == 1 for servers in seen.values()), seen
    assert len(set().union(*seen.values())) > 1  # and the keys spread


async def test_keep_alive_connections_are_reused(
    raw_upstream: Callable[..., Awaitable[RawUpstream]], make_mesh: MakeMesh
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    up = await raw_upstream(handler)
    mesh = await make_mesh({"svc": service(up.port)})
    for _ in range(5):
        (resp,) = await request(mesh.outbound, get("/"))
        assert resp.body == b"ok"
    assert up.connections == 1
    stats = mesh.sidecar.pools.get(mesh.sidecar.tables.current.table.services["svc"].endpoints[0])  # type: ignore[union-attr]
    assert stats.statistics().reuses == 4


async def test_connection_close_responses_are_not_reused(
    raw_upstream: Callable[..., Awaitable[RawUpstream]], make_mesh: MakeMesh
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    up = await raw_upstream(handler)
    mesh = await make_mesh({"svc": service(up.port)})
    for _ in range(3):
        (resp,) = await request(mesh.outbound, get("/"))
        assert resp.body == b"ok"
        assert resp.header("connection") != "close"  # hop-by-hop: the client's own stays up
    assert up.connections == 3


async def test_stale_pooled_connection_is_retried_once_for_idempotent_requests(
    raw_upstream: Callable[..., Awaitable[RawUpstream]], make_mesh: MakeMesh
) -> None:
    """The upstream drops its end of a kept-alive connection just as the next request comes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
        await writer.drain()
        await read_head(reader)  # the second request on this connection: no answer, close
        writer.transport.abort()

    up = await raw_upstream(handler)
    mesh = await make_mesh({"svc": service(up.port)})
    (first,) = await request(mesh.outbound, get("/"))
    (second,) = await request(mesh.outbound, get("/"))
    assert (first.status, second.status) == (200, 200)
    assert second.body == b"first"  # answered on a fresh connection
    assert up.connections == 2
    (post,) = await request(
        mesh.outbound, b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 1\r\n\r\nx"
    )
    assert (post.status, post.header("x-meshlet-error")) == (502, "upstream-reset")


async def test_inbound_forwards_to_the_app(upstreams: Upstreams, make_mesh: MakeMesh) -> None:
    app = await upstreams("the-app")
    mesh = await make_mesh({}, app_port=app.port)
    (resp,) = await request(mesh.inbound, get("/echo", host="anything"))
    assert resp.status == 200
    assert json.loads(resp.body)["server"] == "the-app"


async def test_inbound_reads_the_lines_an_outbound_sidecar_adds(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    app = await upstreams("the-app")
    mesh = await make_mesh({}, app_port=app.port)
    mesh_lines = (
        "x-forwarded-for: 10.1.1.1\r\nx-forwarded-proto: http\r\nx-request-id: abc\r\n"
        "x-meshlet-attempt: 2\r\nx-meshlet-deadline-ms: 5000\r\n"
    )
    # read whole off the first head of a read; the next head, in the same read, has none
    responses = await request(
        mesh.inbound, get("/echo", "app", mesh_lines) + get("/echo", "app"), count=2
    )
    first, second = (dict(json.loads(r.body)["headers"]) for r in responses)
    assert first["x-forwarded-for"] == f"10.1.1.1, {LOCAL}"
    assert (first["x-request-id"], first["x-meshlet-attempt"]) == ("abc", "2")
    assert 0 < int(first["x-meshlet-deadline-ms"]) <= 5000
    assert second["x-forwarded-for"] == LOCAL
    assert second["x-request-id"] != "abc"
    assert "x-meshlet-attempt" not in second
    assert int(second["x-meshlet-deadline-ms"]) > 5000  # (its own route timeout)


async def test_admin_port(upstreams: Upstreams, make_mesh: MakeMesh) -> None:
    up = await upstreams("u")
    mesh = await make_mesh({"svc": service(up.port, lb="round_robin")})
    base = f"http://{LOCAL}:{mesh.admin}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/healthz") as r:
            assert r.status == 200
        async with http.get(f"{base}/readyz") as r:
            assert (r.status, (await r.json())["status"]) == (200, "ready")
        async with http.get(f"{base}/config_dump") as r:
            dump = await r.json()
        assert dump["service"] == "tester"
        assert dump["table"]["source"].startswith("file:")
        assert dump["table"]["services"]["svc"]["endpoints"][0]["port"] == up.port
        assert dump["table"]["services"]["svc"]["policy"]["lb"] == "round_robin"
        async with http.post(f"{base}/drain", json={}) as r:
            assert r.status == 202
        async with http.get(f"{base}/readyz") as r:
            assert (r.status, (await r.json())["reason"]) == (503, "draining")
    (resp,) = await request(mesh.outbound, get("/echo"))
    assert resp.status == 200
    assert resp.header("connection") == "close"  # draining: callers move off


async def test_endpoint_stats_follow_every_outcome(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    ok, busy = await upstreams("ok"), await upstreams("busy")
    mesh = await make_mesh({"svc": service(ok.port, busy.port, lb="round_robin")})
    responses = await request(mesh.outbound, get("/busy") * 4, count=4)
    assert [r.status for r in responses] == [200] * 4  # the one 503 was retried on "ok"
    # a client that leaves while its request is upstream takes it out of flight too
    _, writer = await asyncio.open_connection(LOCAL, mesh.outbound)
    writer.write(get("/slow?delay=1"))
    await writer.drain()
    await asyncio.sleep(0.2)
    writer.close()
    await asyncio.sleep(0.2)
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{LOCAL}:{mesh.admin}/clusters") as r,
    ):
        svc = (await r.json())["services"]["svc"]
    rows = {e["port"]: e for e in svc["endpoints"]}
    assert svc["counters"]["retries"] == 1
    assert svc["counters"]["in_flight"] == 0
    assert [rows[p]["in_flight"] for p in (ok.port, busy.port)] == [0, 0]
    assert rows[busy.port]["excluded_for_s"] > 25  # Retry-After: 30
    assert rows[busy.port]["penalty_ms"] > 900  # a 503 counts as a failure
    assert rows[ok.port]["penalty_ms"] == 0
    assert 0 < rows[ok.port]["rtt_ms"] <= 30  # measured: faster than the 30 ms default
    assert (rows[ok.port]["state"], rows[busy.port]["state"]) == ("healthy", "paused")
    assert rows[ok.port]["slow_start"] == 1.0  # seen with the first table: no ramp
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{LOCAL}:{mesh.admin}/clusters?format=text") as r,
    ):
        text = await r.text()
    head, columns, *lines = text.splitlines()
    assert head.startswith("svc: 0 in flight, 1 retries (0 unsent, 0 over budget), 0 ejections")
    assert columns.split() == ["endpoint", "state", "out_for_s", "in_flight", "rtt_ms",
                               "penalty_ms", "weight", "ramp"]  # fmt: skip
    busy_line = next(line.split() for line in lines if f":{busy.port}" in line)
    assert busy_line[1] == "paused"
    assert 25 < float(busy_line[2]) <= 30
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{LOCAL}:{mesh.admin}/clusters?format=xml") as r,
    ):
        assert r.status == 400
        assert "format must be json or text" in (await r.json())["error"]


async def test_clusters_show_a_new_endpoints_slow_start(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    first, second = await upstreams("first"), await upstreams("second")
    mesh = await make_mesh({"svc": service(first.port)})
    await asyncio.sleep(1.1)  # past the grace for endpoints seen with the first
    mesh.write_table({"svc": service(first.port, second.port)})
    for _ in range(40):
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://{LOCAL}:{mesh.admin}/clusters") as r,
        ):
            rows = (await r.json())["services"]["svc"]["endpoints"]
        if len(rows) == 2:
            break
        await asyncio.sleep(0.05)
    ramps = {e["port"]: e["slow_start"] for e in rows}
    assert ramps[first.port] == 1.0
    assert 0.1 <= ramps[second.port] < 0.2  # 10 % rising to 100 % over 30 s


async def test_readyz_waits_for_a_table(make_mesh: MakeMesh) -> None:
    mesh = await make_mesh({}, table="")
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{LOCAL}:{mesh.admin}/readyz") as r,
    ):
        assert r.status == 503
        assert (await r.json())["reason"] == "no routing table loaded"


async def test_table_file_reload_and_rejection(
    upstreams: Upstreams, make_mesh: MakeMesh, caplog: object
) -> None:
    a, b = await upstreams("a"), await upstreams("b")
    mesh = await make_mesh({"svc": service(a.port)})
    mesh.write_table({"svc": service(b.port)})
    for _ in range(100):
        await asyncio.sleep(0.02)
        (resp,) = await request(mesh.outbound, get("/echo"))
        if json.loads(resp.body)["server"] == "b":
            break
    assert json.loads(resp.body)["server"] == "b"
    # a bad file: logged, and the old table stays in force
    mesh.table_path.write_text("services:\n  svc: {endpoints: [{address: 127.0.0.1, port: 0}]}\n")
    for _ in range(100):
        await asyncio.sleep(0.02)
        if mesh.sidecar.last_reload_error:
            break
    assert (
        "services.svc.endpoints[0].port: must be from 1 to 65535" in mesh.sidecar.last_reload_error
    )
    (resp,) = await request(mesh.outbound, get("/echo"))
    assert json.loads(resp.body)["server"] == "b"
    mesh.table_path.write_text("services: [\n")
    assert not mesh.sidecar.reload()
    assert "not valid YAML at line" in mesh.sidecar.last_reload_error
    # a reload that changes one service keeps the route (balancer state) of the other
    mesh.write_table({"svc": service(b.port), "other": service(a.port)})
    assert mesh.sidecar.reload()
    routes = mesh.sidecar.tables.current
    assert routes is not None
    before = routes.named("svc"), routes.named("other")
    mesh.write_table({"svc": service(b.port), "other": service(b.port)})
    assert mesh.sidecar.reload()
    routes = mesh.sidecar.tables.current
    assert routes is not None
    assert routes.named("svc") is before[0]
    assert routes.named("other") is not before[1]
