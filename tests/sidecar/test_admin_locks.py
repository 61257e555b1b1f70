"""The app's locks on the sidecar's admin port (issue 14): forwarded to a real control plane
(in-process, on a loopback port) as the sidecar's own service with its own token."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ADMIN, Api, MakeApi
from tests.control_plane.test_access import call, mint
from tests.control_plane.test_metrics import scrape
from tests.processes import free_port
from tests.sidecar.conftest import LOCAL, Mesh

MakeMesh = Callable[..., Awaitable[Mesh]]


async def cp_url(api: Api) -> str:
    return str(api.make_url("")).rstrip("/")


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


async def lock_call(
    mesh: Mesh, method: str, path: str, body: Any = None, **headers: str
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, f"http://{LOCAL}:{mesh.admin}{path}", json=body, headers=headers) as r,
    ):
        data = await r.json() if r.status != 204 else None
        return r.status, data


@pytest.fixture
async def cp(make_api: MakeApi) -> Api:
    return await make_api(token="")


@pytest.fixture
async def mesh(cp: Api, make_mesh: MakeMesh, tmp_path: Path) -> Mesh:
    """A sidecar of service ``tester`` with a service token of its own."""
    _, secret = await mint(cp, "tester")
    return await sidecar(make_mesh, tmp_path, await cp_url(cp), token=secret)


async def test_the_app_takes_renews_and_releases_a_lock(cp: Api, mesh: Mesh) -> None:
    status, lock = await lock_call(mesh, "POST", "/v1/locks/jobs", {"ttl_ms": 5000})
    assert status == 200
    assert lock == {"name": "jobs", "token": lock["token"], "expires_in_ms": 5000, "shared": False}
    # it is the service's lock at the control plane: the admin sees it held there
    assert (await call(cp, "POST", "/v1/services/tester/locks/jobs", ADMIN, {"ttl_ms": 100}))[
        0
    ] == 409
    body = {"token": lock["token"], "ttl_ms": 7000}
    assert await lock_call(mesh, "PUT", "/v1/locks/jobs/renew", body) == (
        200,
        {"token": lock["token"], "expires_in_ms": 7000},
    )
    assert await lock_call(mesh, "DELETE", "/v1/locks/jobs", {"token": lock["token"]}) == (
        204,
        None,
    )
    status, again = await lock_call(mesh, "POST", "/v1/locks/jobs", {"ttl_ms": 5000})
    assert status == 200
    assert again["token"] > lock["token"]


async def test_control_plane_refusals_pass_through(mesh: Mesh) -> None:
    status, body = await lock_call(mesh, "POST", "/v1/locks/jobs", {"ttl_ms": 5})
    assert (status, body["field"]) == (400, "ttl_ms")
    status, body = await lock_call(mesh, "POST", "/v1/locks/.bad", {"ttl_ms": 500})
    assert (status, body["field"]) == (400, "name")
    status, body = await lock_call(mesh, "POST", "/v1/locks/a%3Fb", {"ttl_ms": 500})
    assert (status, body["field"]) == (400, "name")  # quoted on the way, not a query
    assert (await lock_call(mesh, "POST", "/v1/locks/jobs", {"ttl_ms": 5000}))[0] == 200
    status, body = await lock_call(mesh, "POST", "/v1/locks/jobs", {"ttl_ms": 5000, "wait_ms": 50})
    assert (status, body["error"]) == (409, "lock jobs is held (waited 50 ms)")
    status, body = await lock_call(mesh, "DELETE", "/v1/locks/jobs", {"token": 999_999})
    assert (status, body["field"]) == (409, "token")


async def test_a_revoked_token_is_refused_by_the_control_plane(cp: Api, mesh: Mesh) -> None:
    _, tokens = await call(cp, "GET", "/v1/tokens", ADMIN)
    (token,) = tokens["tokens"]
    assert (await call(cp, "DELETE", f"/v1/tokens/{token['id']}", ADMIN))[0] == 204
    status, body = await lock_call(mesh, "POST", "/v1/locks/jobs", {"ttl_ms": 5000})
    assert status == 401
    assert "token" in body["error"]


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/locks/jobs", 405),
        ("PUT", "/v1/locks/jobs", 405),
        ("POST", "/v1/locks/jobs/renew", 405),
        ("POST", "/v1/locks/jobs/other", 404),
        ("POST", "/v1/locks/", 404),
    ],
)
async def test_what_is_not_a_lock_call(mesh: Mesh, method: str, path: str, status: int) -> None:
    got, body = await lock_call(mesh, method, path, {"ttl_ms": 500})
    assert got == status
    assert body["error"]


async def test_browsers_and_other_media_types_are_refused(mesh: Mesh) -> None:
    status, body = await lock_call(
        mesh, "POST", "/v1/locks/jobs", {"ttl_ms": 500}, Origin="http://evil.example"
    )
    assert (status, "cross-origin" in body["error"]) == (403, True)
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"http://{LOCAL}:{mesh.admin}/v1/locks/jobs", data="ttl_ms=500") as r,
    ):
        assert r.status == 403
        assert "Content-Type must be application/json" in (await r.json())["error"]


async def test_the_app_needs_no_admin_token(cp: Api, make_mesh: MakeMesh, tmp_path: Path) -> None:
    """Lock calls are the local app's: loopback, with or without --admin-token."""
    _, secret = await mint(cp, "tester")
    mesh = await sidecar(
        make_mesh, tmp_path, await cp_url(cp), token=secret, admin_token="sidecar-admin"
    )
    assert (await lock_call(mesh, "POST", "/drain", {}))[0] == 401  # the admin's call
    assert (await lock_call(mesh, "POST", "/v1/locks/jobs", {"ttl_ms": 500}))[0] == 200


async def test_without_a_control_plane_locks_are_503(make_mesh: MakeMesh) -> None:
    mesh = await make_mesh({})
    status, body = await lock_call(mesh, "POST", "/v1/locks/jobs", {"ttl_ms": 500})
    assert status == 503
    assert "locks need a control plane" in body["error"]


async def test_an_unreachable_control_plane_is_503(make_mesh: MakeMesh, tmp_path: Path) -> None:
    mesh = await sidecar(make_mesh, tmp_path, f"http://{LOCAL}:{free_port()}")
    status, body = await lock_call(mesh, "POST", "/v1/locks/jobs", {"ttl_ms": 500})
    assert status == 503
    assert body["error"].startswith("control plane unavailable: cannot connect")


async def test_an_app_that_hangs_up_stops_its_wait(cp: Api, mesh: Mesh) -> None:
    """A waiting call whose app leaves is cancelled at the sidecar, which hangs up on the
    control plane, which stops waiting: nothing waits for nobody."""
    assert (await lock_call(mesh, "POST", "/v1/locks/jobs", {"ttl_ms": 60_000}))[0] == 200
    body = b'{"ttl_ms": 1000, "wait_ms": 30000}'
    _reader, writer = await asyncio.open_connection(LOCAL, mesh.admin)
    writer.write(
        b"POST /v1/locks/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    locks = mesh.sidecar.locks
    assert locks is not None
    for _ in range(100):
        if locks.statistics().in_flight and (await scrape(cp))["meshlet_lock_waiting"] == 1:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the call never waited")
    writer.close()
    for _ in range(200):
        if not locks.statistics().in_flight and (await scrape(cp))["meshlet_lock_waiting"] == 0:
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError(f"still waiting after the app left: {locks!r}")
    # the admin port still answers, on a new connection
    assert (await lock_call(mesh, "POST", "/v1/locks/other", {"ttl_ms": 500}))[0] == 200


async def test_calls_on_one_connection_are_answered_in_order(mesh: Mesh) -> None:
    """Pipelined: the second request waits for the first's deferred answer."""
    body = b'{"ttl_ms": 5000}'
    one = (
        b"POST /v1/locks/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    reader, writer = await asyncio.open_connection(LOCAL, mesh.admin)
    writer.write(one + one + b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await writer.drain()
    statuses = []
    for _ in range(3):
        head = await reader.readuntil(b"\r\n\r\n")
        statuses.append(int(head.split(b" ", 2)[1]))
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
    writer.close()
    assert statuses == [200, 409, 200]


@pytest.mark.parametrize(
    ("answer", "status", "error"),
    [
        (b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{"token":1}', 200, None),
        (b'HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{"token":1}', 200, None),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 503, "chunked"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", 503, "over 65536"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n{}", 503, "2 bytes into the body"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", 503, "malformed Content-Length"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", 503, "not an HTTP/1.1 answer"),
    ],
)
async def test_what_the_control_plane_answers_is_read_with_limits(
    make_mesh: MakeMesh, tmp_path: Path, answer: bytes, status: int, error: str | None
) -> None:
    """A stand-in control plane that answers every request with ``answer`` and closes."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, LOCAL, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        mesh = await sidecar(make_mesh, tmp_path, f"http://{LOCAL}:{port}")
        got, body = await lock_call(mesh, "POST", "/v1/locks/jobs", {"ttl_ms": 500})
    finally:
        server.close()
    assert got == status
    if error is None:
        assert body == {"token": 1}
    else:
        assert error in body["error"]


async def test_a_client_that_sends_on_while_its_answer_is_awaited_is_cut(
    cp: Api, mesh: Mesh
) -> None:
    """The next request waits for the answer; more than one request's worth of bytes is not
    kept: the connection is cut."""
    assert (await lock_call(mesh, "POST", "/v1/locks/jobs", {"ttl_ms": 60_000}))[0] == 200
    body = b'{"ttl_ms": 1000, "wait_ms": 30000}'
    reader, writer = await asyncio.open_connection(LOCAL, mesh.admin)
    writer.write(
        b"POST /v1/locks/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.write(b"x" * (200 * 1024))
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing answered
    writer.close()
