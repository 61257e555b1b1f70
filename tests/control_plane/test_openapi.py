"""/openapi.json is valid OpenAPI 3.1, covers every route, and every answer matches it."""

from __future__ import annotations

import time
from typing import Any

import jsonschema
from openapi_spec_validator import validate

from control_plane import api as api_module
from control_plane.access import Access
from control_plane.api import PUBLISHER
from control_plane.ca import Authority
from control_plane.openapi import SECURITY
from control_plane.wire.identity import fingerprint
from tests.conftest import Api

CATALOG = "/v1/services/catalog"
_OTHER_ROOT = Authority.create(time.time())
ROOT = _OTHER_ROOT.pem()[0].decode()
ROOT_SHA = fingerprint(_OTHER_ROOT.certificate)


async def fetch_spec(api: Api) -> dict[str, Any]:
    async with api.get("/openapi.json") as r:
        assert r.status == 200
        spec: dict[str, Any] = await r.json()
        return spec


async def test_spec_is_valid_openapi_3_1(api: Api) -> None:
    spec = await fetch_spec(api)
    assert spec["openapi"] == "3.1.0"
    validate(spec)


async def test_spec_and_router_list_the_same_operations(api: Api) -> None:
    spec = await fetch_spec(api)
    documented = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    served = {
        (route.method, route.resource.canonical)
        for route in api.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    assert documented == served


def check(spec: dict[str, Any], method: str, template: str, status: int, body: Any) -> None:
    op = spec["paths"][template][method.lower()]
    response = op["responses"].get(str(status))
    assert response is not None, f"{method} {template} answered {status}, not in the spec"
    if status == 204:
        assert body is None
        return
    schema = response["content"]["application/json"].get("schema")
    if schema is not None:
        jsonschema.Draft202012Validator({**schema, "components": spec["components"]}).validate(body)


async def test_every_answer_matches_its_schema(api: Api) -> None:
    spec = await fetch_spec(api)
    inst = CATALOG + "/instances/{id}"
    svc = "/v1/services/{service}"
    lock = svc + "/locks/{name}"
    calls: list[tuple[str, str, str, Any, int]] = [
        ("GET", "/healthz", "/healthz", None, 200),
        ("GET", "/readyz", "/readyz", None, 200),
        ("GET", "/v1/services", "/v1/services", None, 200),
        ("PUT", f"{CATALOG}/policy", svc + "/policy", {"lb": "ring_hash", "hash_on": "path"}, 200),
        ("PUT", f"{CATALOG}/policy", svc + "/policy", {"lb": 1}, 400),
        ("GET", f"{CATALOG}/policy", svc + "/policy", None, 200),
        (
            "POST",
            f"{CATALOG}/instances",
            svc + "/instances",
            {"id": "c1", "address": "10.0.0.1", "port": 80, "metadata": {"a": "b"}},
            201,
        ),
        (
            "POST",
            f"{CATALOG}/instances",
            svc + "/instances",
            {"id": "c1", "address": "10.0.0.1", "port": 80},
            200,
        ),
        ("POST", f"{CATALOG}/instances", svc + "/instances", {"port": 80}, 400),
        ("GET", f"{CATALOG}/instances", svc + "/instances", None, 200),
        ("GET", CATALOG, svc, None, 200),
        ("GET", "/v1/services/nope", svc, None, 404),
        ("GET", "/v1/services/NOPE", svc, None, 400),
        ("GET", inst.format(id="c1"), svc + "/instances/{id}", None, 200),
        ("PUT", inst.format(id="c1") + "/heartbeat", svc + "/instances/{id}/heartbeat", None, 200),
        ("PUT", inst.format(id="zz") + "/heartbeat", svc + "/instances/{id}/heartbeat", None, 404),
        ("PATCH", inst.format(id="c1"), svc + "/instances/{id}", {"status": "draining"}, 200),
        ("PATCH", inst.format(id="c1"), svc + "/instances/{id}", {}, 400),
        ("GET", "/v1/services", "/v1/services", None, 200),
        ("GET", "/v1/table", "/v1/table", None, 200),
        ("GET", "/v1/sidecars", "/v1/sidecars", None, 200),
        ("DELETE", inst.format(id="c1"), svc + "/instances/{id}", None, 204),
        ("DELETE", f"{CATALOG}/policy", svc + "/policy", None, 204),
        ("DELETE", f"{CATALOG}/policy", svc + "/policy", None, 404),
        ("POST", "/v1/tokens", "/v1/tokens", {"service": "catalog", "description": "d"}, 201),
        ("POST", "/v1/tokens", "/v1/tokens", {"service": "-"}, 400),
        ("GET", "/v1/tokens", "/v1/tokens", None, 200),
        ("DELETE", "/v1/tokens/nope", "/v1/tokens/{id}", None, 404),
        ("GET", "/v1/tokens", "/v1/tokens", None, 401),
        ("POST", f"{CATALOG}/locks/job", lock, {"ttl_ms": 5000}, 200),
        ("POST", f"{CATALOG}/locks/job", lock, {"ttl_ms": 5000}, 409),
        ("POST", f"{CATALOG}/locks/job", lock, {"ttl_ms": 5}, 400),
        ("PUT", f"{CATALOG}/locks/job/renew", lock + "/renew", {"token": 1, "ttl_ms": 900}, 200),
        ("PUT", f"{CATALOG}/locks/job/renew", lock + "/renew", {"token": 9, "ttl_ms": 900}, 409),
        ("DELETE", f"{CATALOG}/locks/job", lock, {"token": 1}, 204),
        ("DELETE", f"{CATALOG}/locks/job", lock, {"token": 1}, 409),
        ("PUT", "/v1/lock-grants/job", "/v1/lock-grants/{name}", {"services": ["a", "b"]}, 200),
        ("PUT", "/v1/lock-grants/job", "/v1/lock-grants/{name}", {"services": []}, 400),
        ("GET", "/v1/lock-grants", "/v1/lock-grants", None, 200),
        ("DELETE", "/v1/lock-grants/job", "/v1/lock-grants/{name}", None, 204),
        ("DELETE", "/v1/lock-grants/job", "/v1/lock-grants/{name}", None, 404),
        ("GET", "/v1/trust-bundle", "/v1/trust-bundle", None, 200),
        ("POST", "/v1/trust-bundle", "/v1/trust-bundle", {"pem": ROOT}, 201),
        ("POST", "/v1/trust-bundle", "/v1/trust-bundle", {"pem": ROOT}, 409),
        ("POST", "/v1/trust-bundle", "/v1/trust-bundle", {"pem": "junk"}, 400),
        ("DELETE", f"/v1/trust-bundle/{ROOT_SHA}", "/v1/trust-bundle/{sha256}", None, 204),
        ("DELETE", f"/v1/trust-bundle/{ROOT_SHA}", "/v1/trust-bundle/{sha256}", None, 404),
    ]
    for method, path, template, body, expected in calls:
        headers = {"Authorization": "Bearer wrong"} if expected == 401 else None
        async with api.request(method, path, json=body, headers=headers) as r:
            assert r.status == expected, (method, path, await r.text())
            data = None if r.status == 204 else await r.json()
        check(spec, method, template, r.status, data)


async def test_a_table_with_a_ring_matches_its_schema(api: Api) -> None:
    spec = await fetch_spec(api)
    assert (await api.put(f"{CATALOG}/policy", json={"lb": "maglev", "hash_on": "path"})).ok
    body = {"id": "c1", "address": "10.0.0.1", "port": 80}
    assert (await api.post(f"{CATALOG}/instances", json=body)).status == 201
    assert api.app is not None
    await api.app[PUBLISHER].rebuild()
    async with api.get("/v1/table") as r:
        table = await r.json()
    assert table["services"]["catalog"]["ring"] is not None
    check(spec, "GET", "/v1/table", r.status, table)


async def test_policy_schema_rejects_what_the_api_rejects(api: Api) -> None:
    spec = await fetch_spec(api)
    validator = jsonschema.Draft202012Validator(spec["components"]["schemas"]["Policy"])
    assert validator.is_valid({"lb": "random", "hedge": {"after_ms": 5}, "retry_on": [503]})
    assert validator.is_valid({"retry_on": ["unavailable", "resource-exhausted", "reset"]})
    assert not validator.is_valid({"retry_on": ["not_found"]})
    assert validator.is_valid({"hedge": "off"})
    assert validator.is_valid({"hedge": None})
    for bad in ({"lb": "x"}, {"retries": 11}, {"x": 1}, {"outlier": {"y": 1}}, {"hedge": "on"}):
        assert not validator.is_valid(bad), bad


async def test_the_spec_says_who_may_call_each_route(api: Api) -> None:
    spec = await fetch_spec(api)
    for method, path, _, access in api_module._ROUTES:
        op = spec["paths"][path][method.lower()]
        assert op["security"] == SECURITY[access], (method, path)
        if access is not Access.OPEN:
            assert {"401", "403"} <= set(op["responses"]), (method, path)
