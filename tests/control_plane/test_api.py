"""The REST API over HTTP: every endpoint, every refusal, tokens, expiry through the API."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control_plane import api as api_module
from control_plane.clock import FakeClock
from control_plane.store_memory import MemoryStore
from tests.conftest import Api, MakeApi

CATALOG = "/v1/services/catalog"


async def call(api: Api, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
    if body is not None:
        kw["json"] = body
    async with api.request(method, path, **kw) as r:
        data = await r.json() if r.status != 204 else None
        if r.status >= 400:
            assert isinstance(data, dict)
            assert r.content_type == "application/json"
            assert set(data) == {"error", "field"}, data
        return r.status, data


async def register(
    api: Api, service: str = "catalog", headers: dict[str, str] | None = None, **body: Any
) -> dict[str, Any]:
    doc = {"address": "10.0.0.1", "port": 8080, **body}
    status, data = await call(
        api, "POST", f"/v1/services/{service}/instances", doc, headers=headers or {}
    )
    assert status in (200, 201), data
    result: dict[str, Any] = data
    return result


# -- happy paths --------------------------------------------------------------------------


async def test_health_and_readiness(api: Api) -> None:
    assert await call(api, "GET", "/healthz") == (200, {"status": "ok"})
    assert await call(api, "GET", "/readyz") == (200, {"status": "ready"})


async def test_register_then_read_everything(api: Api) -> None:
    async with api.post(
        f"{CATALOG}/instances",
        json={
            "id": "c1",
            "address": "10.0.0.1",
            "port": 8081,
            "zone": "a",
            "namespace": "shop",
            "weight": 50,
            "metadata": {"version": "v2"},
        },
    ) as r:
        assert r.status == 201
        assert r.headers["Location"] == f"{CATALOG}/instances/c1"
        created = await r.json()
    assert created == {
        "service": "catalog",
        "id": "c1",
        "address": "10.0.0.1",
        "port": 8081,
        "zone": "a",
        "namespace": "shop",
        "weight": 50,
        "metadata": {"version": "v2"},
        "status": "healthy",
        "last_heartbeat": "2027-01-15T08:00:00.000Z",
    }
    await register(api, id="c2", port=8082)
    await register(api, "frontend", id="f1")

    status, listing = await call(api, "GET", "/v1/services")
    assert status == 200
    assert listing == {
        "services": [
            {
                "name": "catalog",
                "lb": "peak_ewma",
                "instances": {"healthy": 2, "unhealthy": 0, "draining": 0, "total": 2},
            },
            {
                "name": "frontend",
                "lb": "peak_ewma",
                "instances": {"healthy": 1, "unhealthy": 0, "draining": 0, "total": 1},
            },
        ],
        "protection": False,
    }
    status, service = await call(api, "GET", CATALOG)
    assert status == 200
    assert service["policy_set"] is False
    assert service["policy"]["lb"] == "peak_ewma"
    assert [i["id"] for i in service["instances"]] == ["c1", "c2"]
    assert await call(api, "GET", f"{CATALOG}/instances/c1") == (200, created)
    status, instances = await call(api, "GET", f"{CATALOG}/instances")
    assert status == 200
    assert instances["service"] == "catalog"
    assert [i["id"] for i in instances["instances"]] == ["c1", "c2"]


async def test_register_is_idempotent(api: Api) -> None:
    first = await register(api)
    assert first["id"] == "10.0.0.1-8080"
    status, again = await call(
        api, "POST", f"{CATALOG}/instances", {"address": "10.0.0.1", "port": 8080, "weight": 9}
    )
    assert status == 200
    assert again["weight"] == 9
    _, instances = await call(api, "GET", f"{CATALOG}/instances")
    assert len(instances["instances"]) == 1


async def test_policy_put_get_delete(api: Api) -> None:
    status, body = await call(
        api, "PUT", f"{CATALOG}/policy", {"lb": "maglev", "hash_on": "header:x-user"}
    )
    assert status == 200
    assert body["policy_set"] is True
    assert body["policy"]["lb"] == "maglev"
    assert body["policy"]["retries"] == 1  # absent keys take defaults
    status, got = await call(api, "GET", f"{CATALOG}/policy")
    assert (status, got) == (200, body)
    _, listing = await call(api, "GET", "/v1/services")
    assert listing["services"][0]["lb"] == "maglev"
    assert listing["services"][0]["instances"]["total"] == 0
    assert (await call(api, "DELETE", f"{CATALOG}/policy"))[0] == 204
    assert (await call(api, "GET", CATALOG))[0] == 404  # nothing left of the service


async def test_heartbeat_patch_and_delete(api: Api, clock: FakeClock) -> None:
    await register(api, id="c1")
    clock.advance(2.5)
    status, beat = await call(api, "PUT", f"{CATALOG}/instances/c1/heartbeat")
    assert (status, beat) == (200, {"service": "catalog", "id": "c1", "status": "healthy"})
    _, inst = await call(api, "GET", f"{CATALOG}/instances/c1")
    assert inst["last_heartbeat"] == "2027-01-15T08:00:02.500Z"

    status, inst = await call(api, "PATCH", f"{CATALOG}/instances/c1", {"weight": 10})
    assert (status, inst["weight"], inst["status"]) == (200, 10, "healthy")
    status, inst = await call(api, "PATCH", f"{CATALOG}/instances/c1", {"status": "draining"})
    assert (status, inst["status"]) == (200, "draining")
    _, beat = await call(api, "PUT", f"{CATALOG}/instances/c1/heartbeat")
    assert beat["status"] == "draining"  # heartbeats do not undo a drain
    _, listing = await call(api, "GET", "/v1/services")
    assert listing["services"][0]["instances"]["draining"] == 1

    assert (await call(api, "DELETE", f"{CATALOG}/instances/c1"))[0] == 204
    assert (await call(api, "GET", f"{CATALOG}/instances/c1"))[0] == 404
    assert (await call(api, "PUT", f"{CATALOG}/instances/c1/heartbeat"))[0] == 404


async def test_expiry_and_protection_show_in_the_api(make_api: MakeApi, clock: FakeClock) -> None:
    api = await make_api(store=MemoryStore())
    registry = api.app[api_module.REGISTRY]
    for n in range(6):
        await register(api, id=f"i{n}", port=8000 + n)
        await call(api, "PUT", f"{CATALOG}/instances/i{n}/heartbeat")
    clock.advance(16)
    for n in range(5):
        await call(api, "PUT", f"{CATALOG}/instances/i{n}/heartbeat")
    await registry.expire()
    _, listing = await call(api, "GET", "/v1/services")
    assert listing["services"][0]["instances"] == {
        "healthy": 5,
        "unhealthy": 1,
        "draining": 0,
        "total": 6,
    }
    assert listing["protection"] is False

    clock.advance(16)  # now everything is silent: protection
    await registry.expire()
    _, listing = await call(api, "GET", "/v1/services")
    assert listing["protection"] is True
    assert listing["services"][0]["instances"]["total"] == 6

    for n in range(5):
        await call(api, "PUT", f"{CATALOG}/instances/i{n}/heartbeat")
    await registry.expire()
    _, listing = await call(api, "GET", "/v1/services")
    assert listing["protection"] is False
    assert listing["services"][0]["instances"]["total"] == 5  # i5 was 32 s silent


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "field"),
    [
        ("GET", "/v1/services/nope", None, 404, "service"),
        ("GET", "/v1/services/nope/policy", None, 404, "service"),
        ("GET", "/v1/services/nope/instances", None, 404, "service"),
        ("GET", f"{CATALOG}/instances/nope", None, 404, "id"),
        ("PATCH", f"{CATALOG}/instances/nope", {"weight": 1}, 404, "id"),
        ("DELETE", f"{CATALOG}/instances/nope", None, 404, "id"),
        ("DELETE", "/v1/services/nope/policy", None, 404, "service"),
        ("PUT", f"{CATALOG}/instances/nope/heartbeat", None, 404, "id"),
        ("GET", "/v1/services/Not_A_Label", None, 400, "service"),
        ("PUT", "/v1/services/-x/instances/a/heartbeat", None, 400, "service"),
        ("PUT", f"{CATALOG}/instances/a%2Fb/heartbeat", None, 400, "id"),
        ("GET", f"{CATALOG}/instances/{'x' * 129}", None, 400, "id"),
        ("PUT", f"{CATALOG}/policy", {"lb": "fastest"}, 400, "lb"),
        ("PUT", f"{CATALOG}/policy", {"outlier": {"oops": 1}}, 400, "outlier.oops"),
        ("PUT", f"{CATALOG}/policy", [1], 400, "(document)"),
        ("POST", f"{CATALOG}/instances", {"address": "10.0.0.1"}, 400, "port"),
        ("POST", f"{CATALOG}/instances", {"address": "x y", "port": 1}, 400, "address"),
        ("POST", f"{CATALOG}/instances", {"address": "h", "port": 1, "weight": 0}, 400, "weight"),
        ("POST", f"{CATALOG}/instances", {"address": "h", "port": 1, "extra": 0}, 400, "extra"),
    ],
)
async def test_refusals_name_the_field(
    api: Api, method: str, path: str, body: Any, status: int, field: str
) -> None:
    await register(api, id="c1")
    got, data = await call(api, method, path, body)
    assert (got, data["field"]) == (status, field), data


async def test_patch_refusals(api: Api) -> None:
    await register(api, id="c1")
    for body, field in [({}, "(body)"), ({"status": "unhealthy"}, "status"), ({"w": 1}, "w")]:
        status, data = await call(api, "PATCH", f"{CATALOG}/instances/c1", body)
        assert (status, data["field"]) == (400, field)


@pytest.mark.parametrize(
    ("body", "headers", "status", "says"),
    [
        (b'{"lb": ', {"Content-Type": "application/json"}, 400, "malformed JSON"),
        (b'{"lb": NaN}', {"Content-Type": "application/json"}, 400, "NaN is not JSON"),
        (b"", {"Content-Type": "application/json"}, 400, "request body required"),
        (b'{"lb": "random"}', {"Content-Type": "text/plain"}, 415, "send application/json"),
        (b'{"lb": "random"}', {}, 415, "send application/json"),
        (b"{" + b" " * (1024 * 1024) + b"}", {"Content-Type": "application/json"}, 413, "larger"),
    ],
)
async def test_bodies_that_are_not_json(
    api: Api, body: bytes, headers: dict[str, str], status: int, says: str
) -> None:
    async with api.put(f"{CATALOG}/policy", data=io.BytesIO(body), headers=headers) as r:
        assert r.status == status
        data = await r.json()
    assert says in data["error"]
    assert (await call(api, "GET", CATALOG))[0] == 404  # nothing was stored


async def test_chunked_body_over_the_limit_is_413(api: Api) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b" " * 65536 * 2

    async with api.put(
        f"{CATALOG}/policy", data=chunks(), headers={"Content-Type": "application/json"}
    ) as r:
        assert r.status == 413
        assert (await r.json())["field"] is None


async def test_unknown_routes_and_methods_are_json(api: Api) -> None:
    assert (await call(api, "GET", "/v1/nothing"))[0] == 404
    async with api.post("/v1/services") as r:
        assert r.status == 405
        assert "GET" in r.headers["Allow"]
        assert (await r.json())["error"].startswith("Method Not Allowed")


# -- tokens (the whole model is in test_access.py) --------------------------------------------


async def test_an_authorization_header_that_is_not_utf8_is_a_401(make_api: MakeApi) -> None:
    api = await make_api(admin_token="tok")
    assert api.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", api.port)
    writer.write(
        b"DELETE /v1/services/a/policy HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n"
    )
    response = await reader.read()
    writer.close()
    assert response.startswith(b"HTTP/1.1 401 ")
    assert b'"error"' in response


# -- never a 500 for bad input ----------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**400)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.sampled_from(["503", "\u00b2", "\u0665\u0660\u0662", "0502", "off", "header:x"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
policy_like = st.dictionaries(
    st.sampled_from(
        [
            "lb",
            "hash_on",
            "hash_balance_factor",
            "timeout_ms",
            "retries",
            "retry_on",
            "hedge",
            "outlier",
            "retry_budget",
            "zone_aware",
            "x",
        ]
    ),
    json_values,
    max_size=4,
)
registration_like = st.dictionaries(
    st.sampled_from(["address", "port", "id", "zone", "weight", "metadata", "status"]),
    json_values,
    max_size=5,
)
header_values = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=20,
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    policy=policy_like,
    registration=registration_like,
    patch=registration_like,
    name=st.text(max_size=10),
    authorization=header_values,
)
async def test_random_input_never_gets_a_500(
    make_api: MakeApi, policy: Any, registration: Any, patch: Any, name: str, authorization: str
) -> None:
    api = await make_api(store=MemoryStore(), admin_token="tok")
    good = {"Authorization": "Bearer tok"}
    await register(api, id="c1", headers=good)
    for headers in (good, {"Authorization": authorization}):
        for method, path, body in [
            ("PUT", f"{CATALOG}/policy", policy),
            ("POST", f"{CATALOG}/instances", registration),
            ("PATCH", f"{CATALOG}/instances/c1", patch),
        ]:
            async with api.request(method, path, json=body, headers=headers) as r:
                assert r.status < 500, await r.text()
                assert r.content_type == "application/json"
    async with api.get(f"/v1/services/{name}") as r:
        assert r.status < 500, await r.text()
