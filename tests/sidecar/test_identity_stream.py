"""An in-process sidecar gets its workload certificate over a real WebSocket stream from a
stand-in control plane (aiohttp, the control plane's own CA signing), then speaks mutual TLS
with it; a certificate for another identity is never installed; ``--mtls off`` and a static
table ask for none. What an operator sees: ``/config_dump``'s ``identity`` and the metrics."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from control_plane.ca import Authority, Refused
from control_plane.wire import (
    Certificate,
    Csr,
    Hello,
    Table,
    Welcome,
    decode,
    encode,
    table_message,
)
from control_plane.wire.identity import fingerprint
from sidecar.clock import wall
from sidecar.tls import MeshTls, peer_identity
from tests.sidecar.conftest import LOCAL, Mesh
from tests.sidecar.test_identity import forged
from tests.sidecar.test_metrics import promtool_check, samples, value

MakeMesh = Callable[..., Awaitable[Mesh]]
ME = "spiffe://cluster.local/ns/default/svc/tester"


def pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


@dataclass
class Signer:
    """A control plane's stream end that pushes one table with its CA as the trust bundle and
    answers every CSR: signed for the stream's service, or (``impostor``) with a certificate
    for the CSR's key naming another service."""

    ca: Authority = field(default_factory=lambda: Authority.create(wall()))
    impostor: bool = False
    url: str = ""
    hellos: list[Hello] = field(default_factory=list)
    csrs: int = 0

    def table(self) -> Table:
        return Table(
            services={},
            version=1,
            epoch="e1",
            trust_domain="cluster.local",
            trust_bundle=(pem(self.ca.certificate),),
        )

    def answer(self, hello: Hello, csr: Csr) -> Certificate:
        if self.impostor:  # the sidecar's key, another service's name
            return forged(self.ca, csr, "other", wall())
        try:
            signed = self.ca.sign(csr.csr.encode(), service=hello.service, namespace="", now=wall())
        except Refused as e:
            return Certificate(error=str(e))
        return Certificate(chain=pem(signed))


SIGNER = web.AppKey("signer", Signer)


async def stream(request: web.Request) -> web.StreamResponse:
    s = request.app[SIGNER]
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    hello = decode((await ws.receive()).data)
    assert isinstance(hello, Hello)
    s.hellos.append(hello)
    await ws.send_str(encode(Welcome("tester-1", 1, "e1")))
    await ws.send_str(table_message(s.table()))
    async for msg in ws:
        message = decode(msg.data)
        if isinstance(message, Csr):
            s.csrs += 1
            await ws.send_str(encode(s.answer(hello, message)))
    return ws


@pytest.fixture
async def signer() -> AsyncIterator[Callable[..., Awaitable[Signer]]]:
    runners: list[web.AppRunner] = []

    async def start(**behaviour: Any) -> Signer:
        app = web.Application()
        app[SIGNER] = s = Signer(**behaviour)
        app.router.add_get("/v1/stream", stream)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, LOCAL, 0).start()
        s.url = f"http://{LOCAL}:{runner.addresses[0][1]}"
        return s

    yield start
    for runner in runners:
        await runner.cleanup()


async def identity_state(mesh: Mesh) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{LOCAL}:{mesh.admin}/config_dump") as r,
    ):
        state: dict[str, Any] = (await r.json())["identity"]
        return state


async def until(mesh: Mesh, check: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    for _ in range(500):
        state = await identity_state(mesh)
        if check(state):
            return state
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within 10 s: {what}; the identity: {state}")


async def scrape(mesh: Mesh) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{LOCAL}:{mesh.admin}/metrics") as r,
    ):
        return await r.text()


async def sidecar(make_mesh: MakeMesh, tmp_path: Path, url: str, **config: Any) -> Mesh:
    return await make_mesh(
        {},
        table="",
        control_plane=url,
        advertise=LOCAL,
        app_health="none",
        state_dir=str(tmp_path / "state"),
        deregister_delay=0,
        **config,
    )


async def handshake(tls: MeshTls) -> tuple[str | None, str | None]:
    """A mutual TLS connection from the client context to a server on the server context:
    the identity each side verified of the other."""
    assert tls.server is not None
    assert tls.client is not None
    seen: list[str | None] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(peer_identity(writer.get_extra_info("ssl_object")))
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, LOCAL, 0, ssl=tls.server)
    port = server.sockets[0].getsockname()[1]
    async with server, asyncio.timeout(5):
        reader, writer = await asyncio.open_connection(LOCAL, port, ssl=tls.client)
        assert await reader.read() == b"ok"
        obj = writer.get_extra_info("ssl_object")
        assert isinstance(obj, ssl.SSLObject)
        assert obj.version() == "TLSv1.3"
        server_seen = peer_identity(obj)
        writer.close()
    return seen[0], server_seen


async def test_the_sidecar_gets_its_certificate_over_the_stream_and_speaks_mutual_tls(
    signer: Callable[..., Awaitable[Signer]], make_mesh: MakeMesh, tmp_path: Path
) -> None:
    cp = await signer()
    mesh = await sidecar(make_mesh, tmp_path, cp.url)
    state = await until(mesh, lambda s: s["spiffe_id"] == ME, "a certificate installed")
    assert cp.hellos[0].tls is False  # no certificate yet: the control plane marks it on signing
    assert cp.csrs == 1
    assert state["mtls"] == "on"
    assert state["trust_domain"] == "cluster.local"
    assert state["trust_bundle"] == [fingerprint(cp.ca.certificate)]
    assert state["seconds_to_expiry"] == pytest.approx(24 * 3600, abs=120)
    assert state["not_after"] - state["not_before"] == pytest.approx(24 * 3600 + 60)
    assert state["rotations"] == 0
    assert state["last_error"] == ""
    assert int(state["serial"], 16) > 0
    assert await handshake(mesh.sidecar.mesh_tls) == (ME, ME)
    text = await scrape(mesh)
    found = samples(text)
    expiry = value(found, "meshlet_identity_expiry_seconds")
    assert expiry == pytest.approx(24 * 3600, abs=120)
    assert value(found, "meshlet_identity_rotations_total") == 0
    assert ("meshlet_identity_errors_total", (("reason", "refused"),)) in found
    assert sum(v for (name, _), v in found.items() if name == "meshlet_identity_errors_total") == 0
    promtool_check(text)


async def test_a_certificate_for_another_identity_is_never_installed(
    signer: Callable[..., Awaitable[Signer]], make_mesh: MakeMesh, tmp_path: Path
) -> None:
    cp = await signer(impostor=True)
    mesh = await sidecar(make_mesh, tmp_path, cp.url)
    state = await until(
        mesh, lambda s: s["errors"]["wrong_identity"] >= 1, "the impostor's certificate refused"
    )
    assert state["spiffe_id"] == ""
    assert state["seconds_to_expiry"] == 0
    assert "svc/other" in state["last_error"]
    assert ME in state["last_error"]
    tls = mesh.sidecar.mesh_tls
    assert tls.server is None
    assert tls.client is None
    assert tls.identity == ""
    found = samples(await scrape(mesh))
    assert value(found, "meshlet_identity_errors_total", reason="wrong_identity") >= 1
    assert value(found, "meshlet_identity_expiry_seconds") == 0


async def test_mtls_off_asks_for_no_certificate(
    signer: Callable[..., Awaitable[Signer]], make_mesh: MakeMesh, tmp_path: Path
) -> None:
    cp = await signer()
    mesh = await sidecar(make_mesh, tmp_path, cp.url, mtls="off")
    for _ in range(500):
        if mesh.sidecar.tables.current is not None:
            break
        await asyncio.sleep(0.02)
    assert mesh.sidecar.tables.current is not None  # the stream is up, its table applied
    await asyncio.sleep(0.1)
    assert cp.hellos[0].tls is False
    assert cp.csrs == 0
    assert await identity_state(mesh) == {"mtls": "off", "why": "--mtls off"}
    assert "meshlet_identity" not in await scrape(mesh)
    assert mesh.sidecar.mesh_tls.server is None


async def test_a_static_table_means_no_mesh_tls(make_mesh: MakeMesh) -> None:
    mesh = await make_mesh({})
    assert await identity_state(mesh) == {"mtls": "off", "why": "no control plane (--table)"}
    assert mesh.sidecar.identity is None


def test_a_sidecar_on_a_static_table_does_not_load_cryptography() -> None:
    code = (
        "import sys, sidecar.app, sidecar.cli; "
        "sys.exit('cryptography' in sys.modules and 'cryptography loaded')"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, timeout=60)
    assert done.returncode == 0
