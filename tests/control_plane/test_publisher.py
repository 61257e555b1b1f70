"""The push stream in-process: hello and welcome, versions, debounce, ACK/NACK, tokens."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
from typing import Any

import aiohttp
import pytest

from control_plane import api as api_module
from control_plane.clock import FakeClock
from control_plane.publisher import Publisher
from control_plane.store_memory import MemoryStore
from control_plane.wire import (
    Ack,
    Deregister,
    Heartbeat,
    Hello,
    Nack,
    Registration,
    Table,
    Welcome,
    decode,
    encode,
)
from tests.conftest import ADMIN, Api, MakeApi


def hello(n: int = 1, service: str = "svc", version: int = 0, **kw: Any) -> Hello:
    reg = Registration(address="10.0.0.1", port=9000 + n, id=f"i{n}")
    return Hello(f"node-{n}", service, reg, version, **kw)


class Sidecar:
    """A minimal stream client, as a sidecar's discovery speaks it."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, welcome: Welcome) -> None:
        self.ws = ws
        self.welcome = welcome

    async def next_table(self) -> Table:
        async with asyncio.timeout(3):
            msg = await self.ws.receive()
        table = decode(msg.data)
        assert isinstance(table, Table), table
        return table

    async def send(self, message: Any) -> None:
        await self.ws.send_str(encode(message))

    async def no_table(self, within: float) -> None:
        try:
            async with asyncio.timeout(within):
                msg = await self.ws.receive()
        except TimeoutError:
            return
        raise AssertionError(f"unexpected message: {msg.data}")


@pytest.fixture
async def cp(make_api: MakeApi) -> Api:
    return await make_api(store=MemoryStore(), debounce_quiet=0.05, debounce_max=0.5)


async def connect(api: Api, h: Hello, token: str = "") -> Sidecar:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    ws = await api.ws_connect("/v1/stream", headers=headers)
    await ws.send_str(encode(h))
    welcome = decode((await ws.receive()).data)
    assert isinstance(welcome, Welcome)
    return Sidecar(ws, welcome)


def publisher(api: Api) -> Publisher:
    return api.app[api_module.PUBLISHER]  # type: ignore[no-any-return]


async def test_hello_registers_and_the_table_follows(cp: Api) -> None:
    a = await connect(cp, hello(1, "a"))
    assert a.welcome.instance == "i1"
    first = await a.next_table()
    if "a" not in first.services:  # the empty start table, then the one with us in it
        first = await a.next_table()
    (endpoint,) = first.services["a"].endpoints
    assert (endpoint.address, endpoint.port, endpoint.instance) == ("10.0.0.1", 9001, "i1")
    await a.send(Ack(first.version))
    b = await connect(cp, hello(2, "b"))
    for side in (a, b):
        table = await side.next_table()
        while "b" not in table.services:
            table = await side.next_table()
        await side.send(Ack(table.version))
    await asyncio.sleep(0.1)
    async with cp.get("/v1/sidecars") as r:
        sidecars = (await r.json())["sidecars"]
    assert [(s["node"], s["acked_version"]) for s in sidecars] == [
        ("node-1", table.version),
        ("node-2", table.version),
    ]
    async with cp.get("/v1/table") as r:
        document = await r.json()
    assert document["version"] == table.version
    # no instance said a namespace: the key is left out, for sidecars that predate it
    assert all("namespace" not in e for s in document["services"].values() for e in s["endpoints"])


async def test_a_sidecar_at_the_current_version_gets_nothing(cp: Api) -> None:
    a = await connect(cp, hello(1))
    table = await a.next_table()
    while "svc" not in table.services:
        table = await a.next_table()
    await a.ws.close()
    again = await connect(cp, hello(1, version=table.version, epoch=table.epoch))
    assert again.welcome.epoch == table.epoch
    await again.no_table(within=0.5)
    await again.ws.close()
    # a table from another history (the store was reset) is replaced whatever its version
    for other in (
        hello(1, version=table.version, epoch="elsewhere"),
        hello(1, version=table.version + 50, epoch=table.epoch),
    ):
        side = await connect(cp, other)
        assert (await side.next_table()).version == table.version
        await side.ws.close()


async def test_changes_are_debounced_into_one_table(cp: Api) -> None:
    a = await connect(cp, hello(1))
    table = await a.next_table()
    while "svc" not in table.services:
        table = await a.next_table()
    start = table.version
    for n in range(20):  # a burst of changes, all inside the quiet window
        async with cp.patch("/v1/services/svc/instances/i1", json={"weight": 1 + n}) as r:
            assert r.status == 200
    table = await a.next_table()
    assert table.version == start + 1
    assert table.services["svc"].endpoints[0].weight == 20
    await a.no_table(within=0.3)


async def test_closing_the_stream_makes_the_instance_unhealthy_at_once(cp: Api) -> None:
    a = await connect(cp, hello(1, "a"))
    b = await connect(cp, hello(2, "b"))
    await b.ws.close()
    async with asyncio.timeout(3):
        while True:
            table = await a.next_table()
            if "b" in table.services and not table.services["b"].endpoints:
                break
    async with cp.get("/v1/services/b/instances/i2") as r:
        assert (await r.json())["status"] == "unhealthy"


async def test_heartbeats_carry_app_health(cp: Api) -> None:
    a = await connect(cp, hello(1))
    await a.send(Heartbeat("unhealthy"))
    await asyncio.sleep(0.05)
    async with cp.get("/v1/services/svc/instances/i1") as r:
        assert (await r.json())["status"] == "unhealthy"
    await a.send(Heartbeat("healthy"))
    await asyncio.sleep(0.05)
    async with cp.get("/v1/services/svc/instances/i1") as r:
        assert (await r.json())["status"] == "healthy"


async def test_an_instance_deleted_while_connected_comes_back_with_its_apps_health(
    cp: Api,
) -> None:
    a = await connect(cp, hello(1))
    async with cp.delete("/v1/services/svc/instances/i1") as r:
        assert r.status == 204
    await a.send(Heartbeat("unhealthy"))
    await asyncio.sleep(0.05)
    async with cp.get("/v1/services/svc/instances/i1") as r:
        assert (await r.json())["status"] == "unhealthy"  # not routed while its app is not


async def test_nack_is_recorded_and_deregister_removes(cp: Api) -> None:
    a = await connect(cp, hello(1))
    await a.send(Nack(7, "endpoint port out of range"))
    await asyncio.sleep(0.05)
    async with cp.get("/v1/sidecars") as r:
        (sidecar,) = (await r.json())["sidecars"]
    assert sidecar["last_nack"] == "version 7: endpoint port out of range"
    await a.send(Deregister())
    await asyncio.sleep(0.05)
    async with cp.get("/v1/services/svc/instances/i1") as r:
        assert r.status == 404


async def test_versions_survive_a_restart_and_stay_when_nothing_changed(
    make_api: MakeApi, clock: FakeClock
) -> None:
    store = MemoryStore()
    first = await make_api(store=store, debounce_quiet=0.05)
    built = clock.time()
    async with first.post(
        "/v1/services/svc/instances", json={"id": "i1", "address": "10.0.0.1", "port": 1}
    ) as r:
        assert r.status == 201
    await asyncio.sleep(0.2)
    version = publisher(first).version
    assert version >= 2
    await first.close()
    clock.advance(86_400)
    second = await make_api(store=store, debounce_quiet=0.05)
    assert publisher(second).version == version  # same content: same version
    table = decode(publisher(second).payload)
    assert isinstance(table, Table)
    assert table.built == built  # and as old as it was: the day in between counts
    async with second.post(
        "/v1/services/svc/instances", json={"id": "i2", "address": "10.0.0.2", "port": 1}
    ) as r:
        assert r.status == 201
    await asyncio.sleep(0.2)
    assert publisher(second).version == version + 1


@pytest.mark.parametrize(
    ("first", "close_code"),
    [
        ('{"type": "heartbeat"}', 4400),
        ("not json", 4400),
        ('{"type": "hello", "node": "n", "service": "Bad_Name", "instance": {}}', 4400),
    ],
)
async def test_a_bad_hello_closes_the_stream(cp: Api, first: str, close_code: int) -> None:
    ws = await cp.ws_connect("/v1/stream")
    await ws.send_str(first)
    msg = await ws.receive()
    assert msg.type is aiohttp.WSMsgType.CLOSE
    assert ws.close_code == close_code


async def raw_stream_client(port: int, first: str) -> asyncio.StreamWriter:
    """A WebSocket client that sends one text frame and then never reads: a stuck sidecar."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /v1/stream HTTP/1.1\r\nHost: cp\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Authorization: Bearer {ADMIN}\r\n"
        f"Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    payload = first.encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert 126 <= len(payload) < 65536
    writer.write(bytes([0x81, 0x80 | 126]) + len(payload).to_bytes(2, "big") + mask + masked)
    await writer.drain()
    return writer


async def test_a_sidecar_that_stops_reading_is_dropped(
    cp: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import control_plane.publisher as pub
    import control_plane.table as table_module

    # the stuck one is cut after SEND_TIMEOUT; the reader beside it must take each 50 MB
    # table within it, on a machine that may be busy (the whole suite on two cores)
    monkeypatch.setattr(pub, "SEND_TIMEOUT", 2.0)
    # tables far larger than the socket buffers, to a sidecar that reads nothing at all
    monkeypatch.setattr(
        table_module, "message", lambda rendered, version, epoch, built: "x" * 50_000_000
    )
    assert cp.port is not None
    stuck = await raw_stream_client(cp.port, encode(hello(1)))
    try:
        reader = await connect(cp, hello(2))  # a healthy sidecar beside it
        async with cp.put("/v1/services/other/policy", json={"retries": 2}) as r:
            assert r.status == 200
        for _ in range(100):
            if len(publisher(cp).sessions) == 1:
                break
            await asyncio.sleep(0.1)
        assert "node-1 took no table for 2s: disconnecting" in caplog.text
        async with cp.get("/v1/services/svc/instances/i1") as r:
            assert (await r.json())["status"] == "unhealthy"
        assert [s.node for s in publisher(cp).sessions.values()] == ["node-2"]
        del reader
    finally:
        stuck.close()


async def test_a_stale_stream_closing_leaves_the_live_one_alone(cp: Api) -> None:
    old = await connect(cp, hello(1))
    new = await connect(cp, hello(1))  # the same instance, reconnected
    await old.ws.close()
    await asyncio.sleep(0.2)
    async with cp.get("/v1/services/svc/instances/i1") as r:
        assert (await r.json())["status"] == "healthy"
    await new.ws.close()
    await asyncio.sleep(0.1)
    async with cp.get("/v1/services/svc/instances/i1") as r:
        assert (await r.json())["status"] == "unhealthy"


async def test_gone_between_hello_and_welcome_is_not_left_healthy(cp: Api) -> None:
    assert cp.port is not None
    stuck = await raw_stream_client(cp.port, encode(hello(1)))
    sock = stuck.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stuck.transport.abort()  # a reset, maybe before the welcome is out
    for _ in range(50):
        async with cp.get("/v1/services/svc/instances/i1") as r:
            body = await r.json()
        if r.status == 200 and body["status"] == "unhealthy":
            break
        await asyncio.sleep(0.05)
    assert body["status"] == "unhealthy"


async def test_a_heartbeat_after_deregister_is_ignored(cp: Api) -> None:
    a = await connect(cp, hello(1))
    await a.send(Deregister())
    await a.send(Heartbeat("healthy"))
    await asyncio.sleep(0.1)
    async with cp.get("/v1/services/svc/instances/i1") as r:
        assert r.status == 404


async def test_a_sidecar_whose_instance_the_admin_drained_comes_back_to_it(
    make_api: MakeApi,
) -> None:
    """A drain keeps who registered the instance: its sidecar's next stream takes it again,
    still draining (it once became a REST instance no stream could take: 4409)."""
    api = await make_api(store=MemoryStore(), join_token="join-secret")
    first = await connect(api, hello(1), token="join-secret")
    assert (await api.patch("/v1/services/svc/instances/i1", json={"status": "draining"})).ok
    await first.ws.close()
    again = await connect(api, hello(1), token="join-secret")
    assert again.welcome.instance == "i1"
    async with api.get("/v1/services/svc/instances/i1") as r:
        assert (await r.json())["status"] == "draining"


async def test_streams_lost_at_once_are_protected(make_api: MakeApi) -> None:
    api = await make_api(store=MemoryStore(), debounce_quiet=0.05)
    sides = [await connect(api, hello(n)) for n in range(10)]
    for side in sides:  # each heartbeats once, as a real sidecar does right after welcome
        await side.send(Heartbeat())
    await asyncio.sleep(0.1)
    for side in sides[:6]:  # six of ten streams reset together: this side is likely cut off
        await side.ws.close()
    await asyncio.sleep(0.3)
    async with api.get("/v1/services/svc/instances") as r:
        statuses = [i["status"] for i in (await r.json())["instances"]]
    assert statuses.count("healthy") >= 8  # at most two lapse before the threshold holds


async def test_a_silent_stream_is_found_by_keepalive(
    cp: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    import control_plane.publisher as pub

    monkeypatch.setattr(pub, "KEEPALIVE", 0.3)
    assert cp.port is not None
    silent = await raw_stream_client(cp.port, encode(hello(1)))  # never answers a ping
    for _ in range(60):
        async with cp.get("/v1/services/svc/instances/i1") as r:
            if (await r.json())["status"] == "unhealthy":
                break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("a silent stream was never dropped")
    silent.close()


async def test_the_publisher_survives_a_failed_build(
    cp: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    import control_plane.table as table_module

    real = table_module.build
    calls = {"n": 0}

    def flaky(registry: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug")
        return real(registry)

    monkeypatch.setattr(table_module, "build", flaky)
    start = publisher(cp).version
    async with cp.put("/v1/services/svc/policy", json={"retries": 3}) as r:
        assert r.status == 200
    for _ in range(60):
        if publisher(cp).version > start:
            break
        await asyncio.sleep(0.05)
    assert publisher(cp).version == start + 1


async def test_shutdown_does_not_wait_for_a_stuck_sidecar(
    cp: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    import control_plane.table as table_module

    monkeypatch.setattr(
        table_module, "message", lambda rendered, version, epoch, built: "x" * 50_000_000
    )
    assert cp.port is not None
    stuck = await raw_stream_client(cp.port, encode(hello(1)))
    async with cp.put("/v1/services/svc/policy", json={"retries": 3}) as r:
        assert r.status == 200
    await asyncio.sleep(0.3)  # a 50 MB table is stuck in its buffer now
    started = asyncio.get_running_loop().time()
    await publisher(cp).close_sessions()
    assert asyncio.get_running_loop().time() - started < 2.0
    stuck.close()
