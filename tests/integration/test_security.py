"""Each attack of issue 10 against real processes: a control plane (and a sidecar where one
is needed) on 127.0.0.1, the attacker a client of the same machine. Each is refused and leaves
the registry as it was."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from tests.processes import ControlPlane, Sidecar, eventually

pytestmark = pytest.mark.slow

JOIN = "test-join-token"
Start = Callable[..., ControlPlane]


@pytest.fixture
def cp(control_plane: Start) -> ControlPlane:
    return control_plane(
        "--store",
        "memory",
        "--debounce-quiet",
        "0.05",
        env={"MESHLET_JOIN_TOKEN": JOIN, "PYTHONUNBUFFERED": "1"},
    )


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def hello(node: str, service: str, instance: str, address: str, **reg: Any) -> str:
    registration = {"address": address, "port": 80, "id": instance, **reg}
    doc = {"type": "hello", "node": node, "service": service, "instance": registration}
    return json.dumps(doc)


async def stream(
    http: aiohttp.ClientSession, cp: ControlPlane, token: str, first: str
) -> tuple[aiohttp.ClientWebSocketResponse, aiohttp.WSMessage]:
    """A stream opened with ``token`` that sent ``first``; its first answer."""
    ws = await http.ws_connect(cp.url + "/v1/stream", headers={"Authorization": f"Bearer {token}"})
    await ws.send_str(first)
    async with asyncio.timeout(5):
        return ws, await ws.receive()


def instance(cp: ControlPlane, service: str, instance_id: str) -> dict[str, Any]:
    status, body = cp.call("GET", f"/v1/services/{service}/instances/{instance_id}")
    assert status == 200, body
    body.pop("last_heartbeat")
    result: dict[str, Any] = body
    return result


def services(cp: ControlPlane) -> list[str]:
    return [s["name"] for s in cp.call("GET", "/v1/services")[1]["services"]]


async def test_join_token_cannot_take_over_or_remove_the_admins_instance(
    cp: ControlPlane, http: aiohttp.ClientSession
) -> None:
    body = {"id": "catalog-1", "address": "10.0.0.7", "port": 8080}
    assert cp.call("POST", "/v1/services/catalog/instances", body)[0] == 201
    before = instance(cp, "catalog", "catalog-1")
    attack = hello("evil", "catalog", "catalog-1", "169.254.169.254", weight=10_000)
    ws, answer = await stream(http, cp, JOIN, attack)
    assert answer.type is aiohttp.WSMsgType.CLOSE
    assert ws.close_code == 4409
    # the same token over REST: no re-pointing, no foreign deregister
    repoint = {**body, "address": "10.9.9.9", "weight": 10_000}
    assert cp.call("POST", "/v1/services/catalog/instances", repoint, token=JOIN)[0] == 409
    assert cp.call("DELETE", "/v1/services/catalog/instances/catalog-1", token=JOIN)[0] == 409
    assert instance(cp, "catalog", "catalog-1") == before
    assert "evil refused catalog/catalog-1: catalog/catalog-1 was registered by the admin" in (
        cp.log()
    )
    assert cp.stop() == 0


async def test_a_live_sidecars_instance_cannot_be_taken_or_deregistered(
    cp: ControlPlane,
    http: aiohttp.ClientSession,
    sidecar_process: Callable[..., Sidecar],
    tmp_path: Path,
) -> None:
    sidecar = sidecar_process(
        "--service", "catalog", "--control-plane", cp.url, "--app", "http://127.0.0.1:9",
        "--app-health", "none", "--advertise", "127.0.0.1", "--state-dir", str(tmp_path / "s"),
        env=cp.sidecar_env("catalog"),
    )  # fmt: skip
    own = f"127.0.0.1-{sidecar.ports['inbound']}"
    eventually(lambda: cp.call("GET", "/v1/sidecars")[1]["sidecars"] != [], what="connected")
    before = instance(cp, "catalog", own)
    # another node with the join token, and one with a token of the same service
    for token in (JOIN, cp.mint("catalog")):
        attack = hello("evil", "catalog", own, "127.0.0.1", port=sidecar.ports["inbound"])
        ws, answer = await stream(http, cp, token, attack)
        assert (answer.type, ws.close_code) == (aiohttp.WSMsgType.CLOSE, 4409)
        gone = await http.delete(
            f"{cp.url}/v1/services/catalog/instances/{own}",
            headers={"Authorization": f"Bearer {token}"},
        )
        assert gone.status == 409
    assert instance(cp, "catalog", own) == before
    log = cp.log()
    assert log.count(f"sidecar evil refused catalog/{own}") == 1  # logged once
    _, metrics = http_text(cp.url + "/metrics")
    assert 'meshlet_stream_refusals_total{reason="owned"} 2.0' in metrics
    assert sidecar.stop() == 0
    assert cp.stop() == 0


def http_text(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read().decode()


async def test_a_service_token_cannot_speak_for_another_service(
    cp: ControlPlane, http: aiohttp.ClientSession
) -> None:
    payments = cp.mint("payments")
    ws, answer = await stream(http, cp, payments, hello("p", "catalog", "c1", "10.0.0.1"))
    assert (answer.type, ws.close_code) == (aiohttp.WSMsgType.CLOSE, 4403)
    body = {"id": "c1", "address": "10.0.0.1", "port": 80}
    assert cp.call("POST", "/v1/services/catalog/instances", body, token=payments)[0] == 403
    assert services(cp) == []
    assert cp.stop() == 0


async def test_every_rest_call_wants_a_token_that_may_make_it(cp: ControlPlane) -> None:
    catalog = cp.mint("catalog")
    body = {"id": "c1", "address": "10.0.0.1", "port": 80}
    assert cp.call("POST", "/v1/services/catalog/instances", body, token="")[0] == 401
    assert cp.call("POST", "/v1/services/catalog/instances", body, token="mlt_guess")[0] == 401
    assert cp.call("POST", "/v1/services/catalog/instances", body, token=catalog)[0] == 201
    for method, path, doc in [
        ("GET", "/v1/services", None),
        ("GET", "/v1/services/catalog", None),
        ("GET", "/v1/table", None),
        ("GET", "/v1/sidecars", None),
        ("GET", "/v1/tokens", None),
        ("PUT", "/v1/services/catalog/policy", {"lb": "random"}),
        ("PATCH", "/v1/services/catalog/instances/c1", {"weight": 1}),
        ("POST", "/v1/tokens", {"service": "catalog"}),
    ]:
        assert cp.call(method, path, doc, token="")[0] == 401, (method, path)
        assert cp.call(method, path, doc, token=catalog)[0] == 403, (method, path)
        assert cp.call(method, path, doc, token=JOIN)[0] == 403, (method, path)
    for path in ("/healthz", "/readyz", "/openapi.json"):
        assert cp.call("GET", path, token="")[0] == 200
    assert instance(cp, "catalog", "c1")["weight"] == 100
    assert cp.stop() == 0


async def test_a_revoked_tokens_sidecar_is_cut_off_within_a_second(
    cp: ControlPlane, sidecar_process: Callable[..., Sidecar], tmp_path: Path
) -> None:
    catalog = cp.mint("catalog")
    (token_file := tmp_path / "token").write_text(catalog)
    sidecar = sidecar_process(
        "--service", "catalog", "--control-plane", cp.url, "--app", "http://127.0.0.1:9",
        "--app-health", "none", "--advertise", "127.0.0.1", "--state-dir", str(tmp_path / "s"),
        "--token-file", str(token_file),
    )  # fmt: skip
    eventually(lambda: len(cp.call("GET", "/v1/sidecars")[1]["sidecars"]) == 1, what="joined")
    (row,) = cp.call("GET", "/v1/tokens")[1]["tokens"]
    started = time.monotonic()
    assert cp.call("DELETE", f"/v1/tokens/{row['id']}")[0] == 204
    took = eventually(lambda: cp.call("GET", "/v1/sidecars")[1]["sidecars"] == [], timeout=1.0)
    assert time.monotonic() - started < 1.0, took

    def refused() -> bool:
        # the close (4401), or, after a stream older than 5 s, the next try's handshake (401)
        stream = sidecar.admin("/config_dump")[1]["control_plane"]
        error = stream["last_error"] or ""
        return not stream["connected"] and ("4401" in error or "HTTP 401" in error)

    eventually(refused, what="the sidecar says its token was revoked")
    assert sidecar.admin("/readyz")[0] == 200  # fail-static: it keeps its table
    assert sidecar.stop() == 0
    assert cp.stop() == 0


HOSTILE = [
    "169.254.169.254",
    "0.0.0.0",
    "fe80::1%" + "z" * 100_000,
    "fe80::1%\n1999-01-01T00:00:00 ERROR meshlet.api: FORGED LINE",
    "fe80::1%a\x00b",
    "fe80::1%\x1b[2J",
]


async def test_addresses_nobody_should_route_to_and_hostile_zone_ids(
    control_plane: Start, http: aiohttp.ClientSession
) -> None:
    cp = control_plane("--store", "memory", env={"MESHLET_JOIN_TOKEN": JOIN})
    for n, address in enumerate(HOSTILE):
        body = {"id": f"x{n}", "address": address, "port": 80}
        status, error = cp.call("POST", "/v1/services/catalog/instances", body, token=JOIN)
        assert (status, error["field"]) == (400, "address"), address[:40]
        ws, answer = await stream(http, cp, JOIN, hello(f"n{n}", "catalog", f"x{n}", address))
        assert (answer.type, ws.close_code) == (aiohttp.WSMsgType.CLOSE, 4400), address[:40]
    assert services(cp) == []
    assert len(cp.call("GET", "/v1/table")[1]["services"]) == 0
    log = cp.log()
    assert not any(line.startswith("1999-01-01T00") for line in log.splitlines())
    assert "\x00" not in log
    assert "\x1b" not in log
    assert cp.stop() == 0


async def test_a_client_cannot_forge_a_log_line(
    cp: ControlPlane, http: aiohttp.ClientSession
) -> None:
    """What a sidecar writes in a NACK reaches the log: escaped, on one line."""
    token = cp.mint("catalog")
    ws, answer = await stream(http, cp, token, hello("n1", "catalog", "c1", "10.0.0.1"))
    assert answer.type is aiohttp.WSMsgType.TEXT  # welcome
    forged = "bad\n1999-01-01T00:00:00 ERROR meshlet.api: FORGED LINE\x1b[31m\x00"
    await ws.send_str(json.dumps({"type": "nack", "version": 1, "error": forged}))
    eventually(lambda: "refused table" in cp.log(), what="the NACK in the log")
    await ws.close()
    lines = cp.log().splitlines()
    assert not any(re.match(r"1999-01-01T00:00:00 ERROR", line) for line in lines)
    (line,) = [line for line in lines if "refused table" in line]
    assert "bad\\n1999-01-01T00:00:00 ERROR meshlet.api: FORGED LINE\\x1b[31m\\x00" in line
    assert cp.stop() == 0


async def test_junk_that_never_heartbeats_cannot_hold_protection_on(
    control_plane: Start, http: aiohttp.ClientSession
) -> None:
    cp = control_plane(
        "--store", "memory", "--heartbeat-ttl", "0.5", "--remove-after", "1",
        env={"MESHLET_JOIN_TOKEN": JOIN, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    real = {"id": "real", "address": "10.0.0.1", "port": 80}
    assert cp.call("POST", "/v1/services/catalog/instances", real, token=JOIN)[0] == 201
    assert cp.call("PUT", "/v1/services/catalog/instances/real/heartbeat", token=JOIN)[0] == 200
    junk = []
    for n in range(4):  # registered over the stream, never a heartbeat, kept open
        ws, answer = await stream(http, cp, JOIN, hello(f"j{n}", "junk", f"j{n}", "10.0.1.1"))
        assert answer.type is aiohttp.WSMsgType.TEXT
        junk.append(ws)
    # the real instance stops heartbeating: it must go, on time, protection or not
    eventually(lambda: "catalog" not in services(cp), timeout=5, what="the dead instance removed")
    assert "protection on" not in cp.log()
    assert cp.call("GET", "/v1/services")[1]["protection"] is False
    for ws in junk:
        await ws.close()
    assert cp.stop() == 0


def test_control_plane_over_tls_with_sidecars_and_ctl(
    control_plane: Start, sidecar_process: Callable[..., Sidecar], tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    cp = control_plane(
        "--store", "memory", "--debounce-quiet", "0.05",
        "--tls-cert", str(tmp_path / "server.pem"), "--tls-key", str(tmp_path / "server.pem"),
        ca_file=str(tmp_path / "ca.pem"),
    )  # fmt: skip
    assert cp.url.startswith("https://127.0.0.1:")
    ctl = [str(Path(sys.executable).with_name("meshlet")), "ctl", "--control-plane", cp.url]
    env = {"PATH": "/usr/bin:/bin", "MESHLET_ADMIN_TOKEN": cp.admin_token}
    ok = subprocess.run(
        [*ctl, "--ca-file", str(tmp_path / "ca.pem"), "services"],
        capture_output=True, text=True, timeout=30, env=env,
    )  # fmt: skip
    assert (ok.returncode, ok.stdout.split()[0]) == (0, "SERVICE"), ok.stderr
    wrong = subprocess.run(
        [*ctl, "--ca-file", str(tmp_path / "other-ca.pem"), "services"],
        capture_output=True, text=True, timeout=30, env=env,
    )  # fmt: skip
    assert wrong.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in wrong.stderr
    plain = cp.url.replace("https://", "http://")
    with pytest.raises(ConnectionError):  # plain HTTP to the HTTPS port: dropped, no answer
        urllib.request.urlopen(plain + "/healthz", timeout=5)

    common = ("--service", "catalog", "--control-plane", cp.url, "--app", "http://127.0.0.1:9",
              "--app-health", "none", "--advertise", "127.0.0.1")  # fmt: skip
    good = sidecar_process(
        *common, "--state-dir", str(tmp_path / "a"), "--ca-file", str(tmp_path / "ca.pem"),
        env=cp.sidecar_env("catalog"),
    )  # fmt: skip
    bad = sidecar_process(
        *common, "--state-dir", str(tmp_path / "b"), "--ca-file", str(tmp_path / "other-ca.pem"),
        env=cp.sidecar_env("catalog"),
    )  # fmt: skip

    def stream(sidecar: Sidecar) -> dict[str, Any]:
        found: dict[str, Any] = sidecar.admin("/config_dump")[1]["control_plane"]
        return found

    eventually(lambda: stream(good)["connected"], what="the sidecar that trusts the CA joins")
    eventually(lambda: "CERTIFICATE_VERIFY_FAILED" in (stream(bad)["last_error"] or ""))
    assert stream(bad)["connected"] is False
    sidecars = cp.call("GET", "/v1/sidecars")[1]["sidecars"]
    assert [s["instance"] for s in sidecars] == [f"127.0.0.1-{good.ports['inbound']}"]
    assert good.stop() == 0
    assert bad.stop() == 0
    assert cp.stop() == 0
