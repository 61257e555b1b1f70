"""Who may call what (issue 10), in-process: every /v1 route by token, service tokens, owned
instances, addresses nobody should route to, registry limits. The same attacks against real
processes are in tests/integration/test_security.py."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from control_plane import api as api_module
from control_plane.access import Access
from control_plane.store_memory import MemoryStore
from control_plane.store_sqlite import SqliteStore
from control_plane.wire import Deregister, Heartbeat, Hello, Registration, Welcome, decode, encode
from tests.conftest import ADMIN, Api, MakeApi
from tests.control_plane.test_metrics import scrape

JOIN = "test-join-token"
CATALOG = "/v1/services/catalog"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def call(api: Api, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
    async with api.request(method, path, json=body, headers=bearer(token)) as r:
        data = await r.json() if r.status != 204 and r.content_type == "application/json" else None
        return r.status, data


@pytest.fixture
async def cp(make_api: MakeApi) -> Api:
    """A control plane with an admin and a join token; its client sends no token itself."""
    return await make_api(join_token=JOIN, token="", debounce_quiet=0.05)


async def mint(api: Api, service: str, description: str = "") -> tuple[str, str]:
    status, body = await call(
        api, "POST", "/v1/tokens", ADMIN, {"service": service, "description": description}
    )
    assert status == 201, body
    return body["id"], body["secret"]


async def register(api: Api, token: str, instance_id: str = "c1", **body: Any) -> int:
    doc = {"id": instance_id, "address": "10.0.0.1", "port": 8080, **body}
    status, _ = await call(api, "POST", f"{CATALOG}/instances", token, doc)
    return status


# -- every route, every kind of caller -------------------------------------------------------

BODIES: dict[tuple[str, str], Any] = {
    ("POST", "/v1/tokens"): {"service": "catalog"},
    ("PUT", "/v1/services/{service}/policy"): {"lb": "random"},
    ("POST", "/v1/services/{service}/instances"): {"id": "c1", "address": "10.0.0.1", "port": 80},
    ("PATCH", "/v1/services/{service}/instances/{id}"): {"weight": 3},
    ("POST", "/v1/services/{service}/locks/{name}"): {"ttl_ms": 1000},
    ("PUT", "/v1/services/{service}/locks/{name}/renew"): {"token": 1, "ttl_ms": 1000},
    ("DELETE", "/v1/services/{service}/locks/{name}"): {"token": 1},
    ("PUT", "/v1/lock-grants/{name}"): {"services": ["catalog"]},
    ("POST", "/v1/trust-bundle"): {"pem": "not a certificate"},
}


async def test_every_v1_route_needs_a_token_that_may_make_the_call(cp: Api) -> None:
    _, catalog = await mint(cp, "catalog")
    _, other = await mint(cp, "payments")
    assert await register(cp, ADMIN) == 201
    callers = {"none": "", "unknown": "mlt_nope", "join": JOIN, "catalog": catalog, "other": other}
    for method, template, _, access in api_module._ROUTES:
        if access is Access.OPEN or template == "/v1/stream":
            continue
        path = template.replace("{service}", "catalog").replace("{id}", "c1")
        path = path.replace("{name}", "job").replace("{sha256}", "ab" * 32)
        body = BODIES.get((method, template))
        for who, token in callers.items():
            status, data = await call(cp, method, path, token, body)
            allowed = access is Access.INSTANCE and who in ("join", "catalog")
            expected = 401 if who in ("none", "unknown") else None if allowed else 403
            if expected is None:
                assert status not in (401, 403), (method, path, who, data)
                if method == "DELETE" and "/instances/" in template:  # back for the next caller
                    assert await register(cp, ADMIN) in (200, 201)
            else:
                assert status == expected, (method, path, who, data)
                assert data["error"], data
    samples = await scrape(cp)
    assert samples['meshlet_api_refusals_total{status="401"}'] > 0
    assert samples['meshlet_api_refusals_total{status="403"}'] > 0


async def test_probes_metrics_and_the_spec_stay_open(cp: Api) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        async with cp.get(path) as r:
            assert r.status == 200, path


async def test_with_no_token_configured_the_api_is_open_but_mints_none(make_api: MakeApi) -> None:
    api = await make_api(admin_token="", token="")
    assert (await call(api, "GET", "/v1/services", ""))[0] == 200
    assert await register(api, "") == 201
    status, body = await call(api, "POST", "/v1/tokens", "", {"service": "catalog"})
    assert status == 409
    assert "--admin-token" in body["error"]


async def test_a_join_token_alone_administers_nothing(make_api: MakeApi) -> None:
    api = await make_api(admin_token="", join_token=JOIN, token="")
    assert await register(api, JOIN) == 201
    assert (await call(api, "PUT", f"{CATALOG}/instances/c1/heartbeat", JOIN))[0] == 200
    for method, path in (("GET", "/v1/services"), ("PUT", f"{CATALOG}/policy")):
        assert (await call(api, method, path, JOIN, {}))[0] == 403
    assert (await call(api, "GET", "/v1/services", ""))[0] == 401


# -- service tokens ----------------------------------------------------------------------------


async def test_a_token_is_minted_listed_used_and_revoked(cp: Api) -> None:
    token_id, secret = await mint(cp, "catalog", "catalog pods in prod")
    assert secret.startswith("mlt_")
    assert len(secret) > 40
    _status, listing = await call(cp, "GET", "/v1/tokens", ADMIN)
    (row,) = listing["tokens"]
    assert row == {
        "id": token_id,
        "service": "catalog",
        "description": "catalog pods in prod",
        "created": row["created"],
        "last_used": None,
    }
    assert secret not in str(listing)
    assert await register(cp, secret) == 201
    (row,) = (await call(cp, "GET", "/v1/tokens", ADMIN))[1]["tokens"]
    assert row["last_used"] is not None
    assert (await call(cp, "DELETE", f"/v1/tokens/{token_id}", ADMIN))[0] == 204
    assert (await call(cp, "PUT", f"{CATALOG}/instances/c1/heartbeat", secret))[0] == 401
    assert (await call(cp, "DELETE", f"/v1/tokens/{token_id}", ADMIN))[0] == 404
    assert (await call(cp, "GET", "/v1/tokens", ADMIN))[1] == {"tokens": []}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "service"),
        ({"service": "Not A Label"}, "service"),
        ({"service": "a", "description": "two\nlines"}, "description"),
        ({"service": "a", "description": "x" * 257}, "description"),
        ({"service": "a", "secret": "mine"}, "secret"),
    ],
)
async def test_a_bad_token_request_names_its_field(cp: Api, body: Any, field: str) -> None:
    status, data = await call(cp, "POST", "/v1/tokens", ADMIN, body)
    assert (status, data["field"]) == (400, field)


async def test_secrets_are_stored_as_digests_and_last_use_survives_a_restart(
    make_api: MakeApi, tmp_path: Path
) -> None:
    path = tmp_path / "tokens.db"
    api = await make_api(store=SqliteStore(str(path)), token="")
    token_id, secret = await mint(api, "catalog")
    assert await register(api, secret) == 201
    await api.app[api_module.TOKENS].flush()
    await api.close()
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT id, digest, last_used FROM tokens").fetchall()
        dump = "\n".join(db.iterdump())
    assert secret not in dump
    ((stored_id, digest, last_used),) = rows
    assert (stored_id, len(digest)) == (token_id, 64)
    assert last_used is not None
    again = await make_api(store=SqliteStore(str(path)), token="")
    (row,) = (await call(again, "GET", "/v1/tokens", ADMIN))[1]["tokens"]
    assert row["last_used"] is not None
    assert (await call(again, "PUT", f"{CATALOG}/instances/c1/heartbeat", secret))[0] == 200


# -- the stream --------------------------------------------------------------------------------


def hello(node: str, instance: str = "c1", service: str = "catalog", **reg: Any) -> Hello:
    registration = Registration(**{"address": "10.0.0.1", "port": 8080, "id": instance, **reg})
    return Hello(node, service, registration)


async def open_stream(api: Api, token: str, h: Hello) -> aiohttp.ClientWebSocketResponse:
    ws = await api.ws_connect("/v1/stream", headers=bearer(token))
    await ws.send_str(encode(h))
    return ws


async def welcomed(api: Api, token: str, h: Hello) -> aiohttp.ClientWebSocketResponse:
    ws = await open_stream(api, token, h)
    assert isinstance(decode((await ws.receive()).data), Welcome)
    return ws


async def refused(api: Api, token: str, h: Hello) -> tuple[int | None, str]:
    ws = await open_stream(api, token, h)
    async with asyncio.timeout(3):
        msg = await ws.receive()
    assert msg.type is aiohttp.WSMsgType.CLOSE, msg
    return ws.close_code, str(msg.extra)


async def instance(api: Api, instance_id: str = "c1") -> dict[str, Any]:
    status, body = await call(api, "GET", f"{CATALOG}/instances/{instance_id}", ADMIN)
    assert status == 200, body
    result: dict[str, Any] = body
    return result


async def test_a_service_token_opens_the_stream_for_its_service_only(cp: Api) -> None:
    _, payments = await mint(cp, "payments")
    code, why = await refused(cp, payments, hello("p-node"))
    assert code == 4403
    assert "payments" in why
    assert (await call(cp, "GET", "/v1/services", ADMIN))[1]["services"] == []
    ws = await welcomed(cp, payments, hello("p-node", service="payments"))
    await ws.close()
    with pytest.raises(aiohttp.WSServerHandshakeError) as unknown:
        await cp.ws_connect("/v1/stream", headers=bearer("mlt_nope"))
    assert unknown.value.status == 401


async def test_an_instance_owned_by_a_live_stream_cannot_be_taken(
    cp: Api, caplog: pytest.LogCaptureFixture
) -> None:
    _, catalog = await mint(cp, "catalog")
    owner = await welcomed(cp, catalog, hello("real-node"))
    await owner.send_str(encode(Heartbeat()))
    before = await instance(cp)
    attack = hello("evil-node", address="10.9.9.9", weight=10_000)
    with caplog.at_level(logging.WARNING, "meshlet.publisher"):
        for token in (JOIN, catalog, JOIN):
            code, why = await refused(cp, token, attack)
            assert code == 4409
            assert "real-node" in why
    assert await instance(cp) == before
    assert len([r for r in caplog.records if "evil-node refused" in r.getMessage()]) == 1
    samples = await scrape(cp)
    assert samples['meshlet_stream_refusals_total{reason="owned"}'] == 3
    # its own node, with its own token, may reconnect (a sidecar whose stream broke)
    again = await welcomed(cp, catalog, hello("real-node"))
    await again.close()
    await owner.close()


async def test_what_the_admin_registered_only_the_admin_may_change(cp: Api) -> None:
    """The attack: a join-token stream said hello for the admin's catalog-1 with the metadata
    address and weight 10000, and later deregistered it."""
    assert await register(cp, ADMIN) == 201
    before = await instance(cp)
    _, catalog = await mint(cp, "catalog")
    attack = hello("evil-node", address="10.9.9.9", weight=10_000)
    for token in (JOIN, catalog):
        code, why = await refused(cp, token, attack)
        assert code == 4409
        assert "registered by the admin" in why
        assert await register(cp, token, address="10.9.9.9") == 409
        assert (await call(cp, "DELETE", f"{CATALOG}/instances/c1", token))[0] == 409
        assert await register(cp, token) == 200  # the same again (an app's restart) is no change
        assert (await call(cp, "PUT", f"{CATALOG}/instances/c1/heartbeat", token))[0] == 200
    assert await instance(cp) == {
        **before,
        "last_heartbeat": (await instance(cp))["last_heartbeat"],
    }
    samples = await scrape(cp)
    assert samples['meshlet_stream_refusals_total{reason="admin"}'] == 2
    ws = await welcomed(cp, ADMIN, hello("admin-node", address="10.0.0.2"))  # the admin may
    assert (await instance(cp))["address"] == "10.0.0.2"
    await ws.close()


async def test_a_stream_cannot_take_an_instance_registered_over_rest(cp: Api) -> None:
    _, catalog = await mint(cp, "catalog")
    assert await register(cp, catalog) == 201  # an app without a sidecar registers itself
    before = await instance(cp)
    code, why = await refused(cp, JOIN, hello("evil-node", address="10.9.9.9"))
    assert code == 4409
    assert "registered over REST" in why
    assert await instance(cp) == before
    assert await register(cp, catalog, weight=5) == 200  # its own service's token may change it
    assert (await call(cp, "DELETE", f"{CATALOG}/instances/c1", catalog))[0] == 204


async def test_rest_calls_cannot_change_or_remove_an_instance_a_stream_owns(cp: Api) -> None:
    _, catalog = await mint(cp, "catalog")
    ws = await welcomed(cp, catalog, hello("real-node"))
    assert await register(cp, catalog, address="10.9.9.9") == 409
    assert await register(cp, JOIN, weight=10_000) == 409
    assert (await call(cp, "DELETE", f"{CATALOG}/instances/c1", JOIN))[0] == 409
    assert (await instance(cp))["address"] == "10.0.0.1"
    assert (await call(cp, "PUT", f"{CATALOG}/instances/c1/heartbeat", JOIN))[0] == 200
    assert (await call(cp, "DELETE", f"{CATALOG}/instances/c1", ADMIN))[0] == 204
    await ws.close()


async def test_a_stream_deregisters_only_what_it_still_owns(cp: Api) -> None:
    _, catalog = await mint(cp, "catalog")
    old = await welcomed(cp, catalog, hello("node-1"))
    new = await welcomed(cp, catalog, hello("node-1"))  # the same sidecar, reconnected
    await old.send_str(encode(Deregister()))
    await asyncio.sleep(0.2)
    assert (await instance(cp))["status"] == "healthy"
    await new.send_str(encode(Deregister()))
    for _ in range(100):
        if (await call(cp, "GET", f"{CATALOG}/instances/c1", ADMIN))[0] == 404:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("its own deregister did not remove the instance")
    await old.close()
    await new.close()


async def test_revoking_a_token_closes_its_streams_at_once(cp: Api) -> None:
    token_id, catalog = await mint(cp, "catalog")
    ws = await welcomed(cp, catalog, hello("node-1"))

    async def until_closed() -> aiohttp.WSMessage:  # reading all along, as a sidecar does
        while (msg := await ws.receive()).type is aiohttp.WSMsgType.TEXT:
            pass  # tables
        return msg

    closed = asyncio.create_task(until_closed())
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await call(cp, "DELETE", f"/v1/tokens/{token_id}", ADMIN))[0] == 204
    async with asyncio.timeout(1):
        msg = await closed
    assert loop.time() - started < 1.0
    assert msg.type is aiohttp.WSMsgType.CLOSE
    assert ws.close_code == 4401
    with pytest.raises(aiohttp.WSServerHandshakeError) as again:
        await cp.ws_connect("/v1/stream", headers=bearer(catalog))
    assert again.value.status == 401


# -- addresses and limits ------------------------------------------------------------------------

BAD_ADDRESSES = [
    "0.0.0.0",
    "::",
    "0.1.2.3",
    "224.0.0.1",
    "ff02::1",
    "255.255.255.255",
    "169.254.169.254",
    "::ffff:169.254.169.254",
    "fe80::1%eth0",
    "fe80::1%" + "x" * 900_000,
    "fe80::1%\n2026-11-29T00:00:00 ERROR meshlet.api: FORGED LINE",
    "fe80::1%a\x00b",
    "fe80::1%\x1b[31mred",
]


@pytest.mark.parametrize("address", BAD_ADDRESSES)
async def test_addresses_nobody_should_route_to_are_refused(cp: Api, address: str) -> None:
    status, body = await call(
        cp, "POST", f"{CATALOG}/instances", JOIN, {"address": address, "port": 80, "id": "c1"}
    )
    assert status in (400, 413), body
    if status == 400:
        assert body["field"] == "address"
        assert "\n" not in body["error"]
        assert "\x1b" not in body["error"]
    if len(address) < 200:  # a 900 KB hello is over the stream's message limit: 1009
        code, _ = await refused(cp, JOIN, hello("n", address=address))
        assert code in (4400, 1009)
    assert (await call(cp, "GET", "/v1/services", ADMIN))[1]["services"] == []


async def test_loopback_only_for_a_control_plane_on_loopback(make_api: MakeApi) -> None:
    local = await make_api(token=ADMIN)  # listens on 127.0.0.1 by default
    assert await register(local, ADMIN, address="127.0.0.1") == 201
    for config in ({"host": "10.0.0.5"}, {"host": "0.0.0.0"}):
        remote = await make_api(store=MemoryStore(), token="", **config)
        status, body = await call(
            remote, "POST", f"{CATALOG}/instances", ADMIN, {"address": "127.0.0.1", "port": 80}
        )
        assert (status, body["field"]) == (400, "address")
        assert "--allow-loopback" in body["error"]
        assert await register(remote, ADMIN, address="localhost") == 400
    allowed = await make_api(store=MemoryStore(), token="", host="0.0.0.0", allow_loopback=True)
    assert await register(allowed, ADMIN, address="::1") == 201


async def test_registry_limits_refuse_with_a_409(make_api: MakeApi) -> None:
    api = await make_api(token="", max_instances=3, max_instances_per_service=2)
    assert [await register(api, ADMIN, f"c{n}", port=8000 + n) for n in range(3)] == [
        201,
        201,
        409,
    ]
    assert await register(api, ADMIN, "c1", weight=5) == 200  # an update needs no room
    body = {"address": "10.0.0.1", "port": 80, "id": "p1"}
    assert (await call(api, "POST", "/v1/services/payments/instances", ADMIN, body))[0] == 201
    status, data = await call(api, "POST", "/v1/services/orders/instances", ADMIN, body)
    assert status == 409
    assert "--max-instances" in data["error"]
    code, _ = await refused(api, ADMIN, hello("n", service="orders"))
    assert code == 4409


# -- what clients send that is not even valid -------------------------------------------------


async def test_a_lone_surrogate_is_refused_naming_its_field(cp: Api) -> None:
    raw = b'{"id": "c1", "address": "10.0.0.1", "port": 80, "metadata": {"k": "a\\ud800"}}'
    async with cp.post(
        f"{CATALOG}/instances",
        data=raw,
        headers={**bearer(ADMIN), "Content-Type": "application/json"},
    ) as r:
        assert r.status == 400
        assert (await r.json())["field"] == "metadata.k"
    async with cp.post(  # a proper pair is an emoji, and welcome
        f"{CATALOG}/instances",
        data=raw.replace(b"\\ud800", b"\\ud83d\\ude00"),
        headers={**bearer(ADMIN), "Content-Type": "application/json"},
    ) as r:
        assert r.status == 201
        assert (await r.json())["metadata"] == {"k": "a\U0001f600"}
    ws = await cp.ws_connect("/v1/stream", headers=bearer(ADMIN))
    hello_text = encode(hello("n1", "c2")).replace('"zone":null', '"zone":"\\udc00"')
    await ws.send_str(hello_text)
    async with asyncio.timeout(3):
        msg = await ws.receive()
    assert (msg.type, ws.close_code) == (aiohttp.WSMsgType.CLOSE, 4400)
    assert "instance.zone" in str(msg.extra)


async def test_junk_on_a_stream_is_counted_and_logged_a_few_times(
    cp: Api, caplog: pytest.LogCaptureFixture
) -> None:
    ws = await welcomed(cp, ADMIN, hello("noisy"))
    with caplog.at_level(logging.WARNING, "meshlet.publisher"):
        for n in range(200):
            await ws.send_str("junk" if n % 2 else '{"type": "nack", "version": 1, "error": "x"}')
        await ws.send_str(encode(Heartbeat()))
        for _ in range(100):
            samples = await scrape(cp)
            if samples["meshlet_stream_bad_messages_total"] == 100:
                break
            await asyncio.sleep(0.02)
    assert samples["meshlet_stream_bad_messages_total"] == 100
    assert samples["meshlet_nacks_total"] == 100
    lines = [r.getMessage() for r in caplog.records if "sidecar noisy" in r.getMessage()]
    assert 1 <= len(lines) <= 5, lines
    await ws.close()
