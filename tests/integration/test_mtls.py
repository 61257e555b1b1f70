"""Mutual TLS between real sidecars (issue 15): a control plane that signs their certificates,
two services calling each other, ``allow_from`` and ``mtls: strict``, a rotation under load, a
control-plane restart. Whether a hop was mesh TLS is read off the sidecars themselves: the app
behind an inbound sidecar sees ``x-meshlet-peer`` only on a verified session, and the inbound
counts its handshakes."""

from __future__ import annotations

import re
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_mesh import (
    App,
    StartCP,
    StartSidecar,
    call,
    dump,
    mesh_sidecar,
    quick_cp,
)
from tests.integration.test_mesh import apps as apps  # (the fixture)
from tests.processes import Sidecar, eventually

pytestmark = pytest.mark.slow

WEB = "spiffe://cluster.local/ns/default/svc/web"
CATALOG = "spiffe://cluster.local/ns/default/svc/catalog"


def handshakes(sidecar: Sidecar) -> float:
    return metric(
        sidecar, "meshlet_listener_tls_handshakes_total", direction="inbound", result="ok"
    )


def metric(sidecar: Sidecar, name: str, **labels: str) -> float:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{sidecar.ports['metrics']}/metrics", timeout=5
    ) as r:
        text = r.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"^{name}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def ca_of(cp: Any) -> bytes:
    """The signing CA's certificate (``GET /v1/ca``, PEM)."""
    req = urllib.request.Request(
        cp.url + "/v1/ca", headers={"Authorization": f"Bearer {cp.admin_token}"}
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        pem: bytes = r.read()
    return pem


def meshed(caller: Sidecar, service: str) -> bool:
    """The caller holds a certificate and its table gives ``service`` an identity."""
    data = dump(caller)
    table: dict[str, Any] = data.get("table") or {}
    entry: dict[str, Any] = (table.get("services") or {}).get(service) or {}
    own = (data.get("identity") or {}).get("spiffe_id")
    return bool(own) and any(e.get("tls") for e in entry.get("endpoints", []))


def plaintext_from(address: str, port: int) -> bytes:
    """A plaintext request straight to an inbound port, from ``address``: its status line."""
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(address, 0)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: catalog\r\nConnection: close\r\n\r\n")
        return s.recv(4096).split(b"\r\n", 1)[0]


@pytest.fixture
def mesh(
    control_plane: StartCP,
    sidecar_process: StartSidecar,
    apps: Callable[[str], App],
    tmp_path: Path,
) -> tuple[Any, Sidecar, Sidecar]:
    cp = quick_cp(control_plane, tmp_path, 0, "--cert-ttl", "8")
    web = mesh_sidecar(sidecar_process, cp, "web", apps("web"), tmp_path)
    catalog = mesh_sidecar(sidecar_process, cp, "catalog", apps("catalog"), tmp_path)
    eventually(lambda: meshed(web, "catalog"), what="web has catalog over mesh TLS")
    eventually(lambda: meshed(catalog, "web"), what="catalog has web over mesh TLS")
    return cp, web, catalog


def test_two_services_call_each_other_over_mutual_tls_and_authorize_by_service(
    mesh: tuple[Any, Sidecar, Sidecar],
) -> None:
    cp, web, catalog = mesh
    assert call(web, "catalog", "/peer") == (200, WEB)  # catalog's app learns the verified caller
    assert call(catalog, "web", "/peer") == (200, CATALOG)
    assert handshakes(catalog) >= 1
    # a client's own x-meshlet-peer never reaches the app
    assert call(web, "catalog", "/peer", {"x-meshlet-peer": "spiffe://evil"}) == (200, WEB)

    # allow_from: catalog takes only orders; web is refused 403 and counted
    assert cp.call("PUT", "/v1/services/catalog/policy", {"allow_from": ["orders"]})[0] == 200
    eventually(lambda: call(web, "catalog", "/peer")[0] == 403, what="web refused")
    assert "allow_from does not list web" in call(web, "catalog", "/peer")[1]
    assert metric(catalog, "meshlet_inbound_forbidden_total", caller="web") >= 2
    assert (
        cp.call("PUT", "/v1/services/catalog/policy", {"allow_from": ["orders", "web"]})[0] == 200
    )
    eventually(lambda: call(web, "catalog", "/peer") == (200, WEB), what="web allowed again")

    # a caller without a mesh identity matches only "*"
    assert plaintext_from("127.0.0.2", catalog.ports["inbound"]).startswith(b"HTTP/1.1 403")
    assert cp.call("PUT", "/v1/services/catalog/policy", {})[0] == 200  # (policy PUT replaces)
    eventually(
        lambda: plaintext_from("127.0.0.2", catalog.ports["inbound"]).startswith(b"HTTP/1.1 200"),
        what="permissive, from anyone",
    )
    # strict: plaintext from another host is refused; the mesh and the local host go on
    assert cp.call("PUT", "/v1/services/catalog/policy", {"mtls": "strict"})[0] == 200
    eventually(
        lambda: plaintext_from("127.0.0.2", catalog.ports["inbound"]).startswith(b"HTTP/1.1 403"),
        what="strict in force",
    )
    assert plaintext_from("127.0.0.1", catalog.ports["inbound"]).startswith(b"HTTP/1.1 200")
    assert call(web, "catalog", "/peer") == (200, WEB)


def test_a_rotation_under_load_fails_no_request(mesh: tuple[Any, Sidecar, Sidecar]) -> None:
    """Certificates of 8 s are rotated at two thirds: a steady load until both sidecars have
    rotated twice (at most 30 s, 30,000 requests) loses nothing."""
    _, web, catalog = mesh

    def rotations() -> int:
        return min(int(dump(s)["identity"]["rotations"]) for s in (web, catalog))

    serials = [dump(s)["identity"]["serial"] for s in (web, catalog)]
    failed, done = [], 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and done < 30_000 and (done % 200 or rotations() < 2):
        status, body = call(web, "catalog", "/peer")
        if (status, body) != (200, WEB):
            failed.append((status, body))
        done += 1
    assert rotations() >= 2, f"{done} requests in 30 s and no second rotation"
    assert [dump(s)["identity"]["serial"] for s in (web, catalog)] != serials
    assert failed == [], f"{len(failed)} of {done} failed: {failed[:3]}"


def test_the_ca_survives_a_control_plane_restart_and_sidecars_keep_their_connections(
    control_plane: StartCP, mesh: tuple[Any, Sidecar, Sidecar], tmp_path: Path
) -> None:
    cp, web, catalog = mesh
    before = ca_of(cp)
    assert call(web, "catalog", "/peer") == (200, WEB)
    opened = handshakes(catalog)
    port = int(cp.url.rsplit(":", 1)[1])
    cp.stop()
    cp2 = quick_cp(control_plane, tmp_path, port, "--cert-ttl", "8")
    assert ca_of(cp2) == before
    for _ in range(20):  # the kept connection carries on: no new handshake
        assert call(web, "catalog", "/peer") == (200, WEB)
    assert handshakes(catalog) == opened
