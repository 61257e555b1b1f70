"""Mesh TLS on the data path, in process: an outbound listener originating TLS to an inbound
listener that sniffs it, verifies the caller and checks ``allow_from``; real sockets, real
certificates from the mesh's CA, a real app behind the inbound."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization

from control_plane.ca import Authority, make_csr, spiffe_id
from control_plane.wire import Endpoint, parse_table
from sidecar.proxy.guard import InboundGuard, service_of
from sidecar.proxy.listener import Downstream
from sidecar.proxy.routing import AppRouter, Pools, TableHolder
from sidecar.proxy.tracker import ConnectionTracker
from sidecar.proxy.watch import Timeouts
from sidecar.tls import HANDSHAKE_ROUNDS, SESSION_TICKETS, MeshTls, mesh_contexts

LOCAL = "127.0.0.1"
TD = "cluster.local"
WEB = spiffe_id(TD, "shop", "web")
CATALOG = spiffe_id(TD, "shop", "catalog")


def credentials(
    ca: Authority, service: str, bundle: list[str], *, signed: float = 0.0, ttl: float = 3600.0
) -> MeshTls:
    """A sidecar's MeshTls holding a certificate ``ca`` signed for ``service`` (``signed``
    seconds ago, lasting ``ttl``)."""
    key, csr = make_csr(spiffe_id(TD, "shop", service))
    cert = ca.sign(csr, service=service, namespace="shop", now=time.time() - signed, ttl=ttl)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    mesh = MeshTls()
    mesh.trust_domain = TD
    mesh.put(
        mesh_contexts(cert.public_bytes(serialization.Encoding.PEM), key_pem, bundle),
        spiffe_id(TD, "shop", service),
    )
    return mesh


@dataclass
class Hop:
    """An outbound listener (web's sidecar) and an inbound one (catalog's) before an app."""

    outbound: int
    inbound: int
    inbound_tracker: ConnectionTracker
    guard: InboundGuard
    pools: Pools


@pytest.fixture
def ca() -> Authority:
    return Authority.create(time.time())


async def _app() -> tuple[web.AppRunner, int]:
    async def echo(request: web.Request) -> web.Response:
        if request.path == "/big":  # (a body of many TLS records each way)
            return web.Response(body=bytes(len(await request.read())))
        return web.json_response({"peer": request.headers.getall("x-meshlet-peer", [])})

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, LOCAL, 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


@pytest.fixture
async def hop(ca: Authority) -> AsyncIterator[Callable[..., Hop]]:
    loop = asyncio.get_running_loop()
    runner, app_port = await _app()
    servers: list[asyncio.Server] = []
    made: list[Hop] = []

    async def make(
        web_mesh: MeshTls,
        catalog_mesh: MeshTls,
        identity: str = CATALOG,
        policy: dict[str, Any] | None = None,
    ) -> Hop:
        guard = InboundGuard(catalog_mesh, "catalog")
        tracker = ConnectionTracker("inbound", "catalog", guard=guard)
        app_router = AppRouter(Endpoint(LOCAL, app_port), Pools())
        inbound = await loop.create_server(
            lambda: Downstream(app_router, tracker, Timeouts(), loop), LOCAL, 0
        )
        in_port = inbound.sockets[0].getsockname()[1]
        pools = Pools(mesh=web_mesh)
        tables = TableHolder(pools, service="web")
        catalog = {"endpoints": [{"address": LOCAL, "port": in_port}], "policy": policy or {}}
        table = parse_table({"services": {"catalog": catalog}})
        tables.install(table, "test")
        pools.get(table.services["catalog"].endpoints[0]).rekey(identity)
        outbound = await loop.create_server(
            lambda: Downstream(tables, ConnectionTracker("outbound"), Timeouts(), loop), LOCAL, 0
        )
        servers.extend((inbound, outbound))
        out_port = outbound.sockets[0].getsockname()[1]
        made.append(Hop(out_port, in_port, tracker, guard, pools))
        return made[-1]

    yield make  # type: ignore[misc]
    for server in servers:
        server.close()
    for h in made:
        h.pools.close()
    await runner.cleanup()


async def get(
    port: int, path: str = "/", host: str = "catalog"
) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection(LOCAL, port)
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nx-meshlet-peer: forged\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
        body = await reader.readexactly(int(headers["content-length"]))
        return int(lines[0].split()[1]), headers, body
    finally:
        writer.close()


async def test_two_sidecars_talk_mesh_tls_and_the_app_learns_the_verified_caller(
    ca: Authority, hop: Callable[..., asyncio.Future[Hop]]
) -> None:
    bundle = [ca.pem()[0].decode()]
    h = await hop(credentials(ca, "web", bundle), credentials(ca, "catalog", bundle))
    for _ in range(3):  # one handshake, the connection kept
        status, _, body = await get(h.outbound)
        assert status == 200
        assert json.loads(body)["peer"] == [WEB]  # the client's forged one is gone
    assert h.inbound_tracker.counters.tls_handshakes == 1
    assert h.inbound_tracker.counters.tls_h2 == 0  # an HTTP/1.1 pool chose http/1.1 by ALPN
    pool = next(iter(h.pools._pools.values()))
    assert pool.tls_handshakes == 1
    assert pool.statistics().connects == 1
    # a second connection (two callers at once) resumes the first one's session
    await asyncio.gather(get(h.outbound, "/a"), get(h.outbound, "/b"))
    assert pool.tls_handshakes == 2
    assert pool.tls_resumed == 1
    assert h.inbound_tracker.counters.tls_handshakes == 2


async def test_large_bodies_cross_mesh_tls_both_ways(
    ca: Authority, hop: Callable[..., asyncio.Future[Hop]]
) -> None:
    bundle = [ca.pem()[0].decode()]
    h = await hop(credentials(ca, "web", bundle), credentials(ca, "catalog", bundle))
    size = 3 * 1024 * 1024 + 7
    reader, writer = await asyncio.open_connection(LOCAL, h.outbound)
    writer.write(b"POST /big HTTP/1.1\r\nHost: catalog\r\nContent-Length: %d\r\n\r\n" % size)
    writer.write(b"x" * size)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"content-length: %d" % size in head.lower()
    assert len(await reader.readexactly(size)) == size
    writer.close()
    assert h.inbound_tracker.counters.tls_handshakes == 1


async def test_allow_from_refuses_a_caller_with_403_and_counts_it(
    ca: Authority, hop: Callable[..., asyncio.Future[Hop]]
) -> None:
    bundle = [ca.pem()[0].decode()]
    h = await hop(credentials(ca, "web", bundle), credentials(ca, "catalog", bundle))
    h.guard.rules("strict", ("orders",))
    status, headers, body = await get(h.outbound)
    assert status == 403
    assert headers["x-meshlet-error"] == "forbidden"
    assert b"allow_from does not list web" in body
    assert h.guard.forbidden == {"web": 1}
    h.guard.rules("strict", ("orders", "web"))
    assert (await get(h.outbound))[0] == 200


async def test_strict_refuses_plaintext_from_another_host_but_not_from_loopback(
    ca: Authority, hop: Callable[..., asyncio.Future[Hop]]
) -> None:
    bundle = [ca.pem()[0].decode()]
    h = await hop(credentials(ca, "web", bundle), credentials(ca, "catalog", bundle))
    h.guard.rules("strict", ("*",))
    # plaintext straight to the inbound port, from 127.0.0.2 ("another host")
    reader, writer = await asyncio.open_connection(LOCAL, h.inbound, local_addr=("127.0.0.2", 0))
    writer.write(b"GET / HTTP/1.1\r\nHost: catalog\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert head.startswith(b"HTTP/1.1 403 ")
    assert b"x-meshlet-error: forbidden" in head
    assert h.guard.forbidden == {"plaintext": 1}
    status, _, body = await get(h.inbound)  # from 127.0.0.1: the local app, a probe
    assert status == 200
    assert json.loads(body)["peer"] == []
    h.guard.rules("permissive", ("*",))
    reader, writer = await asyncio.open_connection(LOCAL, h.inbound, local_addr=("127.0.0.2", 0))
    writer.write(b"GET / HTTP/1.1\r\nHost: catalog\r\n\r\n")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
    writer.close()


async def test_a_foreign_ca_or_the_wrong_identity_never_reaches_the_app(
    ca: Authority, hop: Callable[..., asyncio.Future[Hop]]
) -> None:
    bundle = [ca.pem()[0].decode()]
    foreign = Authority.create(time.time())
    # web's certificate from another CA: the inbound refuses the handshake (in TLS 1.3 the
    # client has finished its part by then, so web sees the refusal as a reset)
    h = await hop(credentials(foreign, "web", bundle), credentials(ca, "catalog", bundle))
    status, headers, body = await get(h.outbound)
    assert status == 502
    assert headers["x-meshlet-error"] == "upstream-reset"
    assert h.inbound_tracker.counters.tls_failures == 2  # the try and its retry (a reset)
    assert h.inbound_tracker.counters.tls_handshakes == 0
    # the inbound proves catalog, the table says the endpoint is orders: web refuses it
    h2 = await hop(
        credentials(ca, "web", bundle),
        credentials(ca, "catalog", bundle),
        spiffe_id(TD, "shop", "orders"),
    )
    status, headers, body = await get(h2.outbound)
    assert status == 502
    assert b"proved " + CATALOG.encode() in body


async def test_a_client_without_a_certificate_is_refused_in_the_handshake(
    ca: Authority, hop: Callable[..., asyncio.Future[Hop]]
) -> None:
    bundle = [ca.pem()[0].decode()]
    h = await hop(credentials(ca, "web", bundle), credentials(ca, "catalog", bundle))
    ctx = ssl.create_default_context(cadata=bundle[0])
    ctx.check_hostname = False

    async def call() -> None:
        reader, writer = await asyncio.open_connection(LOCAL, h.inbound, ssl=ctx)
        writer.write(b"GET / HTTP/1.1\r\nHost: catalog\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")

    with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
        await call()
    assert h.inbound_tracker.counters.tls_handshakes == 0


async def test_an_expired_certificate_is_refused_either_way(
    ca: Authority, hop: Callable[..., asyncio.Future[Hop]]
) -> None:
    bundle = [ca.pem()[0].decode()]
    expired = {"signed": 7200.0, "ttl": 3600.0}  # (ended an hour ago)
    # the caller's certificate expired: the inbound fails the handshake
    h = await hop(credentials(ca, "web", bundle, **expired), credentials(ca, "catalog", bundle))
    assert (await get(h.outbound))[0] == 502
    assert h.inbound_tracker.counters.tls_failures >= 1
    assert h.inbound_tracker.counters.tls_handshakes == 0
    # the server's expired: the caller refuses it before it sends a byte of the request
    h2 = await hop(credentials(ca, "web", bundle), credentials(ca, "catalog", bundle, **expired))
    status, headers, body = await get(h2.outbound)
    assert status == 502
    assert headers["x-meshlet-error"] == "upstream-connect-failure"
    assert b"certificate has expired" in body or b"CERTIFICATE_VERIFY_FAILED" in body


async def test_tls_to_an_inbound_without_a_certificate_is_cut_and_counted(
    ca: Authority, hop: Callable[..., asyncio.Future[Hop]]
) -> None:
    bundle = [ca.pem()[0].decode()]
    h = await hop(credentials(ca, "web", bundle), MeshTls())  # catalog has none yet
    status, headers, _ = await get(h.outbound)
    assert status == 502
    assert headers["x-meshlet-error"] == "upstream-connect-failure"
    assert h.inbound_tracker.counters.tls_failures >= 1
    assert (await get(h.inbound))[0] == 200  # plaintext from the local host goes on


async def test_a_client_that_ends_with_close_notify_gets_one_back(
    ca: Authority, hop: Callable[..., asyncio.Future[Hop]], tmp_path: Path
) -> None:
    """A TLS client that closes cleanly waits for the server's close_notify: it must come."""
    bundle = [ca.pem()[0].decode()]
    h = await hop(credentials(ca, "web", bundle), credentials(ca, "catalog", bundle))
    pem = web_pem(ca, tmp_path)
    ctx = ssl.create_default_context(cadata=bundle[0])
    ctx.check_hostname = False
    ctx.load_cert_chain(pem)

    def clean_close() -> None:
        with (
            socket.create_connection((LOCAL, h.inbound), timeout=5) as s,
            ctx.wrap_socket(s) as tls,
        ):
            tls.sendall(b"GET / HTTP/1.1\r\nHost: catalog\r\n\r\n")
            assert tls.recv(4096).startswith(b"HTTP/1.1 200 ")
            tls.unwrap().close()  # sends close_notify, then waits for the server's

    await asyncio.wait_for(asyncio.to_thread(clean_close), 10)
    assert h.inbound_tracker.counters.tls_handshakes == 1


async def test_a_peers_key_update_is_answered_with_the_next_record(
    ca: Authority, hop: Callable[..., asyncio.Future[Hop]], tmp_path: Path
) -> None:
    """A client that updates its keys and asks for ours (TLS 1.3 KeyUpdate, here ``openssl
    s_client``'s ``K`` command) gets our KeyUpdate before the next answer, which it reads
    under our new keys. (The layer sends what a read leaves to send with its next write.)"""
    bundle = [ca.pem()[0].decode()]
    h = await hop(credentials(ca, "web", bundle), credentials(ca, "catalog", bundle))
    pem, ca_pem = web_pem(ca, tmp_path), tmp_path / "ca.pem"
    ca_pem.write_text(bundle[0])
    client = await asyncio.create_subprocess_exec(
        *("openssl", "s_client", "-connect", f"{LOCAL}:{h.inbound}", "-cert", str(pem)),
        *("-CAfile", str(ca_pem), "-alpn", "http/1.1", "-crlf", "-msg"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert client.stdin is not None
    assert client.stdout is not None
    out = client.stdout
    seen: list[str] = []  # its lines so far

    async def until(text: str, count: int = 1) -> int:
        """s_client's lines read until ``count`` of them held ``text``: the last one's index."""
        while len(found := [i for i, line in enumerate(seen) if text in line]) < count:
            line = await out.readline()
            assert line, f"s_client ended before {text!r}: {seen[-5:]}"
            seen.append(line.decode(errors="replace"))
        return found[count - 1]

    try:
        async with asyncio.timeout(20):
            client.stdin.write(b"GET / HTTP/1.1\nHost: catalog\n\n")
            first = await until("HTTP/1.1 200")
            client.stdin.write(b"K\n")  # (alone: s_client takes a command's whole read)
            theirs = await until(">>> TLS 1.3, Handshake [length 0005], KeyUpdate")
            client.stdin.write(b"GET / HTTP/1.1\nHost: catalog\n\n")
            ours = await until("<<< TLS 1.3, Handshake [length 0005], KeyUpdate")
            second = await until("HTTP/1.1 200", 2)
    finally:
        client.kill()
        await client.wait()
    assert first < theirs < ours < second  # ours came with the answer, read under it
    assert h.inbound_tracker.counters.tls_handshakes == 1


def web_pem(ca: Authority, directory: Path) -> Path:
    """A PEM file with a certificate ``ca`` signed for web, then its key."""
    key, csr = make_csr(WEB)
    cert = ca.sign(csr, service="web", namespace="shop", now=time.time())
    pem = directory / "web.pem"
    pem.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pem


def test_service_of_reads_only_this_trust_domains_service_ids() -> None:
    assert service_of(WEB, TD) == "web"
    assert service_of(WEB, "other.domain") is None
    assert service_of("spiffe://cluster.local/ns/shop/sa/web", TD) is None
    assert service_of("spiffe://cluster.local/ns//svc/web", TD) is None
    assert service_of(WEB + "/extra", TD) is None


def test_a_guard_is_open_only_while_it_has_nothing_to_refuse() -> None:
    """``open`` lets the listener skip ``check``: it follows the rules as they are set."""
    guard = InboundGuard(MeshTls(), "catalog")
    assert guard.open
    assert guard.check(None, b"10.0.0.9") is None
    guard.rules("strict", ("*",))
    assert not guard.open
    assert guard.check(None, b"10.0.0.9") is not None
    guard.rules("permissive", ("orders",))
    assert not guard.open
    assert guard.check(None, b"127.0.0.1") is not None
    guard.rules("permissive", ("orders", "*"))
    assert guard.open
    assert guard.check(None, b"10.0.0.9") is None


def records(data: bytes) -> int:
    """The TLS records in ``data``, whole ones back to back."""
    count = 0
    while data:
        count += 1
        data = data[5 + int.from_bytes(data[3:5], "big") :]
    return count


def test_the_inbound_sends_one_session_ticket_a_handshake(ca: Authority) -> None:
    """What follows the server's side of a handshake is its tickets, one record each: one
    ticket (a pool resumes only the last, once), which still resumes a session."""
    bundle = [ca.pem()[0].decode()]
    server_ctx = credentials(ca, "catalog", bundle).server
    client_ctx = credentials(ca, "web", bundle).client
    assert server_ctx is not None
    assert client_ctx is not None
    session = None
    for resumed in (False, True):
        to_server, to_client, from_server, from_client = (ssl.MemoryBIO() for _ in range(4))
        server = server_ctx.wrap_bio(to_server, from_server, server_side=True)
        client = client_ctx.wrap_bio(to_client, from_client, session=session)
        last = b""
        for _ in range(HANDSHAKE_ROUNDS):
            for side in (client, server):
                with contextlib.suppress(ssl.SSLWantReadError):
                    side.do_handshake()
            to_server.write(from_client.read())
            last = from_server.read()
            to_client.write(last)
            if server.version():  # (its side is done: what it wrote last is its tickets)
                break
        assert server.version() == "TLSv1.3"
        assert records(last) == SESSION_TICKETS == 1
        with contextlib.suppress(ssl.SSLWantReadError):
            client.read(1)  # (takes the ticket in)
        assert client.session_reused is resumed
        session = client.session
        assert session is not None
        assert session.has_ticket
