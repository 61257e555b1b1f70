"""An in-process sidecar against a stand-in control plane (aiohttp, on a free loopback port):
the stream carries the token, an https:// control plane is verified with --ca-file (CA and
certificate made by trustme), refusals say their close code in ``/config_dump``, and a sidecar
given two stand-ins fails over between them with its table's version and epoch."""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from control_plane.wire import (
    Hello,
    Registration,
    Table,
    Welcome,
    decode,
    encode,
    parse_table,
    table_message,
    to_json,
)
from sidecar.control.discovery import Discovery
from sidecar.control.failover import Backoff, Failover, Replica
from sidecar.proxy.routing import Pools, TableHolder
from tests.sidecar.conftest import LOCAL, Mesh

MakeMesh = Callable[..., Awaitable[Mesh]]
TABLE = parse_table(
    {"services": {"a": {"endpoints": [{"address": "10.0.0.1", "port": 80}]}}, "version": 4}
)


@dataclass
class StandIn:
    """A control plane's stream end, whose tables are at ``table``: it pushes it unless the
    hello says its version and epoch (as ``control_plane.publisher`` does). ``refuse_http``:
    answer the upgrade with that status; ``close_before``/``close_after``: close with
    (code, reason) before the welcome, or after the welcome and the first table's ACK."""

    url: str = ""
    table: Table = TABLE
    authorizations: list[str | None] = field(default_factory=list)
    hosts: list[str | None] = field(default_factory=list)
    hellos: list[Hello] = field(default_factory=list)
    pushed: int = 0
    refuse_http: int = 0
    close_before: tuple[int, str] | None = None
    close_after: tuple[int, str] | None = None
    streams: list[web.WebSocketResponse] = field(default_factory=list)

    async def drop(self) -> None:
        """End every stream, as a control plane that goes away does."""
        for ws in self.streams:
            await ws.close(code=1001, message=b"going away")


STAND_IN = web.AppKey("stand_in", StandIn)


async def stream(request: web.Request) -> web.StreamResponse:
    s = request.app[STAND_IN]
    s.authorizations.append(request.headers.get("Authorization"))
    s.hosts.append(request.headers.get("Host"))
    if s.refuse_http:
        return web.json_response({"error": "no"}, status=s.refuse_http)
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    s.streams.append(ws)
    hello = decode((await ws.receive()).data)
    assert isinstance(hello, Hello)
    s.hellos.append(hello)
    if s.close_before is not None:
        await ws.close(code=s.close_before[0], message=s.close_before[1].encode())
        return ws
    await ws.send_str(encode(Welcome("a-1", s.table.version, s.table.epoch)))
    if (hello.version, hello.epoch) != (s.table.version, s.table.epoch):
        await ws.send_str(table_message(s.table))
        s.pushed += 1
        await ws.receive()  # the ACK
        if s.close_after is not None:
            await ws.close(code=s.close_after[0], message=s.close_after[1].encode())
            return ws
    async for _ in ws:
        pass
    return ws


@pytest.fixture
async def stand_in() -> AsyncIterator[Callable[..., Awaitable[StandIn]]]:
    runners: list[web.AppRunner] = []

    async def start(
        tls: ssl.SSLContext | None = None, host: str = LOCAL, port: int = 0, **behaviour: Any
    ) -> StandIn:
        app = web.Application()
        app[STAND_IN] = s = StandIn(**behaviour)
        app.router.add_get("/v1/stream", stream)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, host, port, ssl_context=tls).start()
        s.url = f"{'https' if tls else 'http'}://{host}:{runner.addresses[0][1]}"
        return s

    yield start
    for runner in runners:
        await runner.cleanup()


@dataclass
class Pki:
    """A CA, a certificate for 127.0.0.1 that it signed, and a CA that signed nothing."""

    server: ssl.SSLContext
    ca_file: Path
    other_ca_file: Path


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca, other = trustme.CA(), trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(LOCAL).configure_cert(server)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    other.cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    return Pki(server, tmp_path / "ca.pem", tmp_path / "other-ca.pem")


async def stream_state(mesh: Mesh) -> dict[str, Any]:
    """``/config_dump``'s ``control_plane``: what an operator sees."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{LOCAL}:{mesh.admin}/config_dump") as r,
    ):
        state: dict[str, Any] = (await r.json())["control_plane"]
        return state


async def until(mesh: Mesh, check: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    """The stream state once ``check`` holds for it (within 10 s)."""
    for _ in range(500):
        state = await stream_state(mesh)
        if check(state):
            return state
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within 10 s: {what}; the stream: {state}")


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


async def test_the_stream_carries_the_token(
    stand_in: Callable[..., Awaitable[StandIn]], make_mesh: MakeMesh, tmp_path: Path
) -> None:
    cp = await stand_in()
    mesh = await sidecar(make_mesh, tmp_path, cp.url, token="svc-token-1")
    state = await until(mesh, lambda s: s.get("version") == 4, "table 4 applied")
    assert state["connected"] is True
    assert cp.authorizations == ["Bearer svc-token-1"]


async def test_no_token_sends_no_authorization(
    stand_in: Callable[..., Awaitable[StandIn]], make_mesh: MakeMesh, tmp_path: Path
) -> None:
    cp = await stand_in()
    mesh = await sidecar(make_mesh, tmp_path, cp.url)
    await until(mesh, lambda s: s.get("connected") is True, "connected")
    assert cp.authorizations == [None]


async def test_an_https_control_plane_is_verified_with_the_ca_file(
    stand_in: Callable[..., Awaitable[StandIn]], make_mesh: MakeMesh, tmp_path: Path, pki: Pki
) -> None:
    cp = await stand_in(tls=pki.server)
    assert cp.url.startswith("https://")
    mesh = await sidecar(make_mesh, tmp_path, cp.url, token="t0k", ca_file=str(pki.ca_file))
    state = await until(mesh, lambda s: s.get("version") == 4, "table 4 over wss")
    assert state["url"] == cp.url.replace("https://", "wss://") + "/v1/stream"
    assert state["connected"] is True
    assert cp.authorizations == ["Bearer t0k"]


async def test_a_wrong_ca_fails_the_stream_with_a_certificate_error(
    stand_in: Callable[..., Awaitable[StandIn]], make_mesh: MakeMesh, tmp_path: Path, pki: Pki
) -> None:
    cp = await stand_in(tls=pki.server)
    mesh = await sidecar(make_mesh, tmp_path, cp.url, ca_file=str(pki.other_ca_file))
    state = await until(mesh, lambda s: bool(s.get("last_error")), "a failed connect")
    assert state["connected"] is False
    assert state["last_error"].startswith("the control plane's TLS certificate is not trusted")
    assert "certificate verify failed" in state["last_error"]
    assert "--ca-file" in state["last_error"]
    assert cp.authorizations == []  # the token never left over an untrusted connection


async def test_without_a_ca_file_the_system_store_does_not_trust_a_private_ca(
    stand_in: Callable[..., Awaitable[StandIn]], make_mesh: MakeMesh, tmp_path: Path, pki: Pki
) -> None:
    cp = await stand_in(tls=pki.server)
    mesh = await sidecar(make_mesh, tmp_path, cp.url, token="t0k")
    state = await until(mesh, lambda s: bool(s.get("last_error")), "a failed connect")
    assert "certificate verify failed" in state["last_error"]
    assert cp.authorizations == []


@pytest.mark.parametrize(
    ("code", "reason", "says"),
    [
        (4401, "token revoked", "4401 (unauthorized: the token is missing, wrong or revoked)"),
        (4403, "service catalog", "4403 (forbidden: the token may not speak for this service"),
        (4409, "owned by node n2", "4409 (the instance is owned by another live stream)"),
        (4400, "instance.port: required", "4400 (bad hello)"),
    ],
)
async def test_a_refusal_names_its_code_and_the_sidecar_keeps_trying(
    stand_in: Callable[..., Awaitable[StandIn]],
    make_mesh: MakeMesh,
    tmp_path: Path,
    code: int,
    reason: str,
    says: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cp = await stand_in(close_before=(code, reason))
    mesh = await sidecar(make_mesh, tmp_path, cp.url, token="t")
    state = await until(mesh, lambda s: bool(s.get("last_error")), "refused")
    assert state["last_error"].startswith(f"the control plane refused the stream with {says}")
    assert state["last_error"].endswith(f": {reason}")
    assert state["connected"] is False
    for _ in range(250):  # it reconnects with the backoff
        if len(cp.authorizations) >= 3:
            break
        await asyncio.sleep(0.02)
    assert len(cp.authorizations) >= 3
    logged = [r.getMessage() for r in caplog.records if r.name == "meshlet.discovery"]
    assert any(f"refused the stream with {code}" in m and "retrying in" in m for m in logged)


async def test_a_token_revoked_mid_stream_is_said_plainly(
    stand_in: Callable[..., Awaitable[StandIn]], make_mesh: MakeMesh, tmp_path: Path
) -> None:
    cp = await stand_in(close_after=(4401, "token revoked"))
    mesh = await sidecar(make_mesh, tmp_path, cp.url, token="t")
    state = await until(mesh, lambda s: bool(s.get("last_error")), "closed after the table")
    assert state["version"] == 4  # it had the table; it keeps serving it
    assert state["last_error"] == (
        "the control plane refused the stream with 4401 "
        "(unauthorized: the token is missing, wrong or revoked): token revoked"
    )


@pytest.mark.parametrize(
    ("status", "says"),
    [
        (401, "refused the stream with HTTP 401 (the token is missing or wrong)"),
        (403, "refused the stream with HTTP 403 (the token may not do this)"),
        (404, "answered HTTP 404 instead of opening the stream"),
    ],
)
async def test_a_refused_upgrade_names_its_status(
    stand_in: Callable[..., Awaitable[StandIn]],
    make_mesh: MakeMesh,
    tmp_path: Path,
    status: int,
    says: str,
) -> None:
    cp = await stand_in(refuse_http=status)
    mesh = await sidecar(make_mesh, tmp_path, cp.url, token="t")
    state = await until(mesh, lambda s: bool(s.get("last_error")), "refused")
    assert state["last_error"] == f"the control plane {says}"


E1 = parse_table(
    {
        "services": {"a": {"endpoints": [{"address": "10.0.0.1", "port": 80}]}},
        "version": 4,
        "epoch": "e1",
    }
)


async def metric(mesh: Mesh, name: str) -> float:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{LOCAL}:{mesh.metrics}/metrics") as r,
    ):
        for line in (await r.text()).splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    raise AssertionError(f"no {name}")


async def two_stand_ins_and_a_sidecar(
    stand_in: Callable[..., Awaitable[StandIn]],
    make_mesh: MakeMesh,
    tmp_path: Path,
    second: Table,
) -> tuple[Mesh, StandIn, StandIn]:
    """A sidecar given two stand-ins, at table ``E1`` from the one its stream is on
    (returned first; either, as its start is random) and ``second`` at the other."""
    a, b = await stand_in(table=E1), await stand_in(table=E1)
    mesh = await sidecar(make_mesh, tmp_path, f"{a.url}, {b.url}")
    state = await until(mesh, lambda s: s.get("version") == 4, "table 4 applied")
    assert state["targets"] == [a.url, b.url]
    on = state["connected_to"]
    first, other = (a, b) if on["url"] == a.url else (b, a)
    other.table = second
    assert on == {"url": first.url, "address": LOCAL}
    assert state["failovers"] == 0
    assert (first.hellos[0].version, first.hellos[0].epoch, first.pushed) == (0, "", 1)
    return mesh, first, other


async def test_a_dropped_stream_moves_to_the_other_replica_which_sends_nothing_at_its_version(
    stand_in: Callable[..., Awaitable[StandIn]], make_mesh: MakeMesh, tmp_path: Path
) -> None:
    mesh, first, other = await two_stand_ins_and_a_sidecar(stand_in, make_mesh, tmp_path, E1)
    await first.drop()
    state = await until(
        mesh, lambda s: (s["connected_to"] or {}).get("url") == other.url, "on the other"
    )
    assert len(first.hellos) == 1  # it moved at once: no retry of the replica that went away
    (hello,) = other.hellos
    assert (hello.version, hello.epoch) == (4, "e1")  # its history went with it
    assert other.pushed == 0  # so a replica at that version had nothing to send
    assert (state["version"], state["failovers"], state["last_error"]) == (4, 1, None)
    assert await metric(mesh, "meshlet_control_plane_failovers_total") == 1


async def test_a_replica_of_another_history_replaces_the_table_whatever_its_version(
    stand_in: Callable[..., Awaitable[StandIn]], make_mesh: MakeMesh, tmp_path: Path
) -> None:
    older = parse_table({**to_json(E1), "version": 2, "epoch": "e2"})
    mesh, first, other = await two_stand_ins_and_a_sidecar(stand_in, make_mesh, tmp_path, older)
    await first.drop()
    state = await until(mesh, lambda s: s.get("version") == 2, "the other history's table")
    (hello,) = other.hellos
    assert (hello.version, hello.epoch) == (4, "e1")
    assert other.pushed == 1
    assert state["connected_to"]["url"] == other.url
    assert mesh.sidecar.tables.current is not None
    assert mesh.sidecar.tables.current.table.epoch == "e2"


async def test_a_name_with_two_addresses_is_two_replicas_named_by_it(
    stand_in: Callable[..., Awaitable[StandIn]], tmp_path: Path
) -> None:
    """``cp.test`` stands for 127.0.0.1 and 127.0.0.2 (the resolver is the test's; the
    connections are real): the stream connects to an address and says the name in Host."""
    a = await stand_in(table=E1)
    port = int(a.url.rpartition(":")[2])
    b = await stand_in(table=E1, host="127.0.0.2", port=port)
    url = f"http://cp.test:{port}"

    async def resolve(name: str) -> list[Replica]:
        assert name == url
        return [Replica(url, "127.0.0.1"), Replica(url, "127.0.0.2")]

    holder = TableHolder(Pools())
    discovery = Discovery(
        control_planes=[url],
        token="",
        service="a",
        registration=Registration(address=LOCAL, port=1),
        tables=holder,
        state_path=tmp_path / "a.table",
        failover=Failover(Backoff(), random.Random(1)),
        resolver=resolve,
    )
    async with asyncio.TaskGroup() as tasks:
        running = tasks.create_task(discovery.run())
        for _ in range(500):
            if discovery.connected and discovery.version == 4:
                break
            await asyncio.sleep(0.02)
        assert discovery.replica is not None
        first, other = (a, b) if discovery.replica.address == "127.0.0.1" else (b, a)
        await first.drop()
        for _ in range(500):
            if other.hellos and discovery.connected:
                break
            await asyncio.sleep(0.02)
        assert discovery.replica == Replica(url, "127.0.0.2" if other is b else "127.0.0.1")
        assert first.hosts == other.hosts == [f"cp.test:{port}"]
        assert (other.hellos[0].version, other.pushed) == (4, 0)
        assert discovery.failover.failovers == 1
        running.cancel()


async def test_a_name_that_does_not_resolve_is_skipped_for_the_others(
    stand_in: Callable[..., Awaitable[StandIn]],
    make_mesh: MakeMesh,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cp = await stand_in()
    gone = "http://no-such-host.invalid:7070"
    mesh = await sidecar(make_mesh, tmp_path, f"{gone},{cp.url}")
    state = await until(mesh, lambda s: s.get("version") == 4, "table 4 from the one that is")
    assert state["targets"] == [gone, cp.url]
    assert state["connected_to"] == {"url": cp.url, "address": LOCAL}
    logged = [r.getMessage() for r in caplog.records if r.name == "meshlet.discovery"]
    assert any(f"control plane {gone}: its host name does not resolve" in m for m in logged)
