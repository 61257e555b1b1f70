"""Hosts the mesh does not know (``outbound_policy``), and what is decided without a socket about
intercepted connections: where they were going, and whether they speak HTTP. The rules at work
with real sidecars in network namespaces: tests/integration/test_pods.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest

from control_plane.wire import Endpoint, Table
from sidecar.errors import Reason
from sidecar.proxy.egress import MAX_DESTINATIONS, PASSTHROUGH, Egress, host_port
from sidecar.proxy.intercept import Interception, looks_like_http
from sidecar.proxy.routing import Pools, Route, TableHolder
from tests.sidecar.conftest import LOCAL, Mesh, Upstream, get, request, service
from tests.sidecar.test_metrics import samples, scrape, value

MakeMesh = Callable[..., Awaitable[Mesh]]
Upstreams = Callable[[str], Awaitable[Upstream]]


@pytest.mark.parametrize(
    ("first", "http"),
    [
        (b"GET / HTTP/1.1\r\n", True),
        (b"M-SEARCH * HTTP/1.1\r\n", True),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", False),  # a TLS ClientHello
        (b"SSH-2.0-OpenSSH_9.2\r\n", False),
        (b"PING\r\n", False),  # Redis, inline
        (b" GET / HTTP/1.1\r\n", False),
        (b"GE", None),  # too few bytes to tell (taken as HTTP)
        (b"A" * 30, False),
    ],
)
def test_first_bytes_say_whether_a_connection_is_http(first: bytes, http: bool | None) -> None:
    assert looks_like_http(first) is http


def test_opaque_by_port_and_where_opaque_streams_go() -> None:
    outbound = Interception(frozenset({5432}))
    assert outbound.opaque(("10.0.0.5", 5432))
    assert not outbound.opaque(("10.0.0.5", 8080))
    assert outbound.destination(("10.0.0.5", 5432)) == ("10.0.0.5", 5432)
    inbound = Interception(frozenset(), local=True, http_port=8080)
    assert not inbound.opaque(("10.0.0.7", 8080))  # the app's port: HTTP, if it says so
    assert inbound.opaque(("10.0.0.7", 9090))  # another of the app's ports: as TCP
    assert inbound.destination(("10.0.0.7", 9090)) == ("127.0.0.1", 9090)


@pytest.mark.parametrize(
    ("authority", "where"),
    [
        (b"api.example.com", ("api.example.com", 80)),
        (b"API.Example.com.:8443", ("api.example.com", 8443)),
        (b"10.1.2.3:81", ("10.1.2.3", 81)),
        (b"[fd00::1]:8080", ("fd00::1", 8080)),
        (b"host:0", None),
        (b"host:http", None),
        (b":80", None),
    ],
)
def test_host_port(authority: bytes, where: tuple[str, int] | None) -> None:
    assert host_port(authority) == where


def holder() -> TableHolder:
    tables = TableHolder(Pools())
    tables.install(Table(version=1, services={}), "test")
    return tables


def test_allow_any_makes_one_external_route_a_destination_and_bounds_them() -> None:
    egress = Egress(holder())
    route = egress.route(b"api.example.com", None)
    assert isinstance(route, Route)
    assert (route.name, route.external, route.policy.retries) == (PASSTHROUGH, True, 0)
    assert egress.route(b"API.example.com:80", None) is route
    intercepted = egress.route(b"api.example.com", ("10.9.8.7", 443))  # where it was going
    assert isinstance(intercepted, Route)
    assert intercepted is not route
    for n in range(MAX_DESTINATIONS + 10):
        routed = egress.route(b"h%d" % n, None)
        assert isinstance(routed, Route)
        member = routed.balancer.pick(None, ())
        assert member is not None
        routed.pool_for(member.endpoint)  # (a pool, as a request to it would make)
    # a client names them: the routes, their pools and their endpoints' stats are bounded
    assert len(egress._routes) == MAX_DESTINATIONS
    assert len(list(egress.pools)) <= MAX_DESTINATIONS
    assert egress.pools.find_stats(Endpoint("h0", 80)) is None


def test_registry_only_and_the_cases_nothing_passes() -> None:
    egress = Egress(holder(), "registry_only")
    assert egress.route(b"api.example.com", None) == (
        Reason.OUTSIDE_MESH,
        "api.example.com:80 is not in the mesh (outbound_policy registry_only)",
    )
    assert Reason.OUTSIDE_MESH.status == 502
    assert Reason.OUTSIDE_MESH.code == "no-route"
    assert Egress(TableHolder(Pools())).route(b"a.example", None) == (
        Reason.NO_ROUTE,
        "no routing table loaded yet",  # the mesh may yet know it
    )
    refused = Egress(holder()).route(b"bad host!", None)
    assert isinstance(refused, tuple)
    assert refused[0] is Reason.BAD_REQUEST
    with pytest.raises(ValueError, match="one of allow_any, registry_only"):
        Egress(holder(), "deny")


async def test_a_proxy_request_for_an_unknown_host_passes_through(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    outside = await upstreams("outside")
    inside = await upstreams("inside")
    mesh = await make_mesh({"catalog": service(inside.port)})
    raw = (
        f"GET http://{LOCAL}:{outside.port}/echo/x HTTP/1.1\r\nHost: {LOCAL}:{outside.port}\r\n\r\n"
    )
    (resp,) = await request(mesh.outbound, raw.encode())
    assert resp.status == 200
    seen = json.loads(resp.body)
    assert seen["server"] == "outside"
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert not any(k.startswith("x-meshlet-") for k in headers)  # the mesh's stay in the mesh
    assert headers["x-forwarded-for"] == LOCAL
    # counted as the service "passthrough"
    found = samples(await scrape(mesh))
    out = {"direction": "outbound", "service": PASSTHROUGH}
    assert value(found, "meshlet_requests_total", **out, code="2xx") == 1
    # a request made to the sidecar itself for a name it does not know: 404, as before
    (resp,) = await request(mesh.outbound, get("/", "nope"))
    assert (resp.status, resp.header("x-meshlet-error")) == (404, "no-route")


async def test_registry_only_answers_502_for_a_proxy_request_outside_the_mesh(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    outside = await upstreams("outside")
    mesh = await make_mesh({}, outbound_policy="registry_only")
    raw = f"GET http://{LOCAL}:{outside.port}/ HTTP/1.1\r\n\r\n"
    (resp,) = await request(mesh.outbound, raw.encode())
    assert (resp.status, resp.header("x-meshlet-error")) == (502, "no-route")
    assert f"{LOCAL}:{outside.port} is not in the mesh (outbound_policy registry_only)" in (
        resp.body.decode()
    )
    assert outside.hits == 0


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def test_connect_tunnels_to_a_host_outside_the_mesh(make_mesh: MakeMesh) -> None:
    target = await asyncio.start_server(echo, LOCAL, 0)
    port = target.sockets[0].getsockname()[1]
    mesh = await make_mesh({})
    reader, writer = await asyncio.open_connection(LOCAL, mesh.outbound)
    # bytes right behind the head wait for the stream (a TLS client sends its hello at once)
    writer.write(f"CONNECT {LOCAL}:{port} HTTP/1.1\r\nHost: {LOCAL}:{port}\r\n\r\nhello".encode())
    async with asyncio.timeout(10):
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 200 Connection Established\r\n\r\n"
        assert await reader.readexactly(5) == b"hello"
        writer.write(b" again")
        assert await reader.readexactly(6) == b" again"
    writer.close()
    target.close()
    found = samples(await scrape(mesh))
    assert (
        value(
            found, "meshlet_requests_total", direction="outbound", service=PASSTHROUGH, code="2xx"
        )
        == 1
    )


async def test_connect_is_refused_by_the_same_rule_and_when_it_cannot_open(
    make_mesh: MakeMesh,
) -> None:
    probe = await asyncio.start_server(echo, LOCAL, 0)
    closed = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    allowed = await make_mesh({})
    refused = await make_mesh({}, outbound_policy="registry_only")
    for mesh, status, error in (
        (refused, 502, "no-route"),
        (allowed, 502, "upstream-connect-failure"),
    ):
        raw = f"CONNECT {LOCAL}:{closed} HTTP/1.1\r\nHost: {LOCAL}:{closed}\r\n\r\n".encode()
        reader, writer = await asyncio.open_connection(LOCAL, mesh.outbound)
        writer.write(raw)
        async with asyncio.timeout(10):
            answer = await reader.read()  # answered, then closed: what follows is not HTTP
        writer.close()
        head = answer.split(b"\r\n\r\n")[0].decode()
        assert head.startswith(f"HTTP/1.1 {status} "), answer
        assert f"x-meshlet-error: {error}" in head
