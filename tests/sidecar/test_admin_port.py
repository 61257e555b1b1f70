"""The admin port's mutating calls against an in-process sidecar: what a browser page can send
is refused and changes nothing; curl with JSON, or the admin token, drains. The metrics port
serves metrics and probes, nothing else."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

import sidecar
from meshlet import __version__
from tests.sidecar.conftest import LOCAL, Mesh, get, request

MakeMesh = Callable[..., Awaitable[Mesh]]
JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def call(
    http: aiohttp.ClientSession, port: int, path: str, method: str = "GET", **kwargs: Any
) -> tuple[int, Any, CIMultiDictProxy[str]]:
    """Status, JSON body (or text), headers."""
    async with http.request(method, f"http://{LOCAL}:{port}{path}", **kwargs) as r:
        body = await r.json() if r.content_type == "application/json" else await r.text()
        return r.status, body, r.headers


async def ready(http: aiohttp.ClientSession, mesh: Mesh) -> int:
    return (await call(http, mesh.admin, "/readyz"))[0]


async def test_curl_with_json_drains(make_mesh: MakeMesh, http: aiohttp.ClientSession) -> None:
    mesh = await make_mesh({})
    assert await ready(http, mesh) == 200
    status, body, _ = await call(http, mesh.admin, "/drain", "POST", data=b"", headers=JSON)
    assert (status, body) == (202, {"status": "draining"})
    assert mesh.sidecar.draining
    assert await ready(http, mesh) == 503


async def test_a_json_object_body_drains_too(
    make_mesh: MakeMesh, http: aiohttp.ClientSession
) -> None:
    mesh = await make_mesh({})
    status, _, _ = await call(http, mesh.admin, "/drain", "POST", json={"why": "deploy"})
    assert status == 202
    assert mesh.sidecar.draining


async def refused(
    http: aiohttp.ClientSession, mesh: Mesh, **kwargs: Any
) -> tuple[int, str, CIMultiDictProxy[str]]:
    """POST /drain that must be refused: its status and error, and the sidecar still ready."""
    status, body, headers = await call(http, mesh.admin, "/drain", "POST", **kwargs)
    assert set(body) == {"error"}, body
    assert not mesh.sidecar.draining
    assert await ready(http, mesh) == 200
    return status, body["error"], headers


async def test_a_pages_text_plain_post_with_its_origin_is_refused(
    make_mesh: MakeMesh, http: aiohttp.ClientSession
) -> None:
    """What a page on another site sends with fetch(..., {method: "POST", mode: "no-cors"})."""
    mesh = await make_mesh({})
    status, error, _ = await refused(
        http,
        mesh,
        data="{}",
        headers={
            "Content-Type": "text/plain;charset=UTF-8",
            "Origin": "https://evil.example",
            "Sec-Fetch-Site": "cross-site",
        },
    )
    assert status == 403
    assert error == "cross-origin call refused (Sec-Fetch-Site: cross-site)"


async def test_a_foreign_origin_is_refused_even_with_json(
    make_mesh: MakeMesh, http: aiohttp.ClientSession
) -> None:
    mesh = await make_mesh({})
    status, error, _ = await refused(http, mesh, json={}, headers={"Origin": "http://evil.example"})
    assert status == 403
    assert error.startswith("cross-origin call refused: Origin 'http://evil.example'")
    status, error, _ = await refused(http, mesh, json={}, headers={"Origin": "null"})
    assert status == 403
    own = f"http://{LOCAL}:{mesh.admin}"  # the port's own page may
    status, _, _ = await call(http, mesh.admin, "/drain", "POST", json={}, headers={"Origin": own})
    assert status == 202


async def test_a_body_that_is_not_json_is_refused(
    make_mesh: MakeMesh, http: aiohttp.ClientSession
) -> None:
    mesh = await make_mesh({})
    status, error, _ = await refused(http, mesh, data=b"drain=1", headers=JSON)
    assert (status, error) == (403, "the body is not valid JSON")
    status, error, _ = await refused(http, mesh, data=b"{}", headers={"Content-Type": "text/plain"})
    assert status == 403
    assert error.startswith("Content-Type must be application/json (got 'text/plain')")
    (bare,) = await request(  # what `curl -X POST` sends: no body, no Content-Type
        mesh.admin, b"POST /drain HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
    )
    assert bare.status == 403
    assert json.loads(bare.body)["error"].startswith(
        "Content-Type must be application/json (got none)"
    )
    assert await ready(http, mesh) == 200


async def test_a_host_that_is_a_name_is_refused(
    make_mesh: MakeMesh, http: aiohttp.ClientSession
) -> None:
    """DNS rebinding: the attacker's name now points at 127.0.0.1; the Host still says it."""
    mesh = await make_mesh({})
    status, error, _ = await refused(
        http, mesh, json={}, headers={"Host": f"rebind.example:{mesh.admin}"}
    )
    assert status == 403
    assert "is not an IP address or localhost" in error
    status, _, _ = await call(
        http, mesh.admin, "/drain", "POST", json={}, headers={"Host": f"localhost:{mesh.admin}"}
    )
    assert status == 202


async def test_any_mutating_method_is_checked_not_only_known_routes(
    make_mesh: MakeMesh, http: aiohttp.ClientSession
) -> None:
    mesh = await make_mesh({})
    for method in ("PUT", "PATCH", "DELETE", "POST"):
        status, body, _ = await call(http, mesh.admin, "/anything", method, data=b"x")
        assert status == 403, method
        assert "Content-Type must be application/json" in body["error"]
    status, _, _ = await call(http, mesh.admin, "/anything", "POST", json={})
    assert status == 404  # allowed through, and nothing is there


async def test_with_an_admin_token_only_its_bearer_drains(
    make_mesh: MakeMesh, http: aiohttp.ClientSession
) -> None:
    mesh = await make_mesh({}, admin_token="s3cret-admin")
    status, error, headers = await refused(http, mesh, json={})
    assert (status, error) == (401, "this call needs Authorization: Bearer <admin token>")
    assert headers["WWW-Authenticate"] == 'Bearer realm="meshlet-sidecar"'
    status, error, _ = await refused(
        http, mesh, json={}, headers={"Authorization": "Bearer s3cret-admiN"}
    )
    assert (status, error) == (401, "wrong admin token")
    right = {"Authorization": "Bearer s3cret-admin"}
    status, error, _ = await refused(  # the token does not excuse a foreign origin
        http, mesh, json={}, headers={**right, "Origin": "http://evil.example"}
    )
    assert status == 403
    status, _, _ = await call(http, mesh.admin, "/drain", "POST", json={}, headers=right)
    assert status == 202
    assert await ready(http, mesh) == 503


async def test_reads_stay_open_on_the_admin_port(
    make_mesh: MakeMesh, http: aiohttp.ClientSession
) -> None:
    mesh = await make_mesh({}, admin_token="s3cret-admin")
    cross = {"Origin": "http://evil.example", "Host": "evil.example"}
    for path in ("/healthz", "/readyz", "/metrics", "/config_dump", "/clusters"):
        assert (await call(http, mesh.admin, path, headers=cross))[0] == 200, path


async def test_config_dump_says_which_build_runs(
    make_mesh: MakeMesh, http: aiohttp.ClientSession
) -> None:
    """Compiled with mypyc, or the Python source (``MESHLET_PURE=1``, or built without a C
    compiler)."""
    mesh = await make_mesh({})
    status, dump, _ = await call(http, mesh.admin, "/config_dump")
    assert status == 200
    assert dump["build"] == {
        "version": __version__,
        "compiled": sidecar.__compiled__,
        "runs": sidecar.__build__,
    }


async def test_the_metrics_port_serves_metrics_and_probes_only(
    make_mesh: MakeMesh, http: aiohttp.ClientSession
) -> None:
    mesh = await make_mesh({})
    assert mesh.metrics not in (0, mesh.admin)
    (no_route,) = await request(mesh.outbound, get("/x", host="nowhere"))
    assert no_route.status == 404
    status, text, headers = await call(http, mesh.metrics, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    counted = [line for line in text.splitlines() if line.startswith("meshlet_requests_total{")]
    assert len(counted) == 1, text
    assert 'code="4xx"' in counted[0]
    assert counted[0].endswith(" 1.0")
    assert (await call(http, mesh.metrics, "/healthz"))[:2] == (200, {"status": "ok"})
    assert (await call(http, mesh.metrics, "/readyz"))[:2] == (
        200,
        {"status": "ready", "reason": ""},
    )
    for path in ("/config_dump", "/clusters", "/drain", "/", "/metrics/x"):
        status, body, _ = await call(http, mesh.metrics, path)
        assert (status, body) == (404, {"error": f"not found: GET {path}"}), path
    for method in ("POST", "PUT", "DELETE"):
        status, body, _ = await call(http, mesh.metrics, "/drain", method, json={})
        assert (status, body) == (404, {"error": f"not found: {method} /drain"})
    status, _, _ = await call(http, mesh.metrics, "/metrics", "POST", json={})
    assert status == 404
    assert not mesh.sidecar.draining
    # the admin port keeps every route, and lists the metrics listener
    status, dump, _ = await call(http, mesh.admin, "/config_dump")
    assert dump["listeners"]["metrics"] == f"{LOCAL}:{mesh.metrics}"
    assert (await call(http, mesh.admin, "/metrics"))[0] == 200


async def test_the_metrics_port_tells_readiness_while_draining(
    make_mesh: MakeMesh, http: aiohttp.ClientSession
) -> None:
    mesh = await make_mesh({})
    mesh.sidecar.drain()
    assert (await call(http, mesh.metrics, "/readyz"))[:2] == (
        503,
        {"status": "not ready", "reason": "draining"},
    )


async def test_metrics_off_leaves_the_probes(
    make_mesh: MakeMesh, http: aiohttp.ClientSession
) -> None:
    mesh = await make_mesh({}, metrics="off")
    status, body, _ = await call(http, mesh.metrics, "/metrics")
    assert (status, body) == (404, {"error": "metrics are off (--metrics off)"})
    assert (await call(http, mesh.metrics, "/healthz"))[0] == 200
